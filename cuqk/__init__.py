"""cuqk: fused attention-prologue kernels (per-head QK RMSNorm + RoPE) for torch and CuPy.

Kernels are CUDA C compiled at run time by NVRTC through CuPy and cached on disk; nothing is
compiled at import.
"""

__version__ = "0.1.0"

try:
    import cupy  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by the packaging test
    raise ImportError(
        "cuqk needs CuPy. Install the extra that matches your CUDA major version: "
        "pip install 'cuqk[cuda12]' or pip install 'cuqk[cuda13]'"
    ) from exc

from . import reference
from ._jit import VARIANTS, precompile, set_pdl
from .qk_norm_rope import QkNormRope, qk_norm_rope, qk_norm_rope_, qk_norm_rope_gate, set_debug
from .rope_cache import rope_cos_sin_cache

__all__ = ["VARIANTS", "QkNormRope", "precompile", "qk_norm_rope", "qk_norm_rope_",
           "qk_norm_rope_gate", "reference", "rope_cos_sin_cache", "set_debug", "set_pdl"]
