"""Host-side builder of the ``[cos | sin]`` RoPE cache that the cuqk kernels read.

Holds :func:`rope_cos_sin_cache`, which turns a rotary width, a base and a Hugging Face style
``rope_scaling`` dict into the float32 table, and :func:`rope_inv_freq`, the per-pair inverse
frequencies and cos/sin scale it is built from. Pure NumPy, so it runs without torch or a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import numpy as np

__all__ = ["ROPE_TYPES", "rope_cos_sin_cache", "rope_inv_freq"]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_POSITIVE_KEYS = ("factor", "original_max_position_embeddings", "low_freq_factor",
                  "high_freq_factor")


def _int_arg(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _number(scaling, key, rope_type, required=True):
    value = scaling.get(key)
    if value is None:
        if required:
            raise ValueError(f"scaling[{key!r}] is required for rope_type {rope_type!r}")
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"scaling[{key!r}] must be a number, got {value!r}") from None
    # These enter logs and divisions, where <= 0 gives nan, inf or ZeroDivisionError.
    if key in _POSITIVE_KEYS and not value > 0:
        raise ValueError(f"scaling[{key!r}] must be > 0, got {value!r}")
    return value


def _yarn_mscale(factor, mscale):
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_ramp_dim(rotations, rotary_dim, base, original):
    # Pair index whose wavelength fits `rotations` times into the original context.
    return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(rotary_dim, *, base=10000.0, scaling=None, seq_len=None):
    """Inverse frequencies and cos/sin scale for one RoPE configuration, in float64.

    Same arguments as :func:`rope_cos_sin_cache`, except that ``seq_len=None`` means "no
    longer than ``original_max_position_embeddings``" (no NTK adjustment for ``dynamic``).

    Returns
    -------
    inv_freq : numpy.ndarray, float64, shape ``[rotary_dim // 2]``
    attention_factor : float
        Multiplier applied to both cos and sin (1.0 except for ``yarn``).
    """
    rotary_dim = _int_arg("rotary_dim", rotary_dim, 2)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    if isinstance(base, bool) or not isinstance(base, Real) or not 1 < base < math.inf:
        raise ValueError(f"base must be a finite number > 1, got {base!r}")
    base = float(base)
    if seq_len is not None:
        seq_len = _int_arg("seq_len", seq_len, 1)
    if scaling is None:
        scaling = {}
    if not isinstance(scaling, Mapping):
        raise TypeError(f"scaling must be a dict or None, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"scaling['rope_type'] must be one of {ROPE_TYPES}, got {rope_type!r}")
    # transformers >= 5 keeps rope_theta inside the dict; a silent mismatch would be a wrong cache.
    theta = _number(scaling, "rope_theta", rope_type, required=False)
    if theta is not None and theta != base:
        raise ValueError(f"scaling['rope_theta'] = {theta} conflicts with base = {base}")

    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    attention_factor = 1.0

    if rope_type == "default":
        return base ** -exponents, attention_factor
    factor = _number(scaling, "factor", rope_type)
    if rope_type == "linear":
        return base ** -exponents / factor, attention_factor
    original = _number(scaling, "original_max_position_embeddings", rope_type)

    if rope_type == "dynamic":
        if rotary_dim < 4:
            raise ValueError(f"rotary_dim must be >= 4 for rope_type 'dynamic', got {rotary_dim}")
        # Shorter sequences keep the trained base: NTK only ever stretches the context.
        length = original if seq_len is None else max(float(seq_len), original)
        stretch = factor * length / original - (factor - 1.0)
        return (base * stretch ** (rotary_dim / (rotary_dim - 2))) ** -exponents, attention_factor

    if rope_type == "yarn":
        attention_factor = _number(scaling, "attention_factor", rope_type, required=False)
        if attention_factor is None:
            mscale = _number(scaling, "mscale", rope_type, required=False)
            mscale_all_dim = _number(scaling, "mscale_all_dim", rope_type, required=False)
            # DeepSeek-style configs give both; either one zero or absent means the plain formula.
            if mscale and mscale_all_dim:
                attention_factor = (_yarn_mscale(factor, mscale)
                                    / _yarn_mscale(factor, mscale_all_dim))
            else:
                attention_factor = _yarn_mscale(factor, 1.0)
        # transformers treats 0 like absent here (`or`), so do the same.
        beta_fast = _number(scaling, "beta_fast", rope_type, required=False) or 32.0
        beta_slow = _number(scaling, "beta_slow", rope_type, required=False) or 1.0
        low = _yarn_ramp_dim(beta_fast, rotary_dim, base, original)
        high = _yarn_ramp_dim(beta_slow, rotary_dim, base, original)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        if low == high:
            high += 0.001  # a zero-width ramp would divide by zero
        ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        # ramp 0: fast pairs extrapolate unchanged; ramp 1: slow pairs interpolate by `factor`.
        return base ** -exponents * (1.0 - ramp + ramp / factor), attention_factor

    # llama3
    low_freq_factor = _number(scaling, "low_freq_factor", rope_type)
    high_freq_factor = _number(scaling, "high_freq_factor", rope_type)
    if not high_freq_factor > low_freq_factor:
        raise ValueError(f"scaling['high_freq_factor'] ({high_freq_factor}) must be greater "
                         f"than scaling['low_freq_factor'] ({low_freq_factor})")
    inv_freq = base ** -exponents
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    # Short wavelengths stay, long ones are divided by `factor`, the band between is blended.
    scaled = np.where(wavelen > original / low_freq_factor, inv_freq / factor, inv_freq)
    medium = (wavelen >= original / high_freq_factor) & (wavelen <= original / low_freq_factor)
    return np.where(medium, blended, scaled), attention_factor


def rope_cos_sin_cache(max_position, rotary_dim, *, base=10000.0, scaling=None, seq_len=None):
    """Build the RoPE cos/sin cache that ``qk_norm_rope`` takes as ``cos_sin_cache``.

    Computed in float64 and rounded to float32 once. Frequencies and the cos/sin scale follow
    Hugging Face transformers' RoPE initialisation for each supported ``rope_type``.

    Parameters
    ----------
    max_position : int >= 1
        Number of rows (positions ``0 .. max_position - 1``).
    rotary_dim : even int >= 2
        Rotated width per head; ``int(head_dim * partial_rotary_factor)`` for partial RoPE.
    base : float > 1, default 10000.0
        RoPE theta (``rope_theta``). If ``scaling`` also holds ``rope_theta`` it must be equal.
    scaling : dict or None
        A transformers ``rope_scaling`` / ``rope_parameters`` dict. The type is read from
        ``rope_type`` (or the older ``type``); other keys not listed here are ignored.

        - ``"default"`` or ``None``: ``base ** (-2i / rotary_dim)``.
        - ``"linear"``: ``factor`` (frequencies divided by it).
        - ``"dynamic"``: ``factor``, ``original_max_position_embeddings`` (the length the
          base was trained for; transformers reads ``config.max_position_embeddings``
          instead). NTK-aware base stretch for ``seq_len``; needs ``rotary_dim >= 4``.
        - ``"yarn"``: ``factor``, ``original_max_position_embeddings``; optional
          ``beta_fast`` (32), ``beta_slow`` (1), ``mscale``, ``mscale_all_dim``,
          ``attention_factor`` (overrides the one derived from ``factor``/``mscale``) and
          ``truncate`` (True: round the ramp ends to whole pairs).
        - ``"llama3"``: ``factor``, ``low_freq_factor``, ``high_freq_factor`` (greater than
          ``low_freq_factor``), ``original_max_position_embeddings``.

        ``original_max_position_embeddings`` must be in the dict: unlike transformers there is
        no model config to fall back on.
    seq_len : int >= 1 or None
        Sequence length for ``dynamic`` (ignored otherwise); defaults to ``max_position``.

    Returns
    -------
    numpy.ndarray, float32, shape ``[max_position, rotary_dim]``
        Row ``p`` is ``[cos(p * f_0) .. cos(p * f_{r/2-1}) | sin(p * f_0) .. sin(p * f_{r/2-1})]``
        times the attention factor (yarn only; 1.0 for the other types).

    Raises
    ------
    ValueError
        Bad ``max_position``, ``rotary_dim``, ``base`` or ``seq_len``, an unknown type, or a
        missing or invalid scaling key; the message names the argument or key.
    """
    max_position = _int_arg("max_position", max_position, 1)
    if seq_len is None:
        seq_len = max_position
    inv_freq, attention_factor = rope_inv_freq(rotary_dim, base=base, scaling=scaling,
                                               seq_len=seq_len)
    angles = np.arange(max_position, dtype=np.float64)[:, None] * inv_freq[None, :]
    cache = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    if attention_factor != 1.0:
        cache *= attention_factor
    return cache.astype(np.float32)
