"""Float64 reference of every cuqk op, written plainly with an array module ``xp``.

``xp`` is NumPy for CPU arrays and CuPy when the tests compute the reference on the GPU; both
give the same float64 arithmetic. CPU torch tensors and NumPy arrays passed to the public ops
run these functions (so scripts work on a machine without a GPU), and the tests hold the
kernels to them.
"""

from __future__ import annotations

import numpy as np

NORMS = ("rms", "gemma", "none")
# Relative L2 error the kernels must stay within against this reference: about one rounding to
# the activation dtype at the store, plus float32 arithmetic.
TOLERANCES = {"bfloat16": 2e-3, "float16": 4e-4, "float32": 1e-5}


def norm_rope_heads(x, positions, weight, cos_sin_cache, *, eps=1e-6, is_neox=True,
                    rotary_dim=None, norm="rms", xp=np):
    """Normalise and rotate heads, in float64.

    Parameters
    ----------
    x : array ``[..., H, D]``, any float dtype (computed in float64)
    positions : integer array of shape ``x.shape[:-2]``
    weight : array ``[D]`` or None (no weight)
    cos_sin_cache : array ``[max_position, rotary_dim]``, row p = ``[cos | sin]``
    norm : ``"rms"`` (``x * rsqrt(mean(x^2) + eps) * w``), ``"gemma"`` (``... * (1 + w)``) or
        ``"none"`` (RoPE only)
    is_neox : rotate pairs ``(i, i + rotary_dim/2)`` if true, ``(2i, 2i + 1)`` if false

    Returns
    -------
    float64 array ``[..., H, D]``. Tokens whose position is outside ``[0, max_position)`` get
    NaN in their rotary dims, as the kernels do.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    y = xp.asarray(x, dtype=xp.float64)
    if rotary_dim is None:
        rotary_dim = cos_sin_cache.shape[-1]
    if norm != "none":
        y = y / xp.sqrt(xp.mean(y * y, axis=-1, keepdims=True) + eps)
        if weight is not None:
            w = xp.asarray(weight, dtype=xp.float64)
            y = y * (1.0 + w if norm == "gemma" else w)
    half = rotary_dim // 2
    cache = xp.asarray(cos_sin_cache, dtype=xp.float64)
    pos = xp.asarray(positions).astype(xp.int64)
    valid = (pos >= 0) & (pos < cache.shape[0])
    rows = cache[xp.where(valid, pos, 0)]
    rows = xp.where(valid[..., None], rows, xp.nan)
    cos = rows[..., None, :half]
    sin = rows[..., None, half:2 * half]
    if is_neox:
        a, b = y[..., :half], y[..., half:rotary_dim]
    else:
        a, b = y[..., 0:rotary_dim:2], y[..., 1:rotary_dim:2]
    ra = a * cos - b * sin
    rb = b * cos + a * sin
    out = y.copy()
    if is_neox:
        out[..., :half] = ra
        out[..., half:rotary_dim] = rb
    else:
        out[..., 0:rotary_dim:2] = ra
        out[..., 1:rotary_dim:2] = rb
    return out


def qk_norm_rope(q, k, positions, q_weight, k_weight, cos_sin_cache, **kwargs):
    """Out-of-place reference: float64 ``(q_out, k_out)`` for ``q [..., Hq, D]``, ``k [..., Hk, D]``."""
    return (norm_rope_heads(q, positions, q_weight, cos_sin_cache, **kwargs),
            norm_rope_heads(k, positions, k_weight, cos_sin_cache, **kwargs))


def qkv_norm_rope(qkv, positions, q_weight, k_weight, cos_sin_cache, *, num_q_heads,
                  num_kv_heads, head_dim, **kwargs):
    """Packed reference: float64 copy of ``qkv [..., (Hq + Hk + Hv) * D]`` with q, k heads done."""
    out = qkv.astype(np.float64)
    lead = out.shape[:-1]
    q_end = num_q_heads * head_dim
    k_end = q_end + num_kv_heads * head_dim
    q = out[..., :q_end].reshape(*lead, num_q_heads, head_dim)
    k = out[..., q_end:k_end].reshape(*lead, num_kv_heads, head_dim)
    q_ref, k_ref = qk_norm_rope(q, k, positions, q_weight, k_weight, cos_sin_cache, **kwargs)
    out[..., :q_end] = q_ref.reshape(*lead, q_end)
    out[..., q_end:k_end] = k_ref.reshape(*lead, k_end - q_end)
    return out
