"""Integrations of cuqk with model libraries.

Each submodule patches one library's models in place and imports that library only when it is
imported itself, so ``import cuqk.integrations`` never needs an optional dependency:

- :mod:`cuqk.integrations.transformers`: Hugging Face transformers (Qwen3, Qwen3-MoE, Gemma 3).
"""
