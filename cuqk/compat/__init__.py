"""Drop-in signatures of other projects' ops, backed by cuqk."""
