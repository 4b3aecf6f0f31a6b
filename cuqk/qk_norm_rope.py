"""Fused per-head QK RMSNorm + rotary embedding: the public ops and their launch plans.

A call is checked once per distinct geometry (shapes, strides, dtypes, device, pointer
alignment, flags); the result, a ``_Plan``, is cached, so repeated calls only read pointers and
the current stream and launch. Every check runs before anything is launched or written.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple

import numpy as np

from . import _interop, _jit, reference
from ._interop import CPU

NORM_CODES = {"none": 0, "rms": 1, "gemma": 2}
ACTIVATION_DTYPES = ("float16", "bfloat16", "float32")
POSITION_DTYPES = ("int32", "int64")
HEAD_DIMS = tuple(range(32, 513, 16))
_MAX_HEAD_ITEMS = 2**31
_MAX_PLANS = 4096


class _Plan(NamedTuple):
    framework: str
    device: int
    variant: _jit.Variant | None  # None: nothing to launch (CPU, or zero tokens)
    blocks: int
    statics: bytes
    k_offset: int  # bytes from the packed qkv pointer to the first k head
    out_shapes: tuple  # out-of-place: shapes of q_out, k_out
    pointer: object  # the framework's array -> data pointer function
    stream: object  # the framework's device -> current raw stream function
    function: list  # [CUfunction handle], filled at the first launch
    grad_inputs: tuple  # names of torch inputs that require grad


def _refuse_grad(plan):
    """cuqk has no backward yet: refuse rather than return outputs with a silently zero grad."""
    if _interop.grad_enabled():
        raise TypeError(
            f"{', '.join(plan.grad_inputs)} require grad, but cuqk ops have no backward yet; "
            "call them under torch.no_grad() or torch.inference_mode(), or pass detached tensors"
        )


_debug = os.environ.get("CUQK_DEBUG", "") not in ("", "0")


def set_debug(enabled: bool) -> None:
    """Turn on (or off) checks that read data before each launch.

    With debug on, every call first checks that all positions lie in ``[0, max_position)`` and
    raises ``ValueError`` naming the first bad token; this synchronises with the device, so it
    is for finding bugs, not for production. Also on when the environment variable
    ``CUQK_DEBUG`` is set to anything but ``0`` at import.
    """
    global _debug
    _debug = bool(enabled)


def _check_positions(positions, cache):
    max_position = cache.shape[0]
    bad = ((positions < 0) | (positions >= max_position)).reshape(-1)
    if bool(bad.any()):
        # nonzero()[0][0] is the first hit in NumPy, CuPy (tuple of arrays) and torch (n x 1).
        first = int(bad.nonzero()[0][0])
        index = [int(i) for i in np.unravel_index(first, tuple(positions.shape))]
        raise ValueError(
            f"positions{index} = {int(positions.reshape(-1)[first])} is outside "
            f"[0, max_position={max_position}) (cuqk debug check)"
        )


# Plans of each op, keyed on _interop.key of every array plus the flags.
_packed_plans: dict = {}
_split_plans: dict = {}


def _new_plan(plans, key, build, args):
    plan = build(*args)
    try:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plans[key] = plan
    except TypeError:  # an unhashable flag that the checks accepted: just don't cache
        pass
    return plan


def _get_plan(plans, key, build, args):
    try:
        plan = plans.get(key)
    except TypeError:  # an unhashable argument: let the checks name it
        plan = None
    return plan if plan is not None else _new_plan(plans, key, build, args)


# ----------------------------------------------------------------------------- checks


def _require_int(name, value, minimum):
    # numbers.Integral admits NumPy integers (config values often are); bool is refused.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _require_last_dim_contiguous(name, info):
    if info.shape and info.shape[-1] > 1 and info.strides[-1] != 1 and 0 not in info.shape:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {info.strides}")


def _grad_inputs(infos):
    return tuple(n for n, i in infos.items() if i is not None and i.requires_grad)


def _same_place(named_infos):
    """All arrays of one framework and one device; TypeError / ValueError otherwise."""
    first_name, first = named_infos[0]
    for name, inf in named_infos[1:]:
        if inf.framework != first.framework:
            raise TypeError(
                f"{name} is a {inf.framework} array but {first_name} is a {first.framework} "
                "array; pass arrays of one framework"
            )
        if inf.device != first.device:
            where = {CPU: "the CPU"}
            raise ValueError(
                f"{name} is on {where.get(inf.device, f'cuda:{inf.device}')} but {first_name} "
                f"is on {where.get(first.device, f'cuda:{first.device}')}; pass arrays on one "
                "device"
            )


def _check_flags(eps, is_neox, norm):
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not (
        math.isfinite(eps) and eps >= 0
    ):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not isinstance(is_neox, bool):
        raise TypeError(f"is_neox must be a bool, got {is_neox!r}")
    if norm not in NORM_CODES:
        raise ValueError(f"norm must be one of {tuple(NORM_CODES)}, got {norm!r}")


def _check_side_inputs(act_dtype, head_dim, lead, positions, q_weight, k_weight, cache,
                       rotary_dim, norm):
    """Checks shared by both ops; returns ``(rotary_dim, weight_dtype)``."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be a multiple of 16 from 32 to 512, got {head_dim}")
    if positions.dtype not in POSITION_DTYPES:
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    if positions.shape != lead:
        raise ValueError(
            f"positions must have shape {lead} (the leading dims), got {positions.shape}"
        )
    weights = [(n, w) for n, w in (("q_weight", q_weight), ("k_weight", k_weight)) if w]
    if weights and norm == "none":
        raise ValueError("norm='none' takes no weights; pass q_weight=None, k_weight=None")
    for name, w in weights:
        if w.dtype not in (act_dtype, "float32"):
            raise TypeError(f"{name} must be {act_dtype} or float32, got {w.dtype}")
        if w.shape != (head_dim,):
            raise ValueError(f"{name} must have shape ({head_dim},), got {w.shape}")
        _require_last_dim_contiguous(name, w)
    if len(weights) == 2 and weights[0][1].dtype != weights[1][1].dtype:
        raise TypeError(
            f"q_weight and k_weight must share a dtype, got {q_weight.dtype} and {k_weight.dtype}"
        )
    if cache.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"cos_sin_cache must be one of {ACTIVATION_DTYPES}, got {cache.dtype}")
    if len(cache.shape) != 2 or cache.shape[0] < 1:
        raise ValueError(
            f"cos_sin_cache must be [max_position >= 1, rotary_dim], got shape {cache.shape}"
        )
    _require_last_dim_contiguous("cos_sin_cache", cache)
    width = cache.shape[1]
    if rotary_dim is None:
        rotary_dim = width
    _require_int("rotary_dim", rotary_dim, 2)
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and <= head_dim={head_dim}, got {rotary_dim}")
    if rotary_dim != width:
        raise ValueError(
            f"cos_sin_cache must be [max_position, rotary_dim={rotary_dim}] (cos | sin halves), "
            f"got width {width}"
        )
    return rotary_dim, weights[0][1].dtype if weights else act_dtype


