"""Property-based fuzzing (hypothesis) of cuqk.qk_norm_rope_ and cuqk.qk_norm_rope.

What is fuzzed. Each example draws one configuration: the op (in place on a packed qkv, or out
of place on q and k, either views of it or heads-major copies), the framework, the activation
dtype, head_dim (multiples of 16 from 32 to 512), Hq, Hk >= 1 and Hv >= 0, rotary_dim (any
even value up to head_dim, passed or implied by the cache width), NeoX or GPT-J pairs, norm
("rms", "gemma", "none"), the dtype (activation or float32) and presence of each weight, the
cache and positions dtypes, 0 to 3 leading dims (zero tokens included), padded rows, poisoned
gap rows between outer slices, a start offset of 0 to 9 elements (mostly misaligned), offset
weights and cache, padded cache rows, strided positions, out-of-range positions (their rotary
dims must come out NaN), the input scale and eps. Arrays live in NaN-poisoned buffers (the
gaps between positions hold an out-of-range position), so reading or writing outside them
shows up.

Reproducing a failure. Every property is seeded from the environment variable CUQK_FUZZ_SEED
(default below); the failure report prints the seed and the falsifying ``Case``. Rerun with

    CUQK_FUZZ_SEED=<seed> python -m pytest tests/test_fuzz.py

CPU part (runs in CI, a few seconds): the public ops on NumPy arrays and CPU torch tensors,
which run the float64 reference path, against an independent float64 formula written here
(RMS over each head, then each rotation pair turned by the cos/sin read from its token's cache
row), to within one rounding to the activation dtype; V heads, row padding, gap rows and every
other input bit-for-bit untouched; out-of-place results of the inputs' type, dtype and shape,
contiguous. Invalid calls (one drawn defect each: wrong dtype, width, head_dim, rotary_dim,
positions, weight, cache, norm, eps, is_neox, layout, framework, q/k shapes), optionally after
a good call of the same geometry has filled the plan cache, must raise ValueError or TypeError
naming the bad argument and leave every input unchanged.

GPU part (skipped without a CUDA GPU): 500 examples per run of the same valid configurations,
larger (up to ~3000 tokens, 32 heads), on torch and CuPy arrays, held to the same formula
evaluated in float64 on the GPU, with a per-element bound for float32 arithmetic in the
kernel, and the same bit-for-bit checks of everything outside the q and k heads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
from conftest import HAS_GPU, cos_sin_cache64, requires_gpu
from hypothesis import given, note, seed, settings
from hypothesis import strategies as st

import cuqk

torch = pytest.importorskip("torch")
if HAS_GPU:
    import cupy

SEED = int(os.environ.get("CUQK_FUZZ_SEED", "20240917"))
REPRODUCE = f"reproduce with: CUQK_FUZZ_SEED={SEED} python -m pytest tests/test_fuzz.py"

DTYPES = ("float32", "float16", "bfloat16")
TORCH_DTYPES = {name: getattr(torch, name) for name in (
    *DTYPES, "float64", "int64", "int32", "int16", "int8", "uint8", "bool")}
# NumPy has no bfloat16, and CuPy may only have it with ml_dtypes installed.
NO_BFLOAT16 = ("numpy", "cupy")

# Allowed error per element: one rounding to the activation dtype (u |exp|, which a store that
# truncates exceeds), the smallest subnormal near zero, and the rounding of the arithmetic
# before the store, which scales with the magnitude of the terms summed (`mag` below). On the
# CPU that is one float32 rounding (torch casts float64 to 16-bit floats through float32); in
# the kernels' float32 arithmetic, the sum of squares, rsqrt, weight and rotation stay under
# ~20 roundings, held here to 64.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
SUBNORMAL = {"float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}
CPU_ARITHMETIC = 2.0**-24
GPU_ARITHMETIC = 64 * 2.0**-24


@dataclass(frozen=True)
class Case:
    framework: str  # "torch" or "numpy" (CPU), "torch" or "cupy" (GPU)
    op: str  # "inplace": qk_norm_rope_ on packed qkv; "split": qk_norm_rope on q and k
    heads_major: bool  # split only: q and k copied so each head's tokens are contiguous
    dtype: str
    lead: tuple  # leading dims of qkv and positions
    heads: tuple  # (Hq, Hk, Hv)
    pass_hv: bool  # False: num_v_heads left to its default (only when Hv == Hk)
    head_dim: int
    rotary: int
    pass_rotary: bool  # False: rotary_dim implied by the cache width
    is_neox: bool
    norm: str
    weights: tuple  # dtypes of (q_weight, k_weight); None: no weight
    cache_dtype: str
    max_pos: int
    pos_dtype: str
    pos_stride: int  # positions are every pos_stride-th element of a row of max_pos values
    bad_positions: bool  # about one token in eight gets a position outside the cache
    row_pad: int  # poisoned elements after each qkv row
    gap_rows: int  # poisoned rows after each run of lead[-1] rows
    offset: int  # poisoned elements before the first qkv row
    side_offset: int  # the same before the weights and the cache
    cache_pad: int  # poisoned elements after each cache row
    scale: float  # standard deviation of the qkv values
    eps: float
    data_seed: int


def _float_dtypes(framework):
    return ("float32", "float16") if framework in NO_BFLOAT16 else DTYPES


@st.composite
def cases(draw, *, frameworks, max_tokens, max_heads, max_pos):
    """Valid configurations; ``max_heads`` bounds (Hq, Hk, Hv)."""
    framework = draw(st.sampled_from(frameworks))
    dtype = draw(st.sampled_from(_float_dtypes(framework)))
    head_dim = draw(st.sampled_from(range(32, 513, 16)))
    ndim = draw(st.sampled_from((1, 2, 3, 0)))
    outer = tuple(draw(st.lists(st.integers(1, 3), min_size=max(ndim - 1, 0),
                                max_size=max(ndim - 1, 0))))
    lead = (*outer, draw(st.integers(0, max_tokens // math.prod(outer)))) if ndim else ()
    hq, hk, hv = (draw(st.integers(low, high)) for low, high in zip((1, 1, 0), max_heads))
    norm = draw(st.sampled_from(("rms", "gemma", "none")))
    op = draw(st.sampled_from(("inplace", "split")))
    weights = (None, None)
    if norm != "none":
        wdt = draw(st.sampled_from((dtype, "float32")))
        weights = draw(st.sampled_from(((wdt, wdt), (wdt, None), (None, wdt), (None, None))))
    return Case(
        framework=framework, op=op, heads_major=op == "split" and draw(st.booleans()),
        dtype=dtype, lead=lead, heads=(hq, hk, hv), pass_hv=hv != hk or draw(st.booleans()),
        head_dim=head_dim,
        rotary=draw(st.one_of(st.just(head_dim),
                              st.integers(1, head_dim // 2).map(lambda half: 2 * half))),
        pass_rotary=draw(st.booleans()), is_neox=draw(st.booleans()), norm=norm,
        weights=weights, cache_dtype=draw(st.sampled_from(_float_dtypes(framework))),
        max_pos=draw(st.integers(1, max_pos)),
        pos_dtype=draw(st.sampled_from(("int32", "int64"))),
        pos_stride=draw(st.integers(1, 3)) if ndim else 1, bad_positions=draw(st.booleans()),
        row_pad=draw(st.integers(0, 64)), gap_rows=draw(st.integers(0, 2)) if ndim else 0,
        offset=draw(st.integers(0, 9)), side_offset=draw(st.integers(0, 3)),
        cache_pad=draw(st.integers(0, 9)), scale=draw(st.sampled_from((1e-2, 1.0, 30.0))),
        eps=draw(st.sampled_from((0.0, 1e-6, 1e-5, 0.1))),
        data_seed=draw(st.integers(0, 2**31 - 1)))


# ----------------------------------------------------------------------------- building


class Built(NamedTuple):
    buffer: object  # the poisoned buffer qkv lives in
    qkv: object  # [*lead, (Hq + Hk + Hv) * D]
    positions: object
    q_weight: object
    k_weight: object
    cache: object
    holders: dict  # name -> what positions, each weight and the cache are views of


def _poisoned(size, dtype, device):
    return torch.full((size,), float("nan"), dtype=TORCH_DTYPES[dtype], device=device)


def _qkv_block(case):
    """Shape of the buffer region under qkv: the padded rows and the gap rows."""
    width = sum(case.heads) * case.head_dim
    tokens = case.lead[-1] if case.lead else 1
    return (*case.lead[:-1], tokens + case.gap_rows, width + case.row_pad)


def _qkv_view(buffer, case):
    """qkv inside ``buffer`` (or the same elements of any 1-D tensor of its size)."""
    block = _qkv_block(case)
    view = buffer[case.offset:case.offset + math.prod(block)].view(block)
    view = view[..., :block[-2] - case.gap_rows, :sum(case.heads) * case.head_dim]
    return view if case.lead else view[0]


def _side(values, dtype, offset, row_pad=0):
    """(buffer, view): 1-D or 2-D float64 ``values`` stored as ``dtype`` ``offset`` elements into
    a poisoned buffer, each row followed by ``row_pad`` poison."""
    rows = values.view(-1, values.shape[-1])
    buffer = _poisoned(offset + rows.shape[0] * (rows.shape[1] + row_pad), dtype, values.device)
    view = buffer[offset:].view(rows.shape[0], -1)[:, :rows.shape[1]]
    view.copy_(rows)
    return buffer, view.view(values.shape)


def _build(case, device):
    gen = torch.Generator(device=device).manual_seed(case.data_seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float64)

    buffer = _poisoned(case.offset + math.prod(_qkv_block(case)), case.dtype, device)
    qkv = _qkv_view(buffer, case)
    qkv.copy_(randn(qkv.shape) * case.scale)
    pos_dtype = TORCH_DTYPES[case.pos_dtype]
    positions = torch.randint(0, case.max_pos, case.lead, generator=gen, device=device,
                              dtype=pos_dtype)
    if case.bad_positions:
        limits = torch.iinfo(pos_dtype)
        bad = torch.tensor([-1, case.max_pos, limits.min, limits.max], device=device,
                           dtype=pos_dtype)
        pick = torch.randint(0, 8 * len(bad), case.lead, generator=gen, device=device)
        positions = torch.where(pick < len(bad), bad[pick.clamp(max=len(bad) - 1)], positions)
    # Between the positions sits max_pos, out of range: a token reading its neighbour's slot
    # comes out NaN.
    holder = torch.full((*case.lead[:-1], math.prod(case.lead[-1:]) * case.pos_stride),
                        case.max_pos, dtype=pos_dtype, device=device)
    holder[..., ::case.pos_stride] = positions
    positions = holder[..., ::case.pos_stride].view(case.lead)
    sides = [None if wdt is None else _side(
        0.5 * randn(case.head_dim) + (1.0 if case.norm == "rms" else 0.0), wdt, case.side_offset)
        for wdt in case.weights]
    cache64 = torch.from_numpy(cos_sin_cache64(case.max_pos, case.rotary)).to(device)
    cache_side = _side(cache64, case.cache_dtype, case.side_offset, case.cache_pad)
    q_weight, k_weight = (None if s is None else s[1] for s in sides)
    holders = {"positions": holder, "cos_sin_cache": cache_side[0]}
    holders.update((name, s[0]) for name, s in zip(("q_weight", "k_weight"), sides)
                   if s is not None)
    return Built(buffer, qkv, positions, q_weight, k_weight, cache_side[1], holders)


def _heads(qkv, case):
    """(q, k) views ``[*lead, H, D]`` of a ``[*lead, (Hq + Hk + Hv) * D]`` tensor."""
    hq, hk, _ = case.heads
    d = case.head_dim
    return (qkv[..., :hq * d].unflatten(-1, (hq, d)),
            qkv[..., hq * d:(hq + hk) * d].unflatten(-1, (hk, d)))


def _to_framework(tensor, framework):
    if framework == "numpy":
        return tensor.numpy()
    return cupy.from_dlpack(tensor) if framework == "cupy" else tensor


def _as_torch(array):
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return array if isinstance(array, torch.Tensor) else torch.from_dlpack(array)


def _call(case, built):
    """(op, keyword arguments in ``case.framework``) of the call ``case`` describes."""
    hq, hk, hv = case.heads
    kwargs = {"positions": built.positions, "q_weight": built.q_weight,
              "k_weight": built.k_weight, "cos_sin_cache": built.cache, "eps": case.eps,
              "is_neox": case.is_neox, "norm": case.norm}
    if case.pass_rotary:
        kwargs["rotary_dim"] = case.rotary
    if case.op == "inplace":
        op = cuqk.qk_norm_rope_
        kwargs.update(qkv=built.qkv, num_q_heads=hq, num_kv_heads=hk, head_dim=case.head_dim)
        if case.pass_hv:
            kwargs["num_v_heads"] = hv
    else:
        op = cuqk.qk_norm_rope
        kwargs["q"], kwargs["k"] = _heads(built.qkv, case)
        if case.heads_major:
            kwargs["q"], kwargs["k"] = (x.movedim(-2, 0).contiguous().movedim(0, -2)
                                        for x in (kwargs["q"], kwargs["k"]))
    return op, {name: _to_framework(value, case.framework)
                if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}


# ----------------------------------------------------------------------------- checking


def _expected(x, positions, weight, cache, case):
    """Float64 ``(out, mag)`` for heads ``x [N, H, D]`` of tokens at ``positions [N]``.

    Written apart from cuqk.reference: RMS over each head, weight, then pair ``(i, j)`` of
    each head turned by the cos/sin at column ``k`` of its token's cache row. ``mag`` is, per
    element, the sum of the magnitudes of the terms that make it, which bounds the rounding
    of the same arithmetic done in float32.
    """
    y = x
    if case.norm != "none":
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + case.eps)
        if weight is not None:
            y = y * (weight + 1.0 if case.norm == "gemma" else weight)
    half = case.rotary // 2
    k = torch.arange(half, device=x.device)
    i, j = (k, k + half) if case.is_neox else (2 * k, 2 * k + 1)
    inside = (positions >= 0) & (positions < cache.shape[0])
    row = cache[torch.where(inside, positions, 0)].masked_fill(~inside[:, None], float("nan"))
    cos, sin = row[:, None, :half], row[:, None, half:]
    a, b = y[..., i], y[..., j]
    out, mag = y.clone(), y.abs()
    out[..., i], out[..., j] = a * cos - b * sin, b * cos + a * sin
    mag[..., i] = (a * cos).abs() + (b * sin).abs()
    mag[..., j] = (b * cos).abs() + (a * sin).abs()
    return out, mag


def _mismatch(what, out, exp, bound, bad):
    t, h, d = (int(n) for n in bad.nonzero()[0])
    return (f"{what}[token {t}, head {h}, dim {d}]: got {out[t, h, d].item()!r}, expected "
            f"{exp[t, h, d].item()!r} (allowed error {bound[t, h, d].item():.3g}); "
            f"{int(bad.sum())} of {bad.numel()} elements off")


def _assert_close(out, exp, mag, dtype, arithmetic, what):
    """Every element within one rounding to ``dtype`` plus float arithmetic; NaN where
    ``exp`` is NaN (out-of-range positions) and nowhere else."""
    out = out.double()
    bound = UNIT_ROUNDOFF[dtype] * exp.abs() + arithmetic * mag + SUBNORMAL[dtype]
    bad = torch.where(exp.isnan(), ~out.isnan(), ~((out - exp).abs() <= bound))
    assert not bad.any(), _mismatch(what, out, exp, bound, bad)


def _bits(tensor):
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                        8: torch.int64}[tensor.element_size()])


def _check_valid_case(case, device, arithmetic):
    """Run ``case`` on ``device`` and hold it to ``_expected``; everything but the q and k
    heads (in place) or everything (out of place) must keep its bits."""
    built = _build(case, device)
    op, kwargs = _call(case, built)
    others = dict(built.holders)
    if case.op == "split":
        others.update(q=_as_torch(kwargs["q"]), k=_as_torch(kwargs["k"]))
    before = {name: t.clone() for name, t in {"qkv": built.buffer, **others}.items()}
    tokens = math.prod(case.lead)
    positions = built.positions.reshape(-1).long()
    cache = built.cache.double()
    expected = [_expected(x.reshape(tokens, *x.shape[-2:]), positions,
                          None if w is None else w.double(), cache, case)
                for x, w in zip(_heads(built.qkv.double(), case),
                                (built.q_weight, built.k_weight))]

    result = op(**kwargs)
    if case.op == "inplace":
        assert result is kwargs["qkv"]
        outs = _heads(built.qkv, case)
    else:
        outs = []
        for name, out in zip("qk", result):
            arg = kwargs[name]
            assert type(out) is type(arg), f"{name}_out is a {type(out)}, not a {type(arg)}"
            out = _as_torch(out)
            assert out.dtype == TORCH_DTYPES[case.dtype], f"{name}_out is {out.dtype}"
            assert out.shape == _as_torch(arg).shape and out.is_contiguous(), (
                f"{name}_out has shape {tuple(out.shape)}, strides {out.stride()}")
            outs.append(out)
    if device == "cuda":
        torch.cuda.synchronize()

    for name, out, (exp, mag) in zip("qk", outs, expected):
        _assert_close(out.reshape(exp.shape), exp, mag, case.dtype, arithmetic, name)
    kept = torch.ones_like(built.buffer, dtype=torch.bool)
    if case.op == "inplace":
        _qkv_view(kept, case)[..., :(case.heads[0] + case.heads[1]) * case.head_dim] = False
    assert torch.equal(_bits(built.buffer[kept]), _bits(before["qkv"][kept])), (
        "wrote outside the q and k heads (v heads, padding or poison)")
    for name, now in others.items():
        assert torch.equal(_bits(now), _bits(before[name])), f"{name} was written"


# ============================================================================ CPU part


@settings(max_examples=300, deadline=None, database=None)
@seed(SEED)
@given(case=cases(frameworks=("torch", "numpy"), max_tokens=64, max_heads=(6, 4, 4),
                  max_pos=300))
def test_cpu_valid_calls_match_independent_formula(case):
    note(REPRODUCE)
    _check_valid_case(case, "cpu", CPU_ARITHMETIC)


# ----------------------------------------------------------------------------- invalid calls
# Each mutation takes (draw, case, kwargs), breaks one argument of the valid call in kwargs,
# and returns (exception type, regex its message must match). Mistyped values equal to the
# good ones (1.0 == 1 == True) are drawn on purpose: the plan cache must not match them.


def _fresh(case, shape, dtype):
    return _to_framework(torch.randn(shape, dtype=torch.float64).to(TORCH_DTYPES[dtype]),
                         case.framework)


def _cast(array, dtype, case):
    return _to_framework(_as_torch(array).to(TORCH_DTYPES[dtype]), case.framework)


def _strided_last(array, case):
    """A copy of ``array`` whose last dim has stride 2."""
    return _to_framework(_as_torch(array).repeat_interleave(2, dim=-1)[..., ::2],
                         case.framework)


def _bad_activation_dtype(draw, case, kwargs):
    name = "qkv" if case.op == "inplace" else draw(st.sampled_from(("q", "k")))
    dtype = draw(st.sampled_from(("float64", "int32", "int16", "int8", "uint8", "bool")))
    kwargs[name] = _cast(kwargs[name], dtype, case)
    return TypeError, f"^{name} must be one of"


def _strided_activation(draw, case, kwargs):
    name = "qkv" if case.op == "inplace" else draw(st.sampled_from(("q", "k")))
    kwargs[name] = _strided_last(kwargs[name], case)
    return ValueError, f"^{name} must be contiguous in its last dim"


def _bad_head_dim(draw, case, kwargs):
    bad = draw(st.one_of(st.sampled_from((16, 528, 1024)),
                         st.integers(1, 520).filter(lambda d: d % 16)))
    hq, hk, hv = case.heads
    if case.op == "inplace":
        kwargs["qkv"] = _fresh(case, (*case.lead, (hq + hk + hv) * bad), case.dtype)
        kwargs["head_dim"] = bad
    else:
        kwargs["q"] = _fresh(case, (*case.lead, hq, bad), case.dtype)
        kwargs["k"] = _fresh(case, (*case.lead, hk, bad), case.dtype)
    return ValueError, "^head_dim must be a multiple of 16"


def _bad_rotary(draw, case, kwargs):
    half = case.head_dim // 2
    kind = draw(st.sampled_from(("odd", "too_wide", "mismatch", "type")))
    if kind == "mismatch":
        kwargs["rotary_dim"] = draw(st.integers(1, half).map(lambda h: 2 * h)
                                    .filter(lambda r: r != case.rotary))
        return ValueError, r"^cos_sin_cache must be \[max_position, rotary_dim"
    if kind == "type":
        kwargs["rotary_dim"] = draw(st.sampled_from((float(case.rotary), str(case.rotary), 0,
                                                     -2)))
        return ValueError, "^rotary_dim must be"
    width = draw(st.integers(0, half - 1).map(lambda h: 2 * h + 1) if kind == "odd"
                 else st.integers(half + 1, half + 32).map(lambda h: 2 * h))
    kwargs["cos_sin_cache"] = _fresh(case, (case.max_pos, width), case.cache_dtype)
    if draw(st.booleans()):
        kwargs["rotary_dim"] = width
    else:
        kwargs.pop("rotary_dim", None)
    return ValueError, "^rotary_dim must be"


def _bad_positions(draw, case, kwargs):
    if draw(st.booleans()):
        dtype = draw(st.sampled_from(("float32", "float64", "int16", "int8", "uint8", "bool")))
        kwargs["positions"] = _cast(kwargs["positions"], dtype, case)
        return TypeError, "^positions must be int32 or int64"
    lead = case.lead
    shapes = [(*lead, 1), (2, *lead)]
    if lead:
        shapes += [lead[:-1], (*lead[:-1], lead[-1] + 1)]
    kwargs["positions"] = _fresh(case, draw(st.sampled_from(shapes)), case.pos_dtype)
    return ValueError, "^positions must have shape"


def _bad_weight(draw, case, kwargs):
    kwargs["norm"] = "rms" if case.norm == "none" else case.norm
    d = case.head_dim
    name = draw(st.sampled_from(("q_weight", "k_weight")))
    good = kwargs[name] if kwargs[name] is not None else _fresh(case, (d,), case.dtype)
    kinds = ("shape", "dtype", "strided") + (("mixed",) if case.dtype != "float32" else ())
    kind = draw(st.sampled_from(kinds))
    if kind == "shape":
        shape = draw(st.sampled_from(((d + 16,), (d - 16,), (d // 2,), (1, d), ())))
        kwargs[name] = _fresh(case, shape, str(_as_torch(good).dtype).removeprefix("torch."))
        return ValueError, f"^{name} must have shape"
    if kind == "dtype":
        dtype = draw(st.sampled_from([t for t in ("float64", "int32", "int16")
                                      + _float_dtypes(case.framework)
                                      if t not in (case.dtype, "float32")]))
        kwargs[name] = _cast(good, dtype, case)
        return TypeError, f"^{name} must be"
    if kind == "strided":
        kwargs[name] = _strided_last(good, case)
        return ValueError, f"^{name} must be contiguous"
    kwargs["q_weight"] = _fresh(case, (d,), "float32")
    kwargs["k_weight"] = _fresh(case, (d,), case.dtype)
    return TypeError, "^q_weight and k_weight must share a dtype"


def _weights_without_norm(draw, case, kwargs):
    kwargs["norm"] = "none"
    name = draw(st.sampled_from(("q_weight", "k_weight")))
    if kwargs[name] is None:
        kwargs[name] = _fresh(case, (case.head_dim,), case.dtype)
    return ValueError, "^norm='none' takes no weights"


def _bad_norm(draw, case, kwargs):
    kwargs["norm"] = draw(st.sampled_from(("RMS", "layer", "", "rmsnorm", "gemma ", None, 1)))
    return ValueError, "^norm must be one of"


def _bad_eps(draw, case, kwargs):
    kwargs["eps"] = draw(st.sampled_from((-1e-6, -1.0, float("nan"), float("inf"),
                                          -float("inf"), "1e-6", None, True, False)))
    return ValueError, "^eps must be a finite float"


def _bad_is_neox(draw, case, kwargs):
    kwargs["is_neox"] = draw(st.sampled_from((1, 0, "True", None, np.bool_(case.is_neox))))
    return TypeError, "^is_neox must be a bool"


def _bad_cache(draw, case, kwargs):
    cache = kwargs["cos_sin_cache"]
    kind = draw(st.sampled_from(("dtype", "rank", "empty", "strided")))
    if kind == "dtype":
        dtype = draw(st.sampled_from(("float64", "int32", "int16")))
        kwargs["cos_sin_cache"] = _cast(cache, dtype, case)
        return TypeError, "^cos_sin_cache must be one of"
    if kind == "strided":
        kwargs["cos_sin_cache"] = _strided_last(cache, case)
        return ValueError, "^cos_sin_cache must be contiguous"
    kwargs["cos_sin_cache"] = (cache[:0] if kind == "empty"
                               else draw(st.sampled_from((cache[0], cache[None]))))
    return ValueError, r"^cos_sin_cache must be \[max_position >= 1"


def _mixed_frameworks(draw, case, kwargs):
    positions = kwargs["positions"]
    kwargs["positions"] = (torch.from_numpy(positions) if case.framework == "numpy"
                           else positions.numpy())
    return TypeError, r"^positions is a \w+ array but"


def _not_an_array(draw, case, kwargs):
    name = draw(st.sampled_from(("positions", "cos_sin_cache")))
    kwargs[name] = _as_torch(kwargs[name]).tolist()
    return TypeError, "^expected a torch.Tensor"


def _bad_width(draw, case, kwargs):
    name = draw(st.sampled_from(("columns", "num_q_heads", "num_kv_heads", "num_v_heads")))
    if name == "columns":
        kwargs["qkv"] = kwargs["qkv"][..., :-draw(st.integers(1, case.head_dim))]
    else:
        kwargs[name] = dict(zip(("num_q_heads", "num_kv_heads", "num_v_heads"),
                                case.heads))[name] + 1
    return ValueError, r"^qkv must be \["


def _bad_count(draw, case, kwargs):
    name = draw(st.sampled_from(("num_q_heads", "num_kv_heads", "num_v_heads", "head_dim")))
    good = dict(zip(("num_q_heads", "num_kv_heads", "num_v_heads", "head_dim"),
                    (*case.heads, case.head_dim)))[name]
    below = -1 if name == "num_v_heads" else 0
    # None is num_v_heads' default, so it is only bad for the others.
    kwargs[name] = draw(st.sampled_from((below, float(good), str(good), True)
                                        + ((None,) if name != "num_v_heads" else ())))
    return ValueError, f"^{name} must be an int"


def _mismatched_q_k_dtype(draw, case, kwargs):
    other = draw(st.sampled_from([t for t in _float_dtypes(case.framework) if t != case.dtype]))
    kwargs["k"] = _cast(kwargs["k"], other, case)
    return TypeError, "^k must have q's dtype"


def _bad_split_shapes(draw, case, kwargs):
    hk, d, lead = case.heads[1], case.head_dim, case.lead
    kind = draw(st.sampled_from(("k_lead", "k_head_dim", "q_rank", "k_no_heads")))
    if kind == "q_rank":
        kwargs["q"] = _fresh(case, (d,), case.dtype)
        return ValueError, r"^q must be \[\.\.\., heads, head_dim\]"
    if kind == "k_no_heads":
        kwargs["k"] = _fresh(case, (*lead, 0, d), case.dtype)
        return ValueError, "^k must have at least one head"
    shapes = ([(2, *lead, hk, d)] + ([(*lead[:-1], lead[-1] + 1, hk, d)] if lead else [])
              if kind == "k_lead" else [(*lead, hk, d + 16), (*lead, hk, d - 16)])
    kwargs["k"] = _fresh(case, draw(st.sampled_from(shapes)), case.dtype)
    return ValueError, r"^k must be \["


MUTATIONS = {
    "activation dtype": _bad_activation_dtype, "head_dim": _bad_head_dim,
    "rotary_dim": _bad_rotary, "positions": _bad_positions, "weight": _bad_weight,
    "weights without norm": _weights_without_norm, "norm": _bad_norm, "eps": _bad_eps,
    "is_neox": _bad_is_neox, "cache": _bad_cache, "mixed frameworks": _mixed_frameworks,
    "not an array": _not_an_array,
}
INPLACE_MUTATIONS = {"width": _bad_width, "counts": _bad_count}
SPLIT_MUTATIONS = {"q/k dtypes": _mismatched_q_k_dtype, "q/k shapes": _bad_split_shapes}


def _snapshot(array):
    """Bytes of an array; poison NaN compares equal to itself."""
    return _bits(_as_torch(array).detach().contiguous()).numpy().tobytes()


@settings(max_examples=600, deadline=None, database=None)
@seed(SEED)
@given(case=cases(frameworks=("torch", "numpy"), max_tokens=16, max_heads=(4, 3, 3),
                  max_pos=64),
       data=st.data())
def test_cpu_invalid_calls_raise_and_write_nothing(case, data):
    note(REPRODUCE)
    built = _build(case, "cpu")
    op, good = _call(case, built)
    mutations = {**MUTATIONS, **(INPLACE_MUTATIONS if case.op == "inplace" else SPLIT_MUTATIONS)}
    if math.prod(case.lead):  # a zero-size array has no layout to get wrong
        mutations["strided activations"] = _strided_activation
    name = data.draw(st.sampled_from(sorted(mutations)), label="mutation")
    bad = dict(good)
    error, words = mutations[name](data.draw, case, bad)
    # A plan cached by a good call of the same geometry must not let the bad call through.
    if data.draw(st.booleans(), label="after a good call"):
        op(**good)
    arrays = {n: v for n, v in bad.items() if isinstance(v, (np.ndarray, torch.Tensor))}
    arrays.update((f"{n} buffer", b) for n, b in {"qkv": built.buffer, **built.holders}.items())
    before = {n: _snapshot(v) for n, v in arrays.items()}
    with pytest.raises(error, match=words):
        op(**bad)
    for n, value in arrays.items():
        assert _snapshot(value) == before[n], f"{n} was written"


@pytest.mark.parametrize("name,bad", [("is_neox", 1), ("eps", False), ("num_kv_heads", 1.0),
                                      ("num_v_heads", 1.0), ("rotary_dim", 32.0)])
def test_cpu_mistyped_flag_raises_after_a_good_call(name, bad):
    """The fuzz's first find: the plan cache keyed on flag values alone, so after a good call a
    flag equal in value but of the wrong type (True == 1 == 1.0) skipped the checks."""
    arrays = {"qkv": np.ones((3, 4 * 32), np.float32), "positions": np.arange(3),
              "q_weight": None, "k_weight": None,
              "cos_sin_cache": cos_sin_cache64(8, 32).astype(np.float32)}
    flags = {"num_q_heads": 2, "num_kv_heads": 1, "num_v_heads": 1, "head_dim": 32, "eps": 0.0,
             "is_neox": True, "rotary_dim": 32}
    cuqk.qk_norm_rope_(**arrays, **flags)
    with pytest.raises((ValueError, TypeError), match=f"^{name} must be"):
        cuqk.qk_norm_rope_(**arrays, **{**flags, name: bad})


# ============================================================================ GPU part


@requires_gpu
@settings(max_examples=500, derandomize=False, deadline=None, database=None, print_blob=True)
@seed(SEED)
@given(case=cases(frameworks=("torch", "cupy"), max_tokens=3000, max_heads=(16, 8, 8),
                  max_pos=4096))
def test_gpu_kernels_match_independent_formula(case):
    note(REPRODUCE)
    _check_valid_case(case, "cuda", GPU_ARITHMETIC)
