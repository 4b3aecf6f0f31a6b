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


def mrope_frequency_sections(half, mrope_section, interleaved):
    """Which of the three position rows (temporal, height, width) frequency ``j`` reads.

    Sectioned (Qwen2-VL, Qwen2.5-VL): ``j < s0`` -> 0, ``j < s0 + s1`` -> 1, else 2.
    Interleaved (Qwen3-VL): 1 if ``j % 3 == 1 and j < 3 * s1``, 2 if ``j % 3 == 2 and
    j < 3 * s2``, else 0. Returns an int64 NumPy array of length ``half``.
    """
    s0, s1, s2 = mrope_section
    j = np.arange(half)
    if interleaved:
        return np.where((j % 3 == 1) & (j < 3 * s1), 1, np.where((j % 3 == 2) & (j < 3 * s2), 2, 0))
    return np.where(j < s0, 0, np.where(j < s0 + s1, 1, 2))


def _cos_sin(positions, cache, lead, half, mrope_section, mrope_interleaved, xp):
    """Per-token float64 ``(cos, sin)`` of shape ``lead + (half,)``; NaN where out of range."""
    if positions is None:
        n = int(np.prod(lead, dtype=np.int64))
        pos = xp.arange(n, dtype=xp.int64).reshape(lead)
    else:
        pos = xp.asarray(positions).astype(xp.int64)
    valid = (pos >= 0) & (pos < cache.shape[0])
    rows = xp.where(valid[..., None], cache[xp.where(valid, pos, 0)][..., :2 * half], xp.nan)
    if mrope_section is None:
        return rows[..., :half], rows[..., half:]
    # rows is [3, *lead, rotary_dim]; frequency j takes row sec[j] of the three.
    sec = xp.asarray(mrope_frequency_sections(half, mrope_section, mrope_interleaved))
    j = xp.arange(half)
    return xp.moveaxis(rows[sec, ..., j], 0, -1), xp.moveaxis(rows[sec, ..., half + j], 0, -1)


def _rotate(y, cos, sin, rotary_dim, is_neox):
    half = rotary_dim // 2
    if is_neox:
        a, b = y[..., :half], y[..., half:rotary_dim]
    else:
        a, b = y[..., 0:rotary_dim:2], y[..., 1:rotary_dim:2]
    out = y.copy()
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if is_neox:
        out[..., :half], out[..., half:rotary_dim] = ra, rb
    else:
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = ra, rb
    return out


def _normalise(y, weight, eps, norm, xp):
    if norm == "none":
        return y
    y = y / xp.sqrt(xp.mean(y * y, axis=-1, keepdims=True) + eps)
    if weight is not None:
        w = xp.asarray(weight, dtype=xp.float64)
        y = y * (1.0 + w if norm == "gemma" else w)
    return y


def norm_rope_heads(x, positions, weight, cos_sin_cache, *, eps=1e-6, is_neox=True,
                    rotary_dim=None, norm="rms", rope_first=False, mrope_section=None,
                    mrope_interleaved=False, xp=np):
    """Normalise and rotate heads, in float64.

    Parameters
    ----------
    x : array ``[..., H, D]``, any float dtype (computed in float64)
    positions : integer array of shape ``x.shape[:-2]`` (``(3,) + x.shape[:-2]`` with
        ``mrope_section``), or None: token ``t`` (row-major over the leading dims) reads row t
    weight : array ``[D]`` or None (no weight)
    cos_sin_cache : array ``[max_position, rotary_dim]``, row p = ``[cos | sin]``
    norm : ``"rms"`` (``x * rsqrt(mean(x^2) + eps) * w``), ``"gemma"`` (``... * (1 + w)``) or
        ``"none"`` (RoPE only)
    is_neox : rotate pairs ``(i, i + rotary_dim/2)`` if true, ``(2i, 2i + 1)`` if false
    rope_first : rotate, then normalise (the norm sees the rotated head)
    mrope_section : ``(s0, s1, s2)`` summing to ``rotary_dim / 2``: frequency ``j`` reads the
        cache row of position row ``mrope_frequency_sections(...)[j]``

    Returns
    -------
    float64 array ``[..., H, D]``. A frequency whose position is outside ``[0, max_position)``
    gets NaN in its rotated pair, as the kernels do.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    y = xp.asarray(x, dtype=xp.float64)
    if rotary_dim is None:
        rotary_dim = cos_sin_cache.shape[-1]
    cache = xp.asarray(cos_sin_cache, dtype=xp.float64)
    cos, sin = _cos_sin(positions, cache, y.shape[:-2], rotary_dim // 2, mrope_section,
                        mrope_interleaved, xp)
    cos, sin = cos[..., None, :], sin[..., None, :]
    if rope_first:
        return _normalise(_rotate(y, cos, sin, rotary_dim, is_neox), weight, eps, norm, xp)
    return _rotate(_normalise(y, weight, eps, norm, xp), cos, sin, rotary_dim, is_neox)


def qk_norm_rope(q, k, positions, q_weight, k_weight, cos_sin_cache, **kwargs):
    """Out-of-place reference: float64 ``(q_out, k_out)`` for ``q [..., Hq, D]`` and
    ``k [..., Hk, D]``."""
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


def qk_norm_rope_gate(q_gate, k, positions, q_weight, k_weight, cos_sin_cache, *, num_q_heads,
                      num_kv_heads, head_dim, **kwargs):
    """Gated-attention reference: float64 ``(q_out, k_out, gate)`` for ``q_gate
    [..., Hq * 2 * D]`` (each head ``[q | gate]``) and ``k [..., Hk * D]``; outputs
    ``[..., Hq * D]``, ``[..., Hk * D]``, ``[..., Hq * D]``."""
    lead = q_gate.shape[:-1]
    heads = q_gate.reshape(*lead, num_q_heads, 2, head_dim)
    q_ref, k_ref = qk_norm_rope(heads[..., 0, :], k.reshape(*lead, num_kv_heads, head_dim),
                                positions, q_weight, k_weight, cos_sin_cache, **kwargs)
    gate = heads[..., 1, :].astype(np.float64).reshape(*lead, num_q_heads * head_dim)
    return (q_ref.reshape(*lead, num_q_heads * head_dim),
            k_ref.reshape(*lead, num_kv_heads * head_dim), gate)