def _collapse_leading(shape, strides_per_array):
    """Fold leading dims into at most (outer, inner) with one stride pair per array.

    Returns ``((n_outer, n_inner), [(stride_outer, stride_inner), ...])`` or None when the
    strides need more than two dims.
    """
    dims = [(n, [s[i] for s in strides_per_array]) for i, n in enumerate(shape) if n != 1]
    merged = []
    for n, strides in dims:
        if merged and all(p == s * n for p, s in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * n, strides)
        else:
            merged.append((n, strides))
    if len(merged) > 2:
        return None
    while len(merged) < 2:
        merged.append((1, [0] * len(strides_per_array)))
    (n_outer, outer), (n_inner, inner) = merged
    return (n_outer, n_inner), list(zip(outer, inner))


def _aligned(ptr_or_stride_bytes, alignment):
    return ptr_or_stride_bytes % alignment == 0


def _build_plan(fw, device, act_dtype, lead, heads, positions, q_weight, k_weight, cache, *,
                num_q_heads, num_k_heads, head_dim, rotary_dim, weight_dtype, eps, is_neox,
                norm, grad_inputs=(), k_offset=0, out_shapes=()):
    """Common tail of planning. ``heads`` is four (ptr, lead strides, head stride) for
    q_in, k_in, q_out, k_out, in elements (pointers in bytes)."""
    num_tokens = math.prod(lead)
    if num_tokens * (num_q_heads + num_k_heads) >= _MAX_HEAD_ITEMS:
        raise ValueError(
            f"{num_tokens} tokens x {num_q_heads + num_k_heads} heads exceeds 2**31 heads per call"
        )
    pointer = _interop.POINTERS[fw]
    if device == CPU or num_tokens == 0:
        return _Plan(fw, device, None, 0, b"", k_offset, out_shapes, pointer, None, [],
                     grad_inputs)
    folded = _collapse_leading(lead, [h[1] for h in heads] + [positions.strides])
    if folded is None:
        raise ValueError(
            f"the leading dims {lead} of the inputs cannot be addressed with two strides; "
            "make them contiguous"
        )
    (_, n_inner), lead_strides = folded

    itemsize = _jit.DTYPES[act_dtype][1]
    vec = _jit.wide_vec(act_dtype)
    data_ok = all(
        _aligned(ptr, 16) and all(_aligned(s * itemsize, 16) for s in (*lst, hs))
        for (ptr, _, hs), lst in zip(heads, lead_strides)
    )
    side_ok = [
        _aligned(a.ptr, min(16, vec * _jit.DTYPES[a.dtype][1])) for a in (q_weight, k_weight, cache)
        if a is not None
    ]
    if not (data_ok and all(side_ok) and rotary_dim % (2 * vec) == 0
            and cache.strides[0] % vec == 0):
        vec = 1
    lanes, units = _jit.lanes_and_units(head_dim, vec)
    total_heads = num_tokens * (num_q_heads + num_k_heads)
    variant = _jit.select_variant(act_dtype, is_neox, vec, units)

    statics = {
        "pos_stride_outer": lead_strides[4][0], "pos_stride_inner": lead_strides[4][1],
        "pos_is_int64": positions.dtype == "int64",
        "cache_row_stride": cache.strides[0], "max_position": cache.shape[0],
        "cache_dtype": _jit.DTYPES[cache.dtype][2], "weight_dtype": _jit.DTYPES[weight_dtype][2],
        "num_tokens": num_tokens, "tokens_inner": n_inner,
        "num_q_heads": num_q_heads, "num_k_heads": num_k_heads, "head_dim": head_dim,
        "rotary_dim": rotary_dim, "norm_mode": NORM_CODES[norm], "lanes_per_head": lanes,
    }
    for prefix, (_, _, head_stride), (outer, inner) in zip(
        ("q_in", "k_in", "q_out", "k_out"), heads, lead_strides
    ):
        statics[f"{prefix}_outer"], statics[f"{prefix}_inner"] = outer, inner
        statics[f"{prefix}_head"] = head_stride
    heads_per_block = _jit.BLOCK_THREADS // lanes
    blocks = min(-(-total_heads // heads_per_block), 2**31 - 1)
    return _Plan(fw, device, variant, blocks, _jit.pack_statics(statics, eps), k_offset,
                 out_shapes, pointer, _interop.stream_getter(fw), [], grad_inputs)


def _plan_packed(qkv, positions, q_weight, k_weight, cache, num_q_heads, num_kv_heads,
                 head_dim, num_v_heads, eps, is_neox, rotary_dim, norm):
    _check_flags(eps, is_neox, norm)
    for name, value, minimum in (("num_q_heads", num_q_heads, 1),
                                 ("num_kv_heads", num_kv_heads, 1),
                                 ("head_dim", head_dim, 1)):
        _require_int(name, value, minimum)
    num_v_heads = num_kv_heads if num_v_heads is None else num_v_heads
    _require_int("num_v_heads", num_v_heads, 0)
    named = [("qkv", qkv), ("positions", positions), ("q_weight", q_weight),
             ("k_weight", k_weight), ("cos_sin_cache", cache)]
    infos = {n: (_interop.info(a) if a is not None else None) for n, a in named}
    _same_place([(n, i) for n, i in infos.items() if i is not None])
    q = infos["qkv"]
    if q.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"qkv must be one of {ACTIVATION_DTYPES}, got {q.dtype}")
    width = (num_q_heads + num_kv_heads + num_v_heads) * head_dim
    if not q.shape or q.shape[-1] != width:
        raise ValueError(
            f"qkv must be [..., (num_q_heads + num_kv_heads + num_v_heads) * head_dim = {width}],"
            f" got shape {q.shape}"
        )
    _require_last_dim_contiguous("qkv", q)
    lead = q.shape[:-1]
    rotary_dim, weight_dtype = _check_side_inputs(
        q.dtype, head_dim, lead, infos["positions"], infos["q_weight"], infos["k_weight"],
        infos["cos_sin_cache"], rotary_dim, norm)
    k_offset = num_q_heads * head_dim * _jit.DTYPES[q.dtype][1]
    lead_strides = q.strides[:-1]
    heads = [(q.ptr, lead_strides, head_dim), (q.ptr + k_offset, lead_strides, head_dim)] * 2
    return _build_plan(
        q.framework, q.device, q.dtype, lead, heads, infos["positions"], infos["q_weight"],
        infos["k_weight"], infos["cos_sin_cache"], num_q_heads=num_q_heads,
        num_k_heads=num_kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
        weight_dtype=weight_dtype, eps=eps, is_neox=is_neox, norm=norm,
        grad_inputs=_grad_inputs(infos), k_offset=k_offset)


def _plan_split(q, k, positions, q_weight, k_weight, cache, eps, is_neox, rotary_dim, norm):
    _check_flags(eps, is_neox, norm)
    named = [("q", q), ("k", k), ("positions", positions), ("q_weight", q_weight),
             ("k_weight", k_weight), ("cos_sin_cache", cache)]
    infos = {n: (_interop.info(a) if a is not None else None) for n, a in named}
    _same_place([(n, i) for n, i in infos.items() if i is not None])
    qi, ki = infos["q"], infos["k"]
    for name, inf in (("q", qi), ("k", ki)):
        if inf.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"{name} must be one of {ACTIVATION_DTYPES}, got {inf.dtype}")
        if len(inf.shape) < 2:
            raise ValueError(f"{name} must be [..., heads, head_dim], got shape {inf.shape}")
        _require_last_dim_contiguous(name, inf)
    if ki.dtype != qi.dtype:
        raise TypeError(f"k must have q's dtype {qi.dtype}, got {ki.dtype}")
    if ki.shape[:-2] != qi.shape[:-2] or ki.shape[-1] != qi.shape[-1]:
        raise ValueError(
            f"k must be [{', '.join(map(str, qi.shape[:-2] + ('heads', qi.shape[-1])))}] to "
            f"match q {qi.shape}, got {ki.shape}"
        )
    head_dim = qi.shape[-1]
    lead = qi.shape[:-2]
    rotary_dim, weight_dtype = _check_side_inputs(
        qi.dtype, head_dim, lead, infos["positions"], infos["q_weight"], infos["k_weight"],
        infos["cos_sin_cache"], rotary_dim, norm)
    num_q_heads, num_k_heads = qi.shape[-2], ki.shape[-2]
    for name, count in (("q", num_q_heads), ("k", num_k_heads)):
        if count < 1:
            raise ValueError(f"{name} must have at least one head, got shape {infos[name].shape}")

    def contiguous_lead_strides(heads):
        strides, step = [], heads * head_dim
        for n in reversed(lead):
            strides.append(step)
            step *= n
        return tuple(reversed(strides))

    heads = [(qi.ptr, qi.strides[:-2], qi.strides[-2]), (ki.ptr, ki.strides[:-2], ki.strides[-2]),
             (0, contiguous_lead_strides(num_q_heads), head_dim),
             (0, contiguous_lead_strides(num_k_heads), head_dim)]
    return _build_plan(
        qi.framework, qi.device, qi.dtype, lead, heads, infos["positions"], infos["q_weight"],
        infos["k_weight"], infos["cos_sin_cache"], num_q_heads=num_q_heads,
        num_k_heads=num_k_heads, head_dim=head_dim, rotary_dim=rotary_dim,
        weight_dtype=weight_dtype, eps=eps, is_neox=is_neox, norm=norm,
        grad_inputs=_grad_inputs(infos), out_shapes=(qi.shape, ki.shape))


