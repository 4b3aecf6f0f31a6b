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
    blocks: int  # one thread per lane of every head; launches cap it at the resident grid
    statics: bytes
    k_offset: int  # bytes from the packed qkv pointer to the first k head
    out_shapes: tuple  # out-of-place: shapes of q_out, k_out
    pointer: object  # the framework's array -> data pointer function
    stream: object  # the framework's device -> current raw stream function
    function: list  # [CUfunction handle, grid size], filled at the first launch
    grad_inputs: tuple  # names of torch inputs that require grad
    # Aliasing: the _overlap_pairs of the arrays the kernel writes and those it reads; a call
    # whose live pointers make a written byte range meet another gets the exact check again.
    overlap_pairs: tuple = ()


def _refuse_grad(names):
    """cuqk has no backward yet: refuse rather than return outputs with a silently zero grad.
    ``names``: the inputs that require grad."""
    if _interop.grad_enabled():
        raise TypeError(
            f"{', '.join(names)} require grad, but cuqk ops have no backward yet; "
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
_gate_plans: dict = {}


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


def _check_flags(eps, is_neox, norm, rope_first, mrope_interleaved):
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not (
        math.isfinite(eps) and eps >= 0
    ):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    for name, value in (("is_neox", is_neox), ("rope_first", rope_first),
                        ("mrope_interleaved", mrope_interleaved)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if norm not in NORM_CODES:
        raise ValueError(f"norm must be one of {tuple(NORM_CODES)}, got {norm!r}")


def _check_mrope_section(mrope_section, rotary_dim):
    if mrope_section is None:
        return
    if not isinstance(mrope_section, (tuple, list)) or len(mrope_section) != 3:
        raise ValueError(f"mrope_section must be three ints (s0, s1, s2), got {mrope_section!r}")
    for value in mrope_section:
        _require_int("each mrope_section entry", value, 0)
    if sum(mrope_section) != rotary_dim // 2:
        raise ValueError(
            f"mrope_section must sum to rotary_dim // 2 = {rotary_dim // 2}, got "
            f"{tuple(mrope_section)} (sum {sum(mrope_section)})"
        )


def _check_side_inputs(act_dtype, head_dim, lead, positions, q_weight, k_weight, cache,
                       rotary_dim, norm, mrope_section):
    """Checks shared by every op; returns ``(rotary_dim, weight_dtype)``."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be a multiple of 16 from 32 to 512, got {head_dim}")
    if positions is None:
        if mrope_section is not None:
            raise ValueError("mrope_section needs positions of shape (3, *leading dims), got None")
    else:
        if positions.dtype not in POSITION_DTYPES:
            raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
        want = lead if mrope_section is None else (3, *lead)
        if positions.shape != want:
            what = "the leading dims" if mrope_section is None else "3 x the leading dims"
            raise ValueError(f"positions must have shape {want} ({what}), got {positions.shape}")
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
    _check_mrope_section(mrope_section, rotary_dim)
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


def _outputs_at_input_offsets(heads, lead_strides, itemsize):
    """Whether every q_out and k_out head starts at its q_in or k_in head's address modulo 16
    bytes (``heads`` and ``lead_strides`` as in ``_build_plan``)."""
    def places(i):
        (ptr, _, head_stride), lead = heads[i], lead_strides[i]
        return ptr % 16, tuple(s * itemsize % 16 for s in (*lead, head_stride))
    return places(0) == places(2) and places(1) == places(3)


def _itemsize(dtype):
    return _jit.DTYPES[dtype][1] if dtype in _jit.DTYPES else np.dtype(dtype).itemsize


def _byte_span(inf):
    """``(first, end)`` bytes, relative to ``inf.ptr``, that an array's elements can occupy."""
    itemsize = _itemsize(inf.dtype)
    if 0 in inf.shape:
        return 0, 0
    low = sum(min(0, (n - 1) * st) for n, st in zip(inf.shape, inf.strides))
    high = sum(max(0, (n - 1) * st) for n, st in zip(inf.shape, inf.strides))
    return low * itemsize, (high + 1) * itemsize


class _AddressOnly:
    """An ``__array_interface__`` over device addresses: NumPy's overlap solver reads only the
    pointer, shape and strides, never the memory."""

    def __init__(self, inf):
        itemsize = _itemsize(inf.dtype)
        self.__array_interface__ = {
            "data": (inf.ptr, True), "shape": inf.shape, "typestr": f"|V{itemsize}",
            "strides": tuple(st * itemsize for st in inf.strides), "version": 3}


def _shares_memory(a, b):
    if 0 in a.shape or 0 in b.shape:
        return False
    try:
        return bool(np.shares_memory(np.asarray(_AddressOnly(a)), np.asarray(_AddressOnly(b)),
                                     max_work=100_000))
    except np.exceptions.TooHardError:  # undecided: assume the worst
        return True


# Outputs that may be exactly the input they replace (in place, each thread reads its
# elements before it writes them).
_SAME_VIEW_OK = {"out[0]": "q", "out[1]": "k"}


def _check_no_overlap(written, read):
    """Raise ValueError if an array the kernel writes shares memory with another argument.

    ``written`` and ``read`` are ``(name, ArrayInfo)`` pairs. Interleaved views that share no
    element (q and k heads sliced out of one qkv) are fine; any shared element would race.
    """
    for i, (name, out) in enumerate(written):
        for other_name, other in [(n, a) for n, a in read if a is not None] + written[i + 1:]:
            if _SAME_VIEW_OK.get(name) == other_name and (other.ptr, other.shape,
                                                          other.strides) == (out.ptr, out.shape,
                                                                             out.strides):
                continue
            if _shares_memory(out, other):
                raise ValueError(
                    f"{name} overlaps {other_name} in memory; the kernel writes {name}, so it "
                    "must not share memory with another argument (pass copies)"
                )


def _overlap_pairs(written, read, index):
    """For each pair of a written array and another present array (a later written one or a
    read one, so no pair twice): (written pointer index, other pointer index, lo, hi), where
    their byte ranges meet iff lo < written ptr - other ptr < hi."""
    pairs = []
    for i, (w_name, w_info) in enumerate(written):
        w_first, w_end = _byte_span(w_info)
        for r_name, r_info in written[i + 1:] + read:
            if r_info is not None and index[r_name] != index[w_name]:
                r_first, r_end = _byte_span(r_info)
                pairs.append((index[w_name], index[r_name], r_first - w_end, r_end - w_first))
    return tuple(pairs)


def _ranges_meet(plan, pointers):
    """Cheap per-call test on the live pointers: may a written array overlap another?"""
    for w_index, r_index, lo, hi in plan.overlap_pairs:
        r_ptr = pointers[r_index]
        if r_ptr and lo < pointers[w_index] - r_ptr < hi:
            return True
    return False


def _build_plan(fw, device, act_dtype, lead, heads, positions, q_weight, k_weight, cache, *,
                num_q_heads, num_k_heads, head_dim, rotary_dim, weight_dtype, eps, is_neox,
                norm, rope_first, mrope_section, mrope_interleaved, gate=False, grad_inputs=(),
                k_offset=0, out_shapes=(), packed=False):
    """Common tail of planning. ``heads`` is four (ptr, lead strides, head stride) for
    q_in, k_in, q_out, k_out, in elements (pointers in bytes). ``gate``: q_in holds a gate
    after each q head, copied to a third output laid out as q_out. ``packed``: an in-place
    call on a packed qkv (k heads right after q's, head stride head_dim), which takes the
    packed instances when its tokens are one stride apart, the cache is float32 and the
    weights have the activations' dtype."""
    num_tokens = math.prod(lead)
    num_heads = num_q_heads * (2 if gate else 1) + num_k_heads
    if num_tokens * num_heads >= _MAX_HEAD_ITEMS:
        raise ValueError(f"{num_tokens} tokens x {num_heads} heads exceeds 2**31 heads per call")
    pointer = _interop.pointer_function(fw)
    if device == CPU or num_tokens == 0:
        return _Plan(fw, device, None, 0, b"", k_offset, out_shapes, pointer, None, [],
                     grad_inputs)
    if positions is None:
        pos_strides, section_stride = (0,) * len(lead), 0
    elif mrope_section is None:
        pos_strides, section_stride = positions.strides, 0
    else:
        pos_strides, section_stride = positions.strides[1:], positions.strides[0]
    folded = _collapse_leading(lead, [h[1] for h in heads] + [pos_strides])
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
    # q and k views that start mid-vector keep the wide instance with accesses that follow
    # each address (qwen3-8b-unaligned); misaligned weights or cache rows, or a rotary_dim
    # that splits a vector, take the element-wise one.
    if not (all(side_ok) and rotary_dim % (2 * vec) == 0 and cache.strides[0] % vec == 0):
        vec = 1
    packed = (packed and n_inner == 1 and cache.dtype == "float32" and weight_dtype == act_dtype)
    if (packed and data_ok and vec > 1 and mrope_section is None
            and num_tokens * num_heads <= _jit.NARROW_MAX_HEADS):
        vec = _jit.narrow_vec(act_dtype, head_dim) or vec
    lanes, units = _jit.lanes_and_units(head_dim, vec)
    # Unaligned heads move as whole aligned chunks where each output head sits at its input's
    # offset within 16 bytes (in place, always).
    chunks = (not data_ok and not gate
              and _outputs_at_input_offsets(heads, lead_strides, itemsize)
              and _jit.chunks_fit(act_dtype, is_neox, vec, mrope_section is not None, rotary_dim,
                                  head_dim))
    # Packed chunks read the edge chunks of every head but the call's first and last whole (the
    # kernel's whole_edges): those two are the q/k span's ends only where tokens lie at least
    # 16 bytes apart upwards.
    if chunks and num_tokens > 1 and lead_strides[0][0] * itemsize < 16:
        packed = False
    variant = _jit.select_variant(act_dtype, is_neox, vec, units, mrope_section is not None,
                                  aligned=data_ok, packed=packed, head_dim=head_dim,
                                  chunks=chunks)

    sections = tuple(mrope_section) if mrope_section is not None else (0, 0, 0)
    statics = {
        "pos_stride_outer": lead_strides[4][0], "pos_stride_inner": lead_strides[4][1],
        "pos_stride_section": section_stride,
        "pos_is_int64": positions is not None and positions.dtype == "int64",
        "cache_row_stride": cache.strides[0], "max_position": cache.shape[0],
        "cache_dtype": _jit.DTYPES[cache.dtype][2], "weight_dtype": _jit.DTYPES[weight_dtype][2],
        "num_tokens": num_tokens, "tokens_inner": n_inner,
        "num_q_heads": num_q_heads, "num_k_heads": num_k_heads, "head_dim": head_dim,
        **dict(zip(("head_div_magic", "head_div_shift"), _jit.fast_division(num_heads))),
        "rotary_dim": rotary_dim, "norm_mode": NORM_CODES[norm], "eps": eps,
        "lanes_log2": lanes.bit_length() - 1,
        "rope_first": rope_first, "mrope_section0": sections[0], "mrope_section1": sections[1],
        "mrope_section2": sections[2], "mrope_interleaved": mrope_interleaved,
        "mrope_rounds": _jit.mrope_rounds(lanes, num_heads, rotary_dim),
        "prefetch_next": variant.prefetch_next,
    }
    for prefix, (_, _, head_stride), (outer, inner) in zip(
        ("q_in", "k_in", "q_out", "k_out"), heads, lead_strides
    ):
        statics[f"{prefix}_outer"], statics[f"{prefix}_inner"] = outer, inner
        statics[f"{prefix}_head"] = head_stride
    heads_per_block = _jit.BLOCK_THREADS // lanes
    blocks = min(-(-(num_tokens * num_heads) // heads_per_block), 2**31 - 1)
    return _Plan(fw, device, variant, blocks, _jit.pack_statics(statics), k_offset,
                 out_shapes, pointer, _interop.stream_getter(fw), [], grad_inputs)


def _infos(named):
    infos = {n: (_interop.info(a) if a is not None else None) for n, a in named}
    _same_place([(n, i) for n, i in infos.items() if i is not None])
    return infos


def _side_reads(infos):
    return [(n, infos[n]) for n in ("positions", "q_weight", "k_weight", "cos_sin_cache")]


# Where each named array's pointer sits in the tuple a launch passes (QkNormRopeParams order).
_POINTER_INDEX = {"qkv": 0, "q": 0, "k": 1, "out[0]": 2, "out[1]": 3, "positions": 5,
                  "cos_sin_cache": 6, "q_weight": 7, "k_weight": 8}


def _recheck_aliasing(named, packed_heads=None):
    """The exact aliasing check again, on this call's arrays, for a call whose live addresses
    make a written range meet another (``_ranges_meet``: a plan is shared by every call of the
    same geometry). ``packed_heads``: (Hq + Hk, D) of an in-place call."""
    infos = _infos(named)
    if packed_heads:
        _check_no_overlap(*_packed_aliases(infos, *packed_heads))
    else:
        _check_no_overlap(*_split_aliases(infos))


def _contiguous_lead_strides(lead, row):
    """Element strides of the leading dims of a contiguous ``[*lead, row]`` array."""
    strides, step = [], row
    for n in reversed(lead):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _plan_packed(qkv, positions, q_weight, k_weight, cache, num_q_heads, num_kv_heads,
                 head_dim, num_v_heads, eps, is_neox, rotary_dim, norm, rope_first,
                 mrope_section, mrope_interleaved):
    _check_flags(eps, is_neox, norm, rope_first, mrope_interleaved)
    for name, value, minimum in (("num_q_heads", num_q_heads, 1),
                                 ("num_kv_heads", num_kv_heads, 1),
                                 ("head_dim", head_dim, 1)):
        _require_int(name, value, minimum)
    num_v_heads = num_kv_heads if num_v_heads is None else num_v_heads
    _require_int("num_v_heads", num_v_heads, 0)
    infos = _infos([("qkv", qkv), ("positions", positions), ("q_weight", q_weight),
                    ("k_weight", k_weight), ("cos_sin_cache", cache)])
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
        infos["cos_sin_cache"], rotary_dim, norm, mrope_section)
    if q.device != CPU:
        _check_no_overlap(*_packed_aliases(infos, num_q_heads + num_kv_heads, head_dim))
    k_offset = num_q_heads * head_dim * _jit.DTYPES[q.dtype][1]
    lead_strides = q.strides[:-1]
    heads = [(q.ptr, lead_strides, head_dim), (q.ptr + k_offset, lead_strides, head_dim)] * 2
    plan = _build_plan(
        q.framework, q.device, q.dtype, lead, heads, infos["positions"], infos["q_weight"],
        infos["k_weight"], infos["cos_sin_cache"], num_q_heads=num_q_heads,
        num_k_heads=num_kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
        weight_dtype=weight_dtype, eps=eps, is_neox=is_neox, norm=norm, rope_first=rope_first,
        mrope_section=mrope_section, mrope_interleaved=mrope_interleaved,
        grad_inputs=_grad_inputs(infos), k_offset=k_offset, packed=True)
    written, read = _packed_aliases(infos, num_q_heads + num_kv_heads, head_dim)
    return plan._replace(overlap_pairs=_overlap_pairs(written, read, _POINTER_INDEX))


def _packed_aliases(infos, qk_heads, head_dim):
    """(written, read) named infos of an in-place call: the kernel writes the q and k heads
    of qkv (a weight sliced out of v would be fine)."""
    qkv = infos["qkv"]
    return [("qkv", qkv._replace(shape=(*qkv.shape[:-1], qk_heads * head_dim)))], \
        _side_reads(infos)


def _plan_split(q, k, positions, q_weight, k_weight, cache, eps, is_neox, rotary_dim, norm,
                rope_first, mrope_section, mrope_interleaved, out):
    _check_flags(eps, is_neox, norm, rope_first, mrope_interleaved)
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 2):
        raise TypeError(f"out must be a (q_out, k_out) pair of arrays or None, got {out!r}")
    named = [("q", q), ("k", k), ("positions", positions), ("q_weight", q_weight),
             ("k_weight", k_weight), ("cos_sin_cache", cache)]
    if out is not None:
        named += [("out[0]", out[0]), ("out[1]", out[1])]
    infos = _infos(named)
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
        infos["cos_sin_cache"], rotary_dim, norm, mrope_section)
    num_q_heads, num_k_heads = qi.shape[-2], ki.shape[-2]
    for name, count in (("q", num_q_heads), ("k", num_k_heads)):
        if count < 1:
            raise ValueError(f"{name} must have at least one head, got shape {infos[name].shape}")
    if out is None:
        heads_out = [(0, _contiguous_lead_strides(lead, num_q_heads * head_dim), head_dim),
                     (0, _contiguous_lead_strides(lead, num_k_heads * head_dim), head_dim)]
    else:
        heads_out = []
        for name, like in (("out[0]", qi), ("out[1]", ki)):
            o = infos[name]
            if o.dtype != like.dtype or o.shape != like.shape:
                raise ValueError(
                    f"{name} must be {like.dtype} of shape {like.shape}, got {o.dtype} {o.shape}"
                )
            _require_last_dim_contiguous(name, o)
            heads_out.append((o.ptr, o.strides[:-2], o.strides[-2]))
        if qi.device != CPU:
            _check_no_overlap(*_split_aliases(infos))
    heads = [(qi.ptr, qi.strides[:-2], qi.strides[-2]),
             (ki.ptr, ki.strides[:-2], ki.strides[-2])] + heads_out
    plan = _build_plan(
        qi.framework, qi.device, qi.dtype, lead, heads, infos["positions"], infos["q_weight"],
        infos["k_weight"], infos["cos_sin_cache"], num_q_heads=num_q_heads,
        num_k_heads=num_k_heads, head_dim=head_dim, rotary_dim=rotary_dim,
        weight_dtype=weight_dtype, eps=eps, is_neox=is_neox, norm=norm, rope_first=rope_first,
        mrope_section=mrope_section, mrope_interleaved=mrope_interleaved,
        grad_inputs=_grad_inputs(infos), out_shapes=(qi.shape, ki.shape))
    if out is None:
        return plan
    written, read = _split_aliases(infos)
    return plan._replace(overlap_pairs=_overlap_pairs(written, read, _POINTER_INDEX))


def _split_aliases(infos):
    """(written, read) named infos of an out-of-place call with ``out``."""
    return ([("out[0]", infos["out[0]"]), ("out[1]", infos["out[1]"])],
            [("q", infos["q"]), ("k", infos["k"])] + _side_reads(infos))


def _plan_gate(q_gate, k, positions, q_weight, k_weight, cache, num_q_heads, num_kv_heads,
               head_dim, eps, is_neox, rotary_dim, norm, rope_first, mrope_section,
               mrope_interleaved):
    _check_flags(eps, is_neox, norm, rope_first, mrope_interleaved)
    for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
        _require_int(name, value, 1)
    infos = _infos([("q_gate", q_gate), ("k", k), ("positions", positions),
                    ("q_weight", q_weight), ("k_weight", k_weight), ("cos_sin_cache", cache)])
    qi, ki = infos["q_gate"], infos["k"]
    for name, inf, width in (("q_gate", qi, num_q_heads * 2 * head_dim),
                             ("k", ki, num_kv_heads * head_dim)):
        if inf.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"{name} must be one of {ACTIVATION_DTYPES}, got {inf.dtype}")
        if not inf.shape or inf.shape[-1] != width:
            what = "num_q_heads * 2 * head_dim" if name == "q_gate" else "num_kv_heads * head_dim"
            raise ValueError(f"{name} must be [..., {what} = {width}], got shape {inf.shape}")
        _require_last_dim_contiguous(name, inf)
    if ki.dtype != qi.dtype:
        raise TypeError(f"k must have q_gate's dtype {qi.dtype}, got {ki.dtype}")
    lead = qi.shape[:-1]
    if ki.shape[:-1] != lead:
        raise ValueError(f"k must have q_gate's leading dims {lead}, got shape {ki.shape}")
    rotary_dim, weight_dtype = _check_side_inputs(
        qi.dtype, head_dim, lead, infos["positions"], infos["q_weight"], infos["k_weight"],
        infos["cos_sin_cache"], rotary_dim, norm, mrope_section)
    q_rows = _contiguous_lead_strides(lead, num_q_heads * head_dim)
    heads = [(qi.ptr, qi.strides[:-1], 2 * head_dim), (ki.ptr, ki.strides[:-1], head_dim),
             (0, q_rows, head_dim),
             (0, _contiguous_lead_strides(lead, num_kv_heads * head_dim), head_dim)]
    q_shape = (*lead, num_q_heads * head_dim)
    return _build_plan(
        qi.framework, qi.device, qi.dtype, lead, heads, infos["positions"], infos["q_weight"],
        infos["k_weight"], infos["cos_sin_cache"], num_q_heads=num_q_heads,
        num_k_heads=num_kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
        weight_dtype=weight_dtype, eps=eps, is_neox=is_neox, norm=norm, rope_first=rope_first,
        mrope_section=mrope_section, mrope_interleaved=mrope_interleaved, gate=True,
        grad_inputs=_grad_inputs(infos),
        out_shapes=(q_shape, (*lead, num_kv_heads * head_dim), q_shape))