# ----------------------------------------------------------------------------- launching


def _launch(plan, pointers):
    device = plan.device
    stream = plan.stream(device)
    if not plan.function:
        plan.function.append(_jit.get_function(plan.variant, device, stream))
    _jit.launch(plan.function[0], plan.blocks, stream, device, pointers, plan.statics)


def _reference_packed(qkv, positions, q_weight, k_weight, cache, *, num_q_heads, num_kv_heads,
                      head_dim, **kwargs):
    k_end = (num_q_heads + num_kv_heads) * head_dim
    ref = reference.qkv_norm_rope(
        _interop.to_float64(qkv), _interop.to_numpy(positions), _interop.to_float64(q_weight),
        _interop.to_float64(k_weight), _interop.to_float64(cache), num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, **kwargs)
    _interop.write_from_float64(qkv[..., :k_end], ref[..., :k_end])


def qk_norm_rope_(qkv, positions, q_weight, k_weight, cos_sin_cache, *, num_q_heads,
                  num_kv_heads, head_dim, num_v_heads=None, eps=1e-6, is_neox=True,
                  rotary_dim=None, norm="rms"):
    """Normalise and rotate the q and k heads of a packed ``qkv`` in place.

    Per head, in float32: ``norm="rms"``: ``x * rsqrt(mean(x^2) + eps) * w``;
    ``norm="gemma"``: the same with ``(1 + w)``; ``norm="none"``: no norm. Then RoPE with
    ``c, s`` from row ``positions[t]`` of ``cos_sin_cache``: NeoX (``is_neox=True``) rotates
    pairs ``(i, i + rotary_dim/2)``, GPT-J rotates ``(2i, 2i + 1)``, as
    ``(a, b) -> (a*c - b*s, b*c + a*s)``; dims past ``rotary_dim`` are normalised only. One
    rounding to the activation dtype at the store.

    Parameters
    ----------
    qkv : ``[..., (Hq + Hk + Hv) * D]`` float16, bfloat16 or float32; q | k | v heads per row.
        Any leading dims; last dim contiguous; rows may be strided (a view of a wider buffer).
        V heads are left bit-for-bit untouched.
    positions : int32 or int64, shape ``qkv.shape[:-1]``. A position outside
        ``[0, max_position)`` never reads outside the cache: its token's rotary dims become NaN.
    q_weight, k_weight : ``[D]`` in qkv's dtype or float32, or None for no weight.
    cos_sin_cache : ``[max_position, rotary_dim]`` float32, float16 or bfloat16;
        row p = ``[cos(p*f_0 .. p*f_{r/2-1}) | sin(...)]``.
    num_q_heads, num_kv_heads, head_dim : Hq, Hk and D; D a multiple of 16 from 32 to 512.
    num_v_heads : Hv, default ``num_kv_heads``.
    rotary_dim : even, 2 to D; defaults to (and must equal) ``cos_sin_cache.shape[1]``.

    Returns ``qkv``. CUDA arrays (torch, CuPy) run on the caller's current stream on their
    device; CPU torch tensors and NumPy arrays run ``cuqk.reference``.
    """
    key = _interop.key
    plan = _get_plan(
        _packed_plans,
        # Types too: True == 1 == 1.0, and a mistyped flag must not reuse a checked plan.
        (key(qkv), key(positions), key(q_weight), key(k_weight), key(cos_sin_cache),
         num_q_heads, num_kv_heads, head_dim, num_v_heads, eps, is_neox, rotary_dim, norm,
         type(num_q_heads), type(num_kv_heads), type(head_dim), type(num_v_heads), type(eps),
         type(is_neox), type(rotary_dim)),
        _plan_packed,
        (qkv, positions, q_weight, k_weight, cos_sin_cache, num_q_heads, num_kv_heads,
         head_dim, num_v_heads, eps, is_neox, rotary_dim, norm))
    if plan.grad_inputs:
        _refuse_grad(plan)
    if _debug:
        _check_positions(positions, cos_sin_cache)
    if plan.variant is not None:
        ptr = plan.pointer
        base = ptr(qkv)
        k_base = base + plan.k_offset
        _launch(plan, (base, k_base, base, k_base, ptr(positions), ptr(cos_sin_cache),
                       0 if q_weight is None else ptr(q_weight),
                       0 if k_weight is None else ptr(k_weight)))
    elif plan.device == CPU:
        _reference_packed(qkv, positions, q_weight, k_weight, cos_sin_cache,
                          num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, eps=eps, is_neox=is_neox, rotary_dim=rotary_dim,
                          norm=norm)
    return qkv