# ----------------------------------------------------------------------------- launching


def _launch(plan, pointers):
    device = plan.device
    stream = plan.stream(device)
    if not plan.function:
        func = _jit.get_function(plan.variant, device, stream)
        plan.function.extend((func, min(plan.blocks, _jit.resident_blocks(plan.variant, device))))
    _jit.launch(plan.function[0], plan.function[1], stream, device, pointers, plan.statics)


def _side_pointers(plan, positions, cache, q_weight, k_weight):
    ptr = plan.pointer
    return (0 if positions is None else ptr(positions), ptr(cache),
            0 if q_weight is None else ptr(q_weight), 0 if k_weight is None else ptr(k_weight))


def _launch_packed(plan, qkv, positions, q_weight, k_weight, cache, side, packed_heads):
    """Launch an in-place call on packed ``qkv``; ``side`` holds the pointers of positions,
    cache, q_weight and k_weight, ``packed_heads`` is (Hq + Hk, D)."""
    base = plan.pointer(qkv)
    k_base = base + plan.k_offset
    pointers = (base, k_base, base, k_base, 0, *side)
    if _ranges_meet(plan, pointers):
        _recheck_aliasing((("qkv", qkv), ("positions", positions), ("q_weight", q_weight),
                           ("k_weight", k_weight), ("cos_sin_cache", cache)), packed_heads)
    _launch(plan, pointers)


def _before_launch(plan, positions, cache):
    if plan.grad_inputs:
        _refuse_grad(plan.grad_inputs)
    if _debug and positions is not None:
        _check_positions(positions, cache)


def _hashable(section):
    # torch custom ops hand over list[int]; a list would make the plan key unhashable.
    return tuple(section) if isinstance(section, list) else section


def _flag_key(eps, is_neox, rotary_dim, norm, rope_first, mrope_section, mrope_interleaved):
    # Types too: True == 1 == 1.0, and a mistyped flag must not reuse a checked plan.
    return (eps, is_neox, rotary_dim, norm, rope_first, _hashable(mrope_section),
            mrope_interleaved, type(eps), type(is_neox), type(rotary_dim), type(rope_first),
            type(mrope_interleaved))


def _reference_kwargs(eps, is_neox, rotary_dim, norm, rope_first, mrope_section,
                      mrope_interleaved):
    return {"eps": eps, "is_neox": is_neox, "rotary_dim": rotary_dim, "norm": norm,
            "rope_first": rope_first, "mrope_section": mrope_section,
            "mrope_interleaved": mrope_interleaved}


def _reference_inputs(positions, q_weight, k_weight, cache):
    return (None if positions is None else _interop.to_numpy(positions),
            _interop.to_float64(q_weight), _interop.to_float64(k_weight),
            _interop.to_float64(cache))