def qk_norm_rope(q, k, positions, q_weight, k_weight, cos_sin_cache, *, eps=1e-6, is_neox=True,
                 rotary_dim=None, norm="rms"):
    """Out-of-place ``qk_norm_rope_`` on separate q and k heads.

    Parameters
    ----------
    q, k : ``[..., Hq, D]`` and ``[..., Hk, D]``, one float dtype, any strides except a
        contiguous last dim (e.g. views sliced out of a packed qkv).
    positions, q_weight, k_weight, cos_sin_cache, eps, is_neox, rotary_dim, norm :
        as in ``qk_norm_rope_``.

    Returns
    -------
    ``(q_out, k_out)``: new contiguous arrays of q's and k's shapes, of the caller's type.
    """
    key = _interop.key
    plan = _get_plan(
        _split_plans,
        (key(q), key(k), key(positions), key(q_weight), key(k_weight), key(cos_sin_cache), eps,
         is_neox, rotary_dim, norm, type(eps), type(is_neox), type(rotary_dim)),
        _plan_split,
        (q, k, positions, q_weight, k_weight, cos_sin_cache, eps, is_neox, rotary_dim, norm))
    if plan.grad_inputs:
        _refuse_grad(plan)
    if _debug:
        _check_positions(positions, cos_sin_cache)
    q_out = _interop.empty(plan.framework, plan.out_shapes[0], q)
    k_out = _interop.empty(plan.framework, plan.out_shapes[1], k)
    if plan.variant is not None:
        ptr = plan.pointer
        _launch(plan, (ptr(q), ptr(k), ptr(q_out), ptr(k_out), ptr(positions),
                       ptr(cos_sin_cache), 0 if q_weight is None else ptr(q_weight),
                       0 if k_weight is None else ptr(k_weight)))
    elif plan.device == CPU:
        kwargs = {"eps": eps, "is_neox": is_neox, "rotary_dim": rotary_dim, "norm": norm}
        q_ref, k_ref = reference.qk_norm_rope(
            _interop.to_float64(q), _interop.to_float64(k), _interop.to_numpy(positions),
            _interop.to_float64(q_weight), _interop.to_float64(k_weight),
            _interop.to_float64(cos_sin_cache), **kwargs)
        _interop.write_from_float64(q_out, q_ref)
        _interop.write_from_float64(k_out, k_ref)
    return q_out, k_out