def qk_norm_rope_(qkv, positions, q_weight, k_weight, cos_sin_cache, *, num_q_heads,
                  num_kv_heads, head_dim, num_v_heads=None, eps=1e-6, is_neox=True,
                  rotary_dim=None, norm="rms", rope_first=False, mrope_section=None,
                  mrope_interleaved=False):
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
    positions : int32 or int64, shape ``qkv.shape[:-1]``, or None: token ``t`` (counted
        row-major over the leading dims) reads cache row ``t``, so a per-token cos/sin table
        can be passed as the cache. A position outside ``[0, max_position)`` never reads
        outside the cache: the frequencies that use it become NaN.
    q_weight, k_weight : ``[D]`` in qkv's dtype or float32, or None for no weight.
    cos_sin_cache : ``[max_position, rotary_dim]`` float32, float16 or bfloat16;
        row p = ``[cos(p*f_0 .. p*f_{r/2-1}) | sin(...)]``.
    num_q_heads, num_kv_heads, head_dim : Hq, Hk and D; D a multiple of 16 from 32 to 512.
    num_v_heads : Hv, default ``num_kv_heads``.
    rotary_dim : even, 2 to D; defaults to (and must equal) ``cos_sin_cache.shape[1]``.
    rope_first : apply RoPE before the norm instead of after it (Llama 4 order).
    mrope_section : ``(s0, s1, s2)`` with ``s0 + s1 + s2 == rotary_dim // 2`` for multimodal
        RoPE: ``positions`` is then ``[3, ...]`` (temporal, height, width) and frequency ``j``
        reads the cache row of position row 0 for ``j < s0``, 1 for ``j < s0 + s1``, else 2;
        with ``mrope_interleaved=True`` (Qwen3-VL) row 1 for ``j % 3 == 1 and j < 3*s1``,
        row 2 for ``j % 3 == 2 and j < 3*s2``, else row 0.

    Returns ``qkv``. CUDA arrays (torch, CuPy) run on the caller's current stream on their
    device; CPU torch tensors and NumPy arrays run ``cuqk.reference``. The weights, cache and
    positions must not share memory with ``qkv`` (ValueError).
    """
    key = _interop.key
    plan = _get_plan(
        _packed_plans,
        (key(qkv), key(positions), key(q_weight), key(k_weight), key(cos_sin_cache),
         num_q_heads, num_kv_heads, head_dim, num_v_heads, type(num_q_heads),
         type(num_kv_heads), type(head_dim), type(num_v_heads),
         *_flag_key(eps, is_neox, rotary_dim, norm, rope_first, mrope_section,
                    mrope_interleaved)),
        _plan_packed,
        (qkv, positions, q_weight, k_weight, cos_sin_cache, num_q_heads, num_kv_heads,
         head_dim, num_v_heads, eps, is_neox, rotary_dim, norm, rope_first, mrope_section,
         mrope_interleaved))
    _before_launch(plan, positions, cos_sin_cache)
    if plan.variant is not None:
        _launch_packed(plan, qkv, positions, q_weight, k_weight, cos_sin_cache,
                       _side_pointers(plan, positions, cos_sin_cache, q_weight, k_weight),
                       (num_q_heads + num_kv_heads, head_dim))
    elif plan.device == CPU:
        k_end = (num_q_heads + num_kv_heads) * head_dim
        ref = reference.qkv_norm_rope(
            _interop.to_float64(qkv), *_reference_inputs(positions, q_weight, k_weight,
                                                         cos_sin_cache),
            num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            **_reference_kwargs(eps, is_neox, rotary_dim, norm, rope_first, mrope_section,
                                mrope_interleaved))
        _interop.write_from_float64(qkv[..., :k_end], ref[..., :k_end])
    return qkv


_BOUND_NAMES = ("q_weight", "k_weight", "cos_sin_cache")


class QkNormRope:
    """``qk_norm_rope_`` with its weights, cos/sin cache and flags bound once, for serving loops
    that call it eagerly: ``op(qkv, positions)`` does what ``qk_norm_rope_(qkv, positions,
    q_weight, k_weight, cos_sin_cache, **kwargs)`` does, with a fifth to a third less host time
    (measured on the device's host, T=1).

    A call reads the metadata of ``qkv`` and ``positions`` only. The bound arrays' data
    pointers are read on every call, so new data in place is seen; when a pointer moves
    (``param.data = new``, ``torch.utils.swap_tensors``), that call checks the bound arrays
    again in full. Changing a bound array's shape or strides in place on the same memory
    (``resize_``, ``t_``, ``as_strided_``) is not detected: bind a new op instead.

    Parameters are those of ``qk_norm_rope_``; the flags are checked here, the arrays at the
    first call. Grad mode is checked on every call, as ``qk_norm_rope_`` does.
    """

    def __init__(self, q_weight, k_weight, cos_sin_cache, *, num_q_heads, num_kv_heads,
                 head_dim, num_v_heads=None, eps=1e-6, is_neox=True, rotary_dim=None,
                 norm="rms", rope_first=False, mrope_section=None, mrope_interleaved=False):
        _check_flags(eps, is_neox, norm, rope_first, mrope_interleaved)
        framework = _interop.framework(cos_sin_cache)
        self._pointer = _interop.pointer_function(framework)
        self._key = _interop.key_function(framework)
        self._grad_enabled = None
        if framework == "torch":
            import torch

            self._grad_enabled = torch.is_grad_enabled
        self._bound = (q_weight, k_weight, cos_sin_cache)
        self._kwargs = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads,
                        "head_dim": head_dim, "num_v_heads": num_v_heads, "eps": eps,
                        "is_neox": is_neox, "rotary_dim": rotary_dim, "norm": norm,
                        "rope_first": rope_first, "mrope_section": mrope_section,
                        "mrope_interleaved": mrope_interleaved}
        self._packed_heads = (num_q_heads + num_kv_heads, head_dim)
        self._side = None  # (cache, q_weight, k_weight) pointers the cached plans were made for
        self._plans = {}

    def __call__(self, qkv, positions):
        """Normalise and rotate ``qkv``'s q and k heads in place (``[..., (Hq + Hk + Hv) * D]``,
        as in ``qk_norm_rope_``) at ``positions``; returns ``qkv``."""
        # The per-call path of a serving loop: kept to attribute reads and one dict lookup.
        q_weight, k_weight, cache = self._bound
        ptr = self._pointer
        side = (ptr(cache), 0 if q_weight is None else ptr(q_weight),
                0 if k_weight is None else ptr(k_weight))
        if side != self._side:
            self._plans.clear()
            self._side = side
        try:
            plan_key = (self._key(qkv), None if positions is None else self._key(positions))
        except AttributeError:  # not the bound arrays' framework: planning says so
            plan_key = (_interop.key(qkv), _interop.key(positions))
        plan = self._plans.get(plan_key)
        if plan is None:
            plan = _plan_packed(qkv, positions, q_weight, k_weight, cache, **self._kwargs)
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[plan_key] = plan
        grad_enabled = self._grad_enabled
        # The bound arrays may have started to require grad since their plan was made.
        if grad_enabled is not None and grad_enabled() and (
                plan.grad_inputs or cache.requires_grad
                or (q_weight is not None and q_weight.requires_grad)
                or (k_weight is not None and k_weight.requires_grad)):
            names = dict.fromkeys(plan.grad_inputs)
            names.update((n, None) for n, a in zip(_BOUND_NAMES, self._bound)
                         if a is not None and a.requires_grad)
            _refuse_grad(names)
        if _debug and positions is not None:
            _check_positions(positions, cache)
        if plan.variant is not None:
            _launch_packed(plan, qkv, positions, q_weight, k_weight, cache,
                           (0 if positions is None else ptr(positions), *side),
                           self._packed_heads)
        elif plan.device == CPU:
            qk_norm_rope_(qkv, positions, q_weight, k_weight, cache, **self._kwargs)
        return qkv

    def __repr__(self):
        flags = ", ".join(f"{k}={v!r}" for k, v in self._kwargs.items())
        return f"cuqk.QkNormRope({flags})"


def qk_norm_rope(q, k, positions, q_weight, k_weight, cos_sin_cache, *, eps=1e-6, is_neox=True,
                 rotary_dim=None, norm="rms", rope_first=False, mrope_section=None,
                 mrope_interleaved=False, out=None):
    """Out-of-place ``qk_norm_rope_`` on separate q and k heads.

    Parameters
    ----------
    q, k : ``[..., Hq, D]`` and ``[..., Hk, D]``, one float dtype, any strides except a
        contiguous last dim (e.g. views sliced out of a packed qkv). JAX arrays are accepted
        too (see ``cuqk.jax``).
    positions, q_weight, k_weight, cos_sin_cache, eps, is_neox, rotary_dim, norm, rope_first,
    mrope_section, mrope_interleaved : as in ``qk_norm_rope_``.
    out : optional ``(q_out, k_out)`` of q's and k's dtype and shapes (last dim contiguous)
        to write into instead of new arrays; each may be the very array it replaces (in
        place), but must not otherwise share memory with an argument.

    Returns
    -------
    ``(q_out, k_out)``: new contiguous arrays of q's and k's shapes, of the caller's type, or
    ``out``.
    """
    key = _interop.key
    try:
        plan = _get_plan(
            _split_plans,
            (key(q), key(k), key(positions), key(q_weight), key(k_weight), key(cos_sin_cache),
             None if out is None else (key(out[0]), key(out[1])),
             *_flag_key(eps, is_neox, rotary_dim, norm, rope_first, mrope_section,
                        mrope_interleaved)),
            _plan_split,
            (q, k, positions, q_weight, k_weight, cos_sin_cache, eps, is_neox, rotary_dim, norm,
             rope_first, mrope_section, mrope_interleaved, out))
    except TypeError:
        if not _interop.is_jax(q):
            raise
        from . import jax as cuqk_jax

        return cuqk_jax.qk_norm_rope(
            q, k, positions, q_weight, k_weight, cos_sin_cache, eps=eps, is_neox=is_neox,
            rotary_dim=rotary_dim, norm=norm, rope_first=rope_first, mrope_section=mrope_section,
            mrope_interleaved=mrope_interleaved)
    _before_launch(plan, positions, cos_sin_cache)
    if out is None:
        q_out = _interop.empty(plan.framework, plan.out_shapes[0], q)
        k_out = _interop.empty(plan.framework, plan.out_shapes[1], k)
    else:
        q_out, k_out = out
    if plan.variant is not None:
        ptr = plan.pointer
        pointers = (ptr(q), ptr(k), ptr(q_out), ptr(k_out), 0,
                    *_side_pointers(plan, positions, cos_sin_cache, q_weight, k_weight))
        if out is not None and _ranges_meet(plan, pointers):
            _recheck_aliasing((
                ("q", q), ("k", k), ("positions", positions), ("q_weight", q_weight),
                ("k_weight", k_weight), ("cos_sin_cache", cos_sin_cache), ("out[0]", q_out),
                ("out[1]", k_out)))
        _launch(plan, pointers)
    elif plan.device == CPU:
        q_ref, k_ref = reference.qk_norm_rope(
            _interop.to_float64(q), _interop.to_float64(k),
            *_reference_inputs(positions, q_weight, k_weight, cos_sin_cache),
            **_reference_kwargs(eps, is_neox, rotary_dim, norm, rope_first, mrope_section,
                                mrope_interleaved))
        _interop.write_from_float64(q_out, q_ref)
        _interop.write_from_float64(k_out, k_ref)
    return q_out, k_out


def qk_norm_rope_gate(q_gate, k, positions, q_weight, k_weight, cos_sin_cache, *, num_q_heads,
                      num_kv_heads, head_dim, eps=1e-6, is_neox=True, rotary_dim=None,
                      norm="gemma", rope_first=False, mrope_section=None,
                      mrope_interleaved=False):
    """Gated attention's prologue (Qwen3-Next, Qwen3.5): split q from its gate, normalise and
    rotate q and k, copy the gate, in one kernel.

    Parameters
    ----------
    q_gate : ``[..., Hq * 2 * D]`` float16, bfloat16 or float32, each head ``[q | gate]``
        (the q projection's output); last dim contiguous, rows may be strided.
    k : ``[..., Hk * D]`` of q_gate's dtype and leading dims; last dim contiguous.
    positions, q_weight, k_weight, cos_sin_cache, eps, is_neox, rotary_dim, rope_first,
    mrope_section, mrope_interleaved : as in ``qk_norm_rope_``.
    norm : default ``"gemma"`` (``(1 + w)``), as these models use.

    Returns
    -------
    ``(q_out, k_out, gate_out)``: new contiguous ``[..., Hq * D]``, ``[..., Hk * D]``,
    ``[..., Hq * D]``; ``gate_out`` is the gate copied bit for bit.
    """
    key = _interop.key
    plan = _get_plan(
        _gate_plans,
        (key(q_gate), key(k), key(positions), key(q_weight), key(k_weight), key(cos_sin_cache),
         num_q_heads, num_kv_heads, head_dim, type(num_q_heads), type(num_kv_heads),
         type(head_dim),
         *_flag_key(eps, is_neox, rotary_dim, norm, rope_first, mrope_section,
                    mrope_interleaved)),
        _plan_gate,
        (q_gate, k, positions, q_weight, k_weight, cos_sin_cache, num_q_heads, num_kv_heads,
         head_dim, eps, is_neox, rotary_dim, norm, rope_first, mrope_section, mrope_interleaved))
    _before_launch(plan, positions, cos_sin_cache)
    fw = plan.framework
    q_out = _interop.empty(fw, plan.out_shapes[0], q_gate)
    k_out = _interop.empty(fw, plan.out_shapes[1], k)
    gate_out = _interop.empty(fw, plan.out_shapes[2], q_gate)
    if plan.variant is not None:
        ptr = plan.pointer
        _launch(plan, (ptr(q_gate), ptr(k), ptr(q_out), ptr(k_out), ptr(gate_out),
                       *_side_pointers(plan, positions, cos_sin_cache, q_weight, k_weight)))
    elif plan.device == CPU:
        refs = reference.qk_norm_rope_gate(
            _interop.to_float64(q_gate), _interop.to_float64(k),
            *_reference_inputs(positions, q_weight, k_weight, cos_sin_cache),
            num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            **_reference_kwargs(eps, is_neox, rotary_dim, norm, rope_first, mrope_section,
                                mrope_interleaved))
        for dst, ref in zip((q_out, k_out), refs):
            _interop.write_from_float64(dst, ref)
        gate_out[...] = q_gate.reshape(*q_gate.shape[:-1], num_q_heads, 2, head_dim)[
            ..., 1, :].reshape(gate_out.shape)
    return q_out, k_out, gate_out
