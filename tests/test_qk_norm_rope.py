"""cuqk.qk_norm_rope_ / qk_norm_rope: CPU part (reference path, bad input) and GPU part (kernels
against the float64 reference on the GPU)."""

from __future__ import annotations

import dataclasses
import itertools
import sys
import zlib

import numpy as np
import pytest
from conftest import HAS_GPU, TOLERANCES, assert_matches, cos_sin_cache64, requires_gpu

import cuqk
from cuqk import reference

DTYPES = ("bfloat16", "float16", "float32")
HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256, 512)


# ============================================================================ CPU part


def _numpy_case(seed=0, T=6, Hq=4, Hk=2, Hv=2, D=64, rotary=None, max_pos=50):
    rng = np.random.default_rng(seed)
    rotary = rotary or D
    qkv = rng.standard_normal((T, (Hq + Hk + Hv) * D)).astype(np.float32)
    pos = rng.integers(0, max_pos, T)
    cache = cos_sin_cache64(max_pos, rotary).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(D)).astype(np.float32)
    return {"qkv": qkv, "positions": pos, "q_weight": w, "k_weight": w[::-1].copy(),
                "cos_sin_cache": cache}, {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": D}


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("norm", ["rms", "gemma", "none"])
def test_cpu_numpy_inplace_matches_reference(is_neox, norm):
    arrays, dims = _numpy_case(rotary=32)
    if norm == "none":
        arrays.update(q_weight=None, k_weight=None)
    orig = arrays["qkv"].copy()
    ref = reference.qkv_norm_rope(orig, arrays["positions"], arrays["q_weight"],
                                  arrays["k_weight"], arrays["cos_sin_cache"], **dims,
                                  is_neox=is_neox, norm=norm)
    out = cuqk.qk_norm_rope_(*arrays.values(), **dims, is_neox=is_neox, norm=norm)
    assert out is arrays["qkv"]
    assert_matches(out, ref, "float32", "numpy in place")
    v_start = (dims["num_q_heads"] + dims["num_kv_heads"]) * dims["head_dim"]
    assert np.array_equal(out[:, v_start:], orig[:, v_start:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_torch_out_of_place(dtype):
    torch = pytest.importorskip("torch")
    arrays, dims = _numpy_case(seed=1)
    Hq, Hk, D = dims["num_q_heads"], dims["num_kv_heads"], dims["head_dim"]
    qkv = torch.from_numpy(arrays["qkv"]).to(getattr(torch, dtype))
    q = qkv[:, : Hq * D].view(-1, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hk) * D].view(-1, Hk, D)
    w = torch.from_numpy(arrays["q_weight"])
    pos = torch.from_numpy(arrays["positions"])
    cache = torch.from_numpy(arrays["cos_sin_cache"])
    q_out, k_out = cuqk.qk_norm_rope(q, k, pos, w, w, cache)
    assert q_out.dtype == qkv.dtype and q_out.shape == q.shape and k_out.shape == k.shape
    q_ref, k_ref = reference.qk_norm_rope(q.double().numpy(), k.double().numpy(), pos.numpy(),
                                          w.numpy(), w.numpy(), cache.numpy())
    assert_matches(q_out.double().numpy(), q_ref, dtype, "q")
    assert_matches(k_out.double().numpy(), k_ref, dtype, "k")


def test_cpu_zero_tokens():
    arrays, dims = _numpy_case(T=0)
    out = cuqk.qk_norm_rope_(*arrays.values(), **dims)
    assert out.shape[0] == 0


def _bad_inputs():
    """(description, change to the valid numpy case, exception type, words the message has)."""
    f16 = np.float16
    return [
        ("qkv int", lambda a, d: a.update(qkv=a["qkv"].astype(np.int32)), TypeError, "qkv"),
        ("qkv width", lambda a, d: a.update(qkv=a["qkv"][:, :-64]), ValueError, "qkv"),
        ("qkv last dim strided", lambda a, d: a.update(
            qkv=np.repeat(a["qkv"], 2, axis=1)[:, ::2]), ValueError, "contiguous"),
        ("head_dim 40", lambda a, d: d.update(head_dim=40), ValueError, "head_dim"),
        ("head_dim 528", lambda a, d: d.update(head_dim=528), ValueError, "head_dim"),
        ("num_q_heads 0", lambda a, d: d.update(num_q_heads=0), ValueError, "num_q_heads"),
        ("num_kv_heads float", lambda a, d: d.update(num_kv_heads=2.0), ValueError,
         "num_kv_heads"),
        ("positions float", lambda a, d: a.update(
            positions=a["positions"].astype(np.float32)), TypeError, "positions"),
        ("positions shape", lambda a, d: a.update(positions=a["positions"][:-1]), ValueError,
         "positions"),
        ("q_weight dtype", lambda a, d: a.update(q_weight=a["q_weight"].astype(f16)),
         TypeError, "q_weight"),
        ("k_weight shape", lambda a, d: a.update(k_weight=a["k_weight"][:-1]), ValueError,
         "k_weight"),
        ("weights dtypes differ", lambda a, d: (a.update(qkv=a["qkv"].astype(f16)), a.update(
            q_weight=a["q_weight"].astype(f16))), TypeError, "share a dtype"),
        ("cache int", lambda a, d: a.update(
            cos_sin_cache=a["cos_sin_cache"].astype(np.int32)), TypeError, "cos_sin_cache"),
        ("cache 1-D", lambda a, d: a.update(cos_sin_cache=a["cos_sin_cache"][0]), ValueError,
         "cos_sin_cache"),
        ("cache odd width", lambda a, d: a.update(
            cos_sin_cache=a["cos_sin_cache"][:, :-1]), ValueError, "rotary_dim"),
        ("rotary_dim mismatch", lambda a, d: d.update(rotary_dim=32), ValueError,
         "cos_sin_cache"),
        ("rotary_dim > head_dim", lambda a, d: a.update(
            cos_sin_cache=np.zeros((5, 80), np.float32)), ValueError, "rotary_dim"),
        ("norm name", lambda a, d: d.update(norm="layer"), ValueError, "norm"),
        ("norm none with weights", lambda a, d: d.update(norm="none"), ValueError, "weights"),
        ("eps negative", lambda a, d: d.update(eps=-1.0), ValueError, "eps"),
        ("eps nan", lambda a, d: d.update(eps=float("nan")), ValueError, "eps"),
        ("is_neox int", lambda a, d: d.update(is_neox=1), TypeError, "is_neox"),
        ("list input", lambda a, d: a.update(positions=list(a["positions"])), TypeError,
         "expected"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_cpu_bad_input_raises_and_writes_nothing(case):
    _, change, exc_type, words = case
    arrays, dims = _numpy_case()
    change(arrays, dims)
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}
    with pytest.raises(exc_type, match=words):
        cuqk.qk_norm_rope_(*arrays.values(), **dims)
    for name, value in arrays.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, before[name], equal_nan=True), f"{name} was written"


def test_cpu_mixed_frameworks_raise():
    torch = pytest.importorskip("torch")
    arrays, dims = _numpy_case()
    arrays["positions"] = torch.from_numpy(arrays["positions"])
    with pytest.raises(TypeError, match="positions is a torch array"):
        cuqk.qk_norm_rope_(*arrays.values(), **dims)


def test_cpu_out_of_place_bad_shapes():
    arrays, _ = _numpy_case()
    q = arrays["qkv"][:, :256].reshape(6, 4, 64)
    k = arrays["qkv"][:, 256:384].reshape(6, 2, 64)
    args = (arrays["positions"], arrays["q_weight"], arrays["k_weight"], arrays["cos_sin_cache"])
    with pytest.raises(ValueError, match="k must be"):
        cuqk.qk_norm_rope(q, k[:5], *args)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        cuqk.qk_norm_rope(q, k.astype(np.float16), *args)
    with pytest.raises(ValueError, match="q must be"):
        cuqk.qk_norm_rope(q[0, 0], k, *args)


# ============================================================================ GPU part
if HAS_GPU:
    import cupy
    import torch

    TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                    "float32": torch.float32}


def _ref_on_gpu(x64, positions, q_weight, k_weight, cache, **kwargs):
    """cuqk.reference evaluated by CuPy in float64 on the GPU; torch float64 in and out."""
    as_cp = (lambda t: None if t is None else cupy.from_dlpack(t.detach().double().contiguous()))
    positions = None if positions is None else cupy.from_dlpack(positions.contiguous())
    out = reference.qkv_norm_rope(as_cp(x64), positions,
                                  as_cp(q_weight), as_cp(k_weight), as_cp(cache),
                                  xp=cupy, **kwargs)
    return torch.from_dlpack(out)


def _rel_l2_gpu(out, ref):
    out = out.double()
    bad = ~torch.isfinite(out)
    if not torch.equal(bad, ~torch.isfinite(ref)):
        return float("inf")
    diff = torch.linalg.vector_norm((out - ref)[~bad])
    norm = torch.linalg.vector_norm(ref[~bad])
    return float(diff / norm) if norm else float(diff)


LAYOUTS = ("contiguous", "strided", "misaligned", "3d", "noncollapsible")


_BUFFER_SHAPES = {
    "contiguous": lambda T, W: (T, W),
    "strided": lambda T, W: (T, W + 48),
    "misaligned": lambda T, W: (T * W + 1,),
    "3d": lambda T, W: (2, T, W),
    "noncollapsible": lambda T, W: (2, T + 3, W + 16),
}
_VIEWS = {
    "contiguous": lambda b, T, W: b,
    "strided": lambda b, T, W: b[:, :W],
    "misaligned": lambda b, T, W: b[1:].view(T, W),
    "3d": lambda b, T, W: b,
    "noncollapsible": lambda b, T, W: b[:, :T, :W],
}


# Views that start 1 to 7 elements past a 16-byte boundary, rows one element longer than
# the data, so each row starts at a different misalignment (the realigning instances).
for _shift in range(1, 8):
    _BUFFER_SHAPES[f"shifted{_shift}"] = lambda T, W, s=_shift: (T * (W + 1) + s,)
    _VIEWS[f"shifted{_shift}"] = lambda b, T, W, s=_shift: b[s:s + T * (W + 1)].view(
        T, W + 1)[:, :W]


def _packed_view(T, width, dtype, layout, gen):
    """A qkv view of ``layout`` inside a NaN-poisoned buffer, filled with N(0, 1) values.

    Returns (buffer, view). Only the view's elements hold data; the rest stays NaN.
    """
    buf = torch.full(_BUFFER_SHAPES[layout](T, width), float("nan"),
                     dtype=TORCH_DTYPES[dtype], device="cuda")
    view = _VIEWS[layout](buf, T, width)
    view.copy_(torch.randn(view.shape, generator=gen, device="cuda", dtype=torch.float32))
    return buf, view


def _positions(lead, max_pos, pos_dtype, gen, mrope=None, positions="random"):
    """Positions for ``lead`` tokens: random, None (token t reads row t), or for mRoPE
    ``(3, *lead)``, random per row or ("text") three equal rows."""
    if positions == "none":
        return None
    shape = lead if mrope is None else (3, *lead)
    pos = torch.randint(0, max_pos, shape, generator=gen, device="cuda",
                        dtype=getattr(torch, pos_dtype))
    if positions == "text":
        pos[1:] = pos[0]
    return pos


def _mrope_flags(mrope, rotary):
    """mrope = None, "sectioned" or "interleaved": Qwen2-VL-like or Qwen3-VL-like sections
    scaled to ``rotary / 2`` frequencies."""
    if mrope is None:
        return {}
    half = rotary // 2
    s1 = s2 = (3 * half) // 8 if mrope == "sectioned" else (5 * half) // 16
    return {"mrope_section": (half - s1 - s2, s1, s2), "mrope_interleaved": mrope == "interleaved"}


def run_packed(dtype="bfloat16", T=7, Hq=4, Hk=2, Hv=2, D=128, rotary=None, is_neox=True,
               norm="rms", weight="act", cache_dtype="float32", pos_dtype="int64",
               layout="contiguous", max_pos=4096, seed=0, bad_positions=False, use_cupy=False,
               rope_first=False, mrope=None, positions="random"):
    """Run one in-place case on the GPU and check it against the float64 reference."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rotary = rotary or D
    width = (Hq + Hk + Hv) * D
    buf, qkv = _packed_view(T, width, dtype, layout, gen)
    lead = qkv.shape[:-1]
    if positions == "none":
        max_pos = max(1, qkv[..., 0].numel())  # exactly one row per token
    positions = _positions(lead, max_pos, pos_dtype, gen, mrope, positions)
    if bad_positions:
        flat = positions.view(-1)
        flat[::3] = -1
        flat[1::3] = max_pos
    cache = torch.from_numpy(cos_sin_cache64(max_pos, rotary)).cuda().to(
        TORCH_DTYPES[cache_dtype])
    weights = [None, None]
    if weight is not None:
        wdt = TORCH_DTYPES[dtype if weight == "act" else weight]
        weights = [1 + 0.5 * torch.randn(D, generator=gen, device="cuda").to(wdt)
                   for _ in range(2)]
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": D}
    flags = {"eps": 1e-6, "is_neox": is_neox, "norm": norm, "rope_first": rope_first,
             **_mrope_flags(mrope, rotary)}
    ref = _ref_on_gpu(qkv, positions, *weights, cache, **dims, **flags)
    before = buf.clone()

    args = (qkv, positions, *weights, cache)
    if use_cupy:
        args = tuple(None if a is None else cupy.from_dlpack(a) for a in args)
    out = cuqk.qk_norm_rope_(*args, **dims, **flags, num_v_heads=Hv,
                             rotary_dim=rotary if rotary != D else None)
    assert out is args[0]
    torch.cuda.synchronize()

    k_end = (Hq + Hk) * D
    err = _rel_l2_gpu(qkv[..., :k_end], ref[..., :k_end])
    assert err <= TOLERANCES[dtype], f"relative L2 error {err:.3g} ({dtype})"
    # Everything outside the q and k heads (v heads, row padding, poison) is bit-for-bit intact.
    untouched = torch.ones_like(buf, dtype=torch.bool)
    _VIEWS[layout](untouched, T, width)[..., :k_end] = False
    bits = torch.int32 if dtype == "float32" else torch.int16
    assert torch.equal(buf.view(bits)[untouched], before.view(bits)[untouched]), "wrote outside q/k"
    return qkv


def _grid_main():
    """dtype x head_dim x style x (full, partial) rotary; T and layout cycle through."""
    cases = []
    token_counts = itertools.cycle((1, 7, 33, 1000))
    for dtype, D, is_neox, partial in itertools.product(DTYPES, HEAD_DIMS, (True, False),
                                                        (False, True)):
        rotary = D // 2 if partial else D
        cases.append({"dtype": dtype, "D": D, "is_neox": is_neox, "rotary": rotary,
                          "T": next(token_counts)})
    return cases


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@requires_gpu
@pytest.mark.parametrize("case", _grid_main(), ids=_case_id)
def test_gpu_grid(case):
    run_packed(**case, seed=zlib.crc32(_case_id(case).encode()))


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,weight", [("rms", "act"), ("rms", "float32"), ("rms", None),
                                         ("gemma", "act"), ("gemma", "float32"),
                                         ("none", None)])
def test_gpu_norm_and_weights(dtype, norm, weight):
    run_packed(dtype=dtype, norm=norm, weight=weight, T=100)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize("pos_dtype", ["int32", "int64"])
def test_gpu_cache_and_position_dtypes(dtype, cache_dtype, pos_dtype):
    run_packed(dtype=dtype, cache_dtype=cache_dtype, pos_dtype=pos_dtype, T=50, D=64,
               is_neox=pos_dtype == "int64")


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("is_neox", [True, False])
def test_gpu_layouts(dtype, layout, is_neox):
    run_packed(dtype=dtype, layout=layout, is_neox=is_neox, T=37, D=96, rotary=64)


@requires_gpu
@pytest.mark.parametrize("D,rotary", [(32, 2), (48, 6), (80, 34), (80, 80), (112, 40),
                                      (496, 310), (512, 8)])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_odd_rotary_and_head_dims(D, rotary, is_neox, dtype):
    """Partial rotary that is not a multiple of the vector width x GPT-J x odd head_dim."""
    run_packed(dtype=dtype, D=D, rotary=rotary, is_neox=is_neox, T=19, Hq=3, Hk=1, Hv=0)


@requires_gpu
@pytest.mark.parametrize("T", [0, 1, 7, 1000, 70000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_token_counts(T, dtype):
    run_packed(dtype=dtype, T=T, Hq=32, Hk=8, Hv=8, D=128, max_pos=100000)


@requires_gpu
def test_gpu_qwen3_shape_gptj_d256_long():
    run_packed(dtype="bfloat16", T=70000, Hq=16, Hk=4, Hv=4, D=256, is_neox=False,
               max_pos=131072)


@requires_gpu
@pytest.mark.parametrize("is_neox", [True, False])
def test_gpu_out_of_range_positions_give_nan_rows(is_neox):
    qkv = run_packed(T=30, bad_positions=True, is_neox=is_neox, rotary=64)
    assert torch.isnan(qkv[0, :64]).any() or torch.isnan(qkv[0, 64:128]).any()


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_cupy_inplace(dtype):
    run_packed(dtype=dtype, T=64, use_cupy=True, layout="strided")


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["packed_views", "transposed", "batched"])
@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_gpu_out_of_place(dtype, layout, framework):
    gen = torch.Generator(device="cuda").manual_seed(3)
    T, Hq, Hk, D = 45, 8, 2, 128
    tdt = TORCH_DTYPES[dtype]
    if layout == "packed_views":
        qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=gen, device="cuda").to(tdt)
        q = qkv[:, : Hq * D].view(T, Hq, D)
        k = qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
        lead = (T,)
    elif layout == "transposed":
        q = torch.randn(Hq, T, D, generator=gen, device="cuda").to(tdt).transpose(0, 1)
        k = torch.randn(Hk, T, D, generator=gen, device="cuda").to(tdt).transpose(0, 1)
        lead = (T,)
    else:
        q = torch.randn(3, T, Hq, D, generator=gen, device="cuda").to(tdt)
        k = torch.randn(3, T, Hk, D, generator=gen, device="cuda").to(tdt)
        lead = (3, T)
    positions = torch.randint(0, 500, lead, generator=gen, device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(500, D)).cuda().float()
    qw = torch.randn(D, generator=gen, device="cuda").to(tdt)
    kw = torch.randn(D, generator=gen, device="cuda").to(tdt)
    q_before, k_before = q.clone(), k.clone()
    args = (q, k, positions, qw, kw, cache)
    if framework == "cupy":
        args = tuple(cupy.from_dlpack(a) for a in args)
    q_out, k_out = cuqk.qk_norm_rope(*args, is_neox=False)
    assert type(q_out) is type(args[0])
    q_out, k_out = torch.from_dlpack(q_out), torch.from_dlpack(k_out)
    torch.cuda.synchronize()
    assert q_out.is_contiguous() and q_out.shape == q.shape and k_out.shape == k.shape
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    as_cp = (lambda t: cupy.from_dlpack(t.double().contiguous()))
    q_ref, k_ref = reference.qk_norm_rope(as_cp(q), as_cp(k), cupy.from_dlpack(positions),
                                          as_cp(qw), as_cp(kw), as_cp(cache), is_neox=False,
                                          xp=cupy)
    for out, ref, name in ((q_out, q_ref, "q"), (k_out, k_ref, "k")):
        err = _rel_l2_gpu(out, torch.from_dlpack(ref))
        assert err <= TOLERANCES[dtype], f"{name}: relative L2 error {err:.3g}"


@requires_gpu
def test_gpu_bad_device_mix_writes_nothing():
    qkv = torch.randn(4, 8 * 64, device="cuda", dtype=torch.bfloat16)
    before = qkv.clone()
    cache = torch.from_numpy(cos_sin_cache64(16, 64)).float()
    with pytest.raises(ValueError, match="cos_sin_cache is on the CPU but qkv is on cuda:0"):
        cuqk.qk_norm_rope_(qkv, torch.zeros(4, dtype=torch.long, device="cuda"), None, None,
                           cache, num_q_heads=4, num_kv_heads=2, head_dim=64)
    with pytest.raises(TypeError, match="positions is a cupy array"):
        cuqk.qk_norm_rope_(qkv, cupy.zeros(4, dtype=cupy.int64), None, None, cache.cuda(),
                           num_q_heads=4, num_kv_heads=2, head_dim=64)
    torch.cuda.synchronize()
    assert torch.equal(qkv, before)


@requires_gpu
def test_gpu_runs_on_current_stream():
    """Work queued on a side stream before the call is seen by the call (same stream)."""
    D, Hq, Hk = 128, 8, 2
    qkv = torch.randn(4096, (Hq + 2 * Hk) * D, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 64, (4096,), device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(64, D)).cuda().float()
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": D}
    expected = qkv.clone().mul_(3)
    cuqk.qk_norm_rope_(expected, positions, None, None, cache, **dims)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)
        qkv.mul_(3)
        cuqk.qk_norm_rope_(qkv, positions, None, None, cache, **dims)
    torch.cuda.synchronize()
    assert torch.equal(qkv, expected)


@pytest.mark.parametrize("inplace", [True, False])
def test_cpu_requires_grad_is_refused_until_backward_exists(inplace):
    torch = pytest.importorskip("torch")
    arrays, dims = _numpy_case()
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    t["q_weight"].requires_grad_(True)
    q = t["qkv"][:, :256].reshape(6, 4, 64)
    k = t["qkv"][:, 256:384].reshape(6, 2, 64)
    before = t["qkv"].clone()

    def call():
        if inplace:
            return cuqk.qk_norm_rope_(*t.values(), **dims)
        return cuqk.qk_norm_rope(q, k, t["positions"], t["q_weight"], t["k_weight"],
                                 t["cos_sin_cache"])

    with pytest.raises(TypeError, match="q_weight require grad"):
        call()
    assert torch.equal(t["qkv"], before)
    with torch.no_grad():
        call()
    with torch.inference_mode():
        call()


@pytest.mark.parametrize("framework", ["numpy", "torch", "cupy"])
def test_debug_mode_names_the_bad_position(framework):
    if framework == "cupy" and not HAS_GPU:
        pytest.skip("needs a GPU")
    torch = pytest.importorskip("torch")
    arrays, dims = _numpy_case(T=6)
    arrays["positions"][4] = 50  # max_position is 50
    if framework == "torch":
        arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if HAS_GPU:
            arrays = {k: v.cuda() for k, v in arrays.items()}
    elif framework == "cupy":
        arrays = {k: cupy.asarray(v) for k, v in arrays.items()}
    before = arrays["qkv"].copy() if framework != "torch" else arrays["qkv"].clone()
    cuqk.set_debug(True)
    try:
        with pytest.raises(ValueError, match=r"positions\[4\] = 50 is outside \[0, max_posit"):
            cuqk.qk_norm_rope_(*arrays.values(), **dims)
    finally:
        cuqk.set_debug(False)
    assert bool((arrays["qkv"] == before).all()), "qkv was written"


@requires_gpu
def test_gpu_more_than_2_31_elements_last_rows_right():
    """Element offsets past 2**31 (bf16, Qwen3-8B width, 400,000 tokens: about 4.9 GB)."""
    T, Hq, Hk, Hv, D = 400_000, 32, 8, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(T, (Hq + Hk + Hv) * D, generator=gen, device="cuda", dtype=torch.bfloat16)
    assert qkv.numel() > 2**31
    positions = torch.randint(0, 4096, (T,), generator=gen, device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(4096, D)).cuda().float()
    dims = dict(num_q_heads=Hq, num_kv_heads=Hk, head_dim=D)
    rows = torch.cat([torch.arange(0, 64), torch.arange(T - 512, T)]).cuda()
    ref = _ref_on_gpu(qkv[rows], positions[rows], None, None, cache, **dims)
    cuqk.qk_norm_rope_(qkv, positions, None, None, cache, **dims)
    torch.cuda.synchronize()
    k_end = (Hq + Hk) * D
    err = _rel_l2_gpu(qkv[rows][:, :k_end], ref[:, :k_end])
    assert err <= TOLERANCES["bfloat16"], f"relative L2 error {err:.3g} in the first/last rows"


@requires_gpu
def test_gpu_eight_threads_with_their_own_streams_match_sequential():
    import threading

    D, Hq, Hk = 128, 16, 4
    dims = dict(num_q_heads=Hq, num_kv_heads=Hk, head_dim=D)
    cache = torch.from_numpy(cos_sin_cache64(2048, D)).cuda().float()
    inputs = [(torch.randn(777 + 13 * i, (Hq + 2 * Hk) * D, device="cuda",
                           dtype=torch.bfloat16),
               torch.randint(0, 2048, (777 + 13 * i,), device="cuda")) for i in range(8)]
    expected = []
    for qkv, positions in inputs:
        expected.append(cuqk.qk_norm_rope_(qkv.clone(), positions, None, None, cache, **dims))
    torch.cuda.synchronize()
    results, errors = [None] * 8, []

    def work(i):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                qkv, positions = inputs[i]
                for _ in range(20):
                    out = cuqk.qk_norm_rope_(qkv.clone(), positions, None, None, cache, **dims)
                results[i] = out
            stream.synchronize()
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


@requires_gpu
def test_gpu_in_place_allocates_no_device_memory_and_stays_flat():
    D, Hq, Hk = 128, 32, 8
    dims = dict(num_q_heads=Hq, num_kv_heads=Hk, head_dim=D)
    qkv = torch.randn(1, (Hq + 2 * Hk) * D, device="cuda", dtype=torch.bfloat16)
    positions = torch.zeros(1, dtype=torch.int64, device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(16, D)).cuda().float()
    cp_args = [cupy.from_dlpack(t) for t in (qkv, positions, cache)]
    for _ in range(1000):  # warm-up: compile, plans, thread buffers
        cuqk.qk_norm_rope_(qkv, positions, None, None, cache, **dims)
        cuqk.qk_norm_rope_(cp_args[0], cp_args[1], None, None, cp_args[2], **dims)
    torch.cuda.synchronize()
    torch_before = torch.cuda.memory_allocated()
    pool_before = cupy.get_default_memory_pool().used_bytes()
    rss_before = _rss_bytes()
    for _ in range(100_000):
        cuqk.qk_norm_rope_(qkv, positions, None, None, cache, **dims)
    for _ in range(10_000):
        cuqk.qk_norm_rope_(cp_args[0], cp_args[1], None, None, cp_args[2], **dims)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == torch_before
    assert cupy.get_default_memory_pool().used_bytes() == pool_before
    assert _rss_bytes() - rss_before < 4 << 20, "host memory grew by more than 4 MB"


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


# ===================================================== RoPE-first order, mRoPE, per-token rows


def _grid_flags():
    """Each new flag x dtype x style x (full, partial rotary); head_dim and T cycle through,
    and the vectorised and scalar (misaligned) paths alternate."""
    cases = []
    head_dims = itertools.cycle(HEAD_DIMS)
    token_counts = itertools.cycle((1, 33, 0, 1000, 7))
    layouts = itertools.cycle(("contiguous", "misaligned", "strided", "3d"))
    flags = [{"rope_first": True}, {"rope_first": True, "weight": None},
             {"rope_first": True, "norm": "gemma"}, {"mrope": "sectioned"},
             {"mrope": "interleaved"}, {"mrope": "interleaved", "rope_first": True},
             {"positions": "none"}]
    for flag, dtype, is_neox, partial in itertools.product(flags, DTYPES, (True, False),
                                                           (False, True)):
        D = next(head_dims)
        cases.append({**flag, "dtype": dtype, "is_neox": is_neox, "D": D,
                      "rotary": D // 2 if partial else D, "T": next(token_counts),
                      "layout": next(layouts)})
    return cases


@requires_gpu
@pytest.mark.parametrize("case", _grid_flags(), ids=_case_id)
def test_gpu_flags_grid(case):
    run_packed(**case, seed=zlib.crc32(_case_id(case).encode()))


@requires_gpu
@pytest.mark.parametrize("mrope", ["sectioned", "interleaved"])
@pytest.mark.parametrize("D,rotary", [(32, 2), (80, 34), (112, 40), (512, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_mrope_odd_rotary(mrope, D, rotary, dtype):
    run_packed(dtype=dtype, D=D, rotary=rotary, mrope=mrope, is_neox=rotary % 4 == 0, T=19,
               Hq=3, Hk=1, Hv=0)


@requires_gpu
@pytest.mark.parametrize("mrope", ["sectioned", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_mrope_text_rows_equal_1d_bit_for_bit(mrope, dtype):
    """Text tokens (all three positions equal) give exactly the 1-D result."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    T, Hq, Hk, D = 300, 8, 2, 128
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=gen, device="cuda").to(TORCH_DTYPES[dtype])
    pos = torch.randint(0, 4096, (T,), generator=gen, device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(4096, D)).cuda().float()
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": D}
    one_d = cuqk.qk_norm_rope_(qkv.clone(), pos, None, None, cache, **dims)
    three = cuqk.qk_norm_rope_(qkv.clone(), pos.expand(3, T), None, None, cache, **dims,
                               **_mrope_flags(mrope, D))
    torch.cuda.synchronize()
    assert torch.equal(one_d, three)


@requires_gpu
def test_gpu_mrope_models():
    """Model-shaped: Qwen2.5-VL (28/4 heads, D=128, sections 16/24/24) and Qwen3-VL
    (32/8, D=128, interleaved 24/20/20), text rows and image rows mixed."""
    for Hq, Hk, section, interleaved in ((28, 4, (16, 24, 24), False),
                                         (32, 8, (24, 20, 20), True)):
        mrope = "interleaved" if interleaved else "sectioned"
        assert _mrope_flags(mrope, 128)["mrope_section"] == section
        run_packed(dtype="bfloat16", T=2000, Hq=Hq, Hk=Hk, Hv=Hk, D=128, mrope=mrope)


@requires_gpu
@pytest.mark.parametrize("Hq, Hk, T", [(1, 1, 40000), (3, 2, 9001), (28, 4, 3000)])
@pytest.mark.parametrize("mrope", ["sectioned", "interleaved"])
def test_gpu_mrope_windows_across_tokens_and_grid_passes(Hq, Hk, T, mrope):
    """Few heads per token make a block's window of rows span many tokens (one q and one k
    head: 33 tokens, more entries than the threads carry ahead); enough tokens that every
    block works on several windows, whose boundaries fall inside tokens."""
    run_packed(dtype="bfloat16", T=T, Hq=Hq, Hk=Hk, Hv=1, D=128, mrope=mrope)


@requires_gpu
@pytest.mark.parametrize("is_neox", [True, False])
def test_gpu_llama4_shape_rope_first_weight_free(is_neox):
    """Llama 4: 40/8 heads, D=128, RoPE then a weight-free RMS norm."""
    run_packed(dtype="bfloat16", T=1000, Hq=40, Hk=8, Hv=8, D=128, is_neox=is_neox,
               rope_first=True, weight=None)


@requires_gpu
def test_gpu_mrope_out_of_range_position_is_nan_only_in_its_section():
    gen = torch.Generator(device="cuda").manual_seed(2)
    T, D = 5, 64
    qkv = torch.randn(T, 4 * D, generator=gen, device="cuda")
    pos = torch.randint(0, 32, (3, T), generator=gen, device="cuda")
    pos[2, 0] = 32  # the width row of token 0 is out of range
    cache = torch.from_numpy(cos_sin_cache64(32, D)).cuda().float()
    section = (8, 12, 12)
    cuqk.qk_norm_rope_(qkv, pos, None, None, cache, num_q_heads=2, num_kv_heads=1, head_dim=D,
                       mrope_section=section)
    torch.cuda.synchronize()
    nan = torch.isnan(qkv[0, :D])
    assert nan[20:32].all() and nan[52:64].all() and not nan[:20].any()
    assert not torch.isnan(qkv[1:]).any()


# ============================================================================ gated attention


def run_gate(dtype="bfloat16", T=9, Hq=4, Hk=2, D=128, rotary=None, is_neox=True, norm="gemma",
             layout="contiguous", mrope=None, rope_first=False, seed=0, use_cupy=False):
    """qk_norm_rope_gate against the reference; the gate must come out bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rotary = rotary or D
    tdt = TORCH_DTYPES[dtype]
    pad = 0 if layout == "contiguous" else 16
    q_buf = torch.randn(T, Hq * 2 * D + pad, generator=gen, device="cuda").to(tdt)
    k_buf = torch.randn(T, Hk * D + pad, generator=gen, device="cuda").to(tdt)
    q_gate, k = q_buf[:, pad:], k_buf[:, :Hk * D]
    # A NaN with a payload in the gate: it must be copied, not recomputed.
    bits = torch.int32 if dtype == "float32" else torch.int16
    if T:
        q_gate[0, D:D + 1].view(bits).fill_(0x7fc12345 if dtype == "float32" else 0x7f85)
    positions = _positions((T,), 4096, "int64", gen, mrope)
    cache = torch.from_numpy(cos_sin_cache64(4096, rotary)).cuda().float()
    qw, kw = (0.3 * torch.randn(D, generator=gen, device="cuda").to(tdt) for _ in range(2))
    flags = {"is_neox": is_neox, "norm": norm, "rope_first": rope_first,
             **_mrope_flags(mrope, rotary)}
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": D}
    args = (q_gate, k, positions, qw, kw, cache)
    if use_cupy:
        args = tuple(cupy.from_dlpack(a) for a in args)
    outs = cuqk.qk_norm_rope_gate(*args, **dims, **flags,
                                  rotary_dim=rotary if rotary != D else None)
    q_out, k_out, gate_out = (torch.from_dlpack(o) for o in outs)
    torch.cuda.synchronize()
    for o, width in zip((q_out, k_out, gate_out), (Hq * D, Hk * D, Hq * D)):
        assert o.shape == (T, width) and o.is_contiguous() and o.dtype == tdt
    as_cp = (lambda t: cupy.from_dlpack(t.double().contiguous()))
    refs = reference.qk_norm_rope_gate(
        as_cp(q_gate), as_cp(k), None if positions is None else cupy.from_dlpack(positions),
        as_cp(qw), as_cp(kw), as_cp(cache), **dims, **flags, xp=cupy)
    for out, ref, name in ((q_out, refs[0], "q"), (k_out, refs[1], "k")):
        err = _rel_l2_gpu(out, torch.from_dlpack(ref))
        assert err <= TOLERANCES[dtype], f"{name}: relative L2 error {err:.3g}"
    gate_in = q_gate.reshape(T, Hq, 2, D)[:, :, 1].reshape(T, Hq * D)
    assert torch.equal(gate_out.view(bits), gate_in.view(bits)), "gate not copied bit for bit"


def _grid_gate():
    cases = []
    head_dims = itertools.cycle((64, 128, 256, 80))
    token_counts = itertools.cycle((1, 0, 77, 1000))
    for dtype, is_neox, partial, layout in itertools.product(
            DTYPES, (True, False), (False, True), ("contiguous", "strided")):
        D = next(head_dims)
        cases.append({"dtype": dtype, "is_neox": is_neox, "D": D, "layout": layout,
                      "rotary": D // 4 if partial else D, "T": next(token_counts)})
    return cases


@requires_gpu
@pytest.mark.parametrize("case", _grid_gate(), ids=_case_id)
def test_gpu_gate_grid(case):
    run_gate(**case, seed=zlib.crc32(_case_id(case).encode()))


@requires_gpu
@pytest.mark.parametrize("extra", [{"norm": "rms"}, {"norm": "none"}, {"mrope": "interleaved"},
                                   {"rope_first": True}, {"use_cupy": True}],
                         ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
def test_gpu_gate_flags(extra):
    if extra.get("norm") == "none":
        pytest.skip("norm='none' takes no weights; covered by the packed grid")
    run_gate(T=50, D=128, rotary=64, **extra)


@requires_gpu
@pytest.mark.parametrize("T", [1, 1000, 20000])
def test_gpu_gate_qwen35_shape(T):
    """Qwen3.5 / Qwen3-Next: 16 q heads with gates, 2 kv heads, D=256, rotary 64."""
    run_gate(T=T, Hq=16, Hk=2, D=256, rotary=64)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", range(1, 8))
@pytest.mark.parametrize("is_neox", [True, False])
def test_gpu_views_off_the_vector_grid_every_shift(dtype, shift, is_neox):
    """Every start offset within 16 bytes and every row misalignment (odd row stride): the
    realigning instance, checked against the reference, nothing written outside q and k."""
    if dtype == "float32" and shift >= 4:
        pytest.skip("float32 has 4 shifts within 16 bytes")
    run_packed(dtype=dtype, layout=f"shifted{shift}", is_neox=is_neox, T=45, D=128, Hq=5,
               Hk=2, Hv=1)


@requires_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("flags", [{}, {"norm": "gemma"}, {"norm": "none", "weight": None},
                                   {"weight": "float32"}, {"cache_dtype": "bfloat16"},
                                   {"rope_first": True}, {"positions": "none"},
                                   {"bad_positions": True}, {"T": 1}], ids=str)
def test_gpu_unaligned_heads_in_chunks_match_reference(dtype, D, flags):
    """Unaligned full-rotary NeoX heads of 16-bit data move as aligned chunks (packed, or the
    general instance where the side inputs' dtypes rule packing out), in every flag's path;
    rows one element longer than the data give every offset within 16 bytes."""
    qnr = sys.modules["cuqk.qk_norm_rope"]
    case = {"dtype": dtype, "D": D, "Hq": 5, "Hk": 2, "Hv": 1, "T": 37, **flags}
    shift = zlib.crc32(str(sorted(case.items())).encode()) % 7 + 1
    qkv = run_packed(**case, layout=f"shifted{shift}", seed=shift)
    weight = {"act": TORCH_DTYPES[dtype], "float32": torch.float32}.get(case.get("weight", "act"))
    w = None if weight is None else torch.ones(D, device="cuda", dtype=weight)
    cache = torch.zeros(16, D, device="cuda", dtype=TORCH_DTYPES[case.get("cache_dtype",
                                                                         "float32")])
    pos = torch.zeros(qkv.shape[:-1], dtype=torch.int64, device="cuda")
    variant = qnr._plan_packed(qkv, pos, w, w, cache, 5, 2, D, 1, 1e-6, True, None,
                               case.get("norm", "rms"), False, None, False).variant
    packed = flags.get("weight") != "float32" and "cache_dtype" not in flags
    assert variant.chunks and variant.packed == packed
    assert variant.head_dim == (D if packed and D in cuqk._jit.CHUNKS_PACKED_HEAD_DIMS else 0)


@requires_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_unaligned_split_heads_move_in_chunks_where_outputs_share_the_offset(dtype):
    """Out of place, unaligned q and k move in chunks when each output head sits at its input's
    offset within 16 bytes, and with narrow accesses otherwise (another offset, new arrays);
    partial rotary and GPT-J never take chunks. All match the reference and write nothing
    outside the outputs."""
    qnr = sys.modules["cuqk.qk_norm_rope"]
    gen = torch.Generator(device="cuda").manual_seed(5)
    T, Hq, Hk, D = 29, 4, 2, 128
    tdt = TORCH_DTYPES[dtype]
    row = (Hq + Hk) * D

    def buffer(start, fill=float("nan")):
        return torch.full((T * (row + 1) + start,), fill, device="cuda", dtype=tdt)

    def views(buf, start):
        """q and k in rows one element longer than the data, from element `start` of buf."""
        rows = buf[start:].view(T, row + 1)[:, :row]
        return rows[:, :Hq * D].unflatten(1, (Hq, D)), rows[:, Hq * D:].unflatten(1, (Hk, D))

    data = buffer(3)
    data.copy_(torch.randn(data.shape, generator=gen, device="cuda"))
    q, k = views(data, 3)
    pos = torch.randint(0, 300, (T,), generator=gen, device="cuda")
    w = (1 + 0.3 * torch.randn(D, generator=gen, device="cuda")).to(tdt)
    as_cp = (lambda t: cupy.from_dlpack(t.double().contiguous()))
    for is_neox, rotary in ((True, D), (True, D // 2), (False, D)):
        cache = torch.from_numpy(cos_sin_cache64(300, rotary)).cuda().float()
        refs = reference.qk_norm_rope(as_cp(q), as_cp(k), cupy.from_dlpack(pos), as_cp(w),
                                      as_cp(w), as_cp(cache), is_neox=is_neox,
                                      rotary_dim=rotary, xp=cupy)
        for start, want_chunks in ((3, True), (11, True), (4, False), (None, False)):
            out_buf = None if start is None else buffer(start)
            out = None if start is None else views(out_buf, start)
            plan = qnr._plan_split(q, k, pos, w, w, cache, 1e-6, is_neox, rotary, "rms", False,
                                   None, False, out)
            assert not plan.variant.aligned
            assert plan.variant.chunks == (want_chunks and is_neox and rotary == D)
            got = cuqk.qk_norm_rope(q, k, pos, w, w, cache, is_neox=is_neox, rotary_dim=rotary,
                                    out=out)
            torch.cuda.synchronize()
            for o, ref in zip(got, refs):
                assert _rel_l2_gpu(o, torch.from_dlpack(ref)) <= TOLERANCES[dtype]
            if out_buf is not None:
                outside = torch.ones_like(out_buf, dtype=torch.bool)
                for view in views(outside, start):
                    view[...] = False
                assert torch.isnan(out_buf[outside]).all()


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_dispatch_realigns_views_and_keeps_scalar_for_misaligned_weights(dtype):
    qnr = sys.modules["cuqk.qk_norm_rope"]
    T, Hq, Hk, D = 8, 4, 2, 128
    width = (Hq + 2 * Hk) * D
    flat = torch.randn(T * width + 1, device="cuda").to(TORCH_DTYPES[dtype])
    pos = torch.zeros(T, dtype=torch.int64, device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(16, D)).cuda().float()
    weight_buf = torch.ones(D + 1, device="cuda").to(TORCH_DTYPES[dtype])

    def chosen(qkv, weight):
        return qnr._plan_packed(qkv, pos, weight, weight, cache, Hq, Hk, D, Hk, 1e-6, True,
                                None, "rms", False, None, False).variant

    aligned = chosen(flat[:-1].view(T, width), weight_buf[:D])
    realign = chosen(flat[1:].view(T, width), weight_buf[:D])
    scalar = chosen(flat[1:].view(T, width), weight_buf[1:])
    assert aligned.aligned and aligned.vec > 1
    assert not realign.aligned and realign.vec == cuqk._jit.wide_vec(dtype)
    assert scalar.vec == 1


def _packed_plan(tokens, head_dim=128, dtype="bfloat16", cache_dtype="float32", mrope=False,
                 hq=32, hk=8, shift=0, row_stride=None):
    """The plan of an in-place call on a packed [tokens, width] qkv ``shift`` elements past a
    16-byte boundary, its tokens ``row_stride`` elements apart (default width; planned from
    array descriptions on device 0: no GPU needed)."""
    qnr = sys.modules["cuqk.qk_norm_rope"]
    info = cuqk._interop.ArrayInfo
    width = (hq + 2 * hk) * head_dim
    itemsize = cuqk._jit.DTYPES[dtype][1]
    k_offset = hq * head_dim * itemsize
    start = (1 << 20) + shift * itemsize
    row_stride = width if row_stride is None else row_stride
    heads = [(start, (row_stride,), head_dim), (start + k_offset, (row_stride,), head_dim)] * 2
    positions = (info("torch", (3, tokens), (tokens, 1), "int64", 0, 1 << 30) if mrope else
                 info("torch", (tokens,), (1,), "int64", 0, 1 << 30))
    weight = info("torch", (head_dim,), (1,), dtype, 0, 1 << 31)
    cache = info("torch", (4096, head_dim), (head_dim, 1), cache_dtype, 0, 1 << 32)
    plan = qnr._build_plan(
        "torch", 0, dtype, (tokens,), heads, positions, weight, weight, cache, num_q_heads=hq,
        num_k_heads=hk, head_dim=head_dim, rotary_dim=head_dim, weight_dtype=dtype, eps=1e-6,
        is_neox=True, norm="rms", rope_first=False,
        mrope_section=(16, 24, 24) if mrope else None, mrope_interleaved=False, packed=True)
    return plan


def _packed_plan_variant(*args, **kwargs):
    """The variant that ``_packed_plan`` launches."""
    return _packed_plan(*args, **kwargs).variant


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_small_packed_calls_take_a_warp_per_head(dtype):
    """Up to NARROW_MAX_HEADS heads a packed call takes the narrow instance where head_dim has
    one (64 * vec), past that the wide one; mRoPE and other side dtypes never take it."""
    limit = cuqk._jit.NARROW_MAX_HEADS // 40
    wide = cuqk._jit.wide_vec(dtype)
    for head_dim in (64, 128, 256):
        narrow = cuqk._jit.narrow_vec(dtype, head_dim)
        small = _packed_plan_variant(limit, head_dim, dtype)
        assert small.packed and small.vec == (narrow or wide)
        if narrow:
            assert cuqk._jit.lanes_and_units(head_dim, small.vec) == (32, 1)
        large = _packed_plan_variant(limit + 1, head_dim, dtype)
        assert large.packed and large.vec == wide
    assert cuqk._jit.narrow_vec(dtype, 128) is not None
    assert _packed_plan_variant(1, dtype=dtype, mrope=True).vec == wide
    general = _packed_plan_variant(1, dtype=dtype, cache_dtype="float16")
    assert not general.packed and general.vec == wide


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_unaligned_calls_move_in_chunks_up_to_the_weight_table_size(dtype):
    """Unaligned in-place NeoX calls of 16-bit heads take the packed chunks instance at every
    size (it measured faster at each) for heads up to CHUNKS_MAX_HEAD_DIM, the one compiled
    for their head size where there is one; longer heads take the narrow-access one."""
    for tokens in (1, 8192, 65536):
        for head_dim in (64, 96, 128, 256):
            chunked = _packed_plan_variant(tokens, head_dim, dtype, shift=3)
            assert not chunked.aligned and chunked.chunks == chunked.packed == (dtype != "float32")
            fixed = chunked.packed and head_dim in cuqk._jit.CHUNKS_PACKED_HEAD_DIMS
            assert chunked.head_dim == (head_dim if fixed else 0)
            assert _packed_plan_variant(tokens, head_dim, dtype).aligned
        longest = _packed_plan_variant(tokens, 2 * cuqk._jit.CHUNKS_MAX_HEAD_DIM, dtype, shift=3)
        assert not longest.aligned and not longest.chunks and not longest.packed


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cpu_packed_chunks_need_tokens_16_bytes_apart_upwards(dtype):
    """The packed chunks instance reads a head's edge chunks whole, a neighbour's bytes with
    them, for every head but the first and the last of the call, which are the span's ends
    only where tokens lie at least 16 bytes apart upwards: reversed rows (a negative stride)
    take the general chunks instance, which reads only each head's own bytes."""
    width = 48 * 128
    assert _packed_plan_variant(8192, dtype=dtype, shift=3, row_stride=width).packed
    flipped = _packed_plan_variant(8192, dtype=dtype, shift=3, row_stride=-width)
    assert flipped.chunks and not flipped.packed
    assert _packed_plan_variant(1, dtype=dtype, shift=3, row_stride=-width).packed


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_wide_packed_16bit_calls_of_long_heads_prefetch_the_next_head(dtype):
    """The instance that asks the L2 for each group's next head (and stores plainly) is taken
    exactly where it measured faster: wide packed 1-D calls of 16-bit heads of at least 128
    elements; shorter heads take its twin, which streams its stores."""
    def prefetches(tokens, **kwargs):
        plan = _packed_plan(tokens, **kwargs)
        statics = dict(zip(cuqk._jit.STATIC_FIELDS, cuqk._jit._STATICS.unpack(plan.statics)))
        assert statics["prefetch_next"] == plan.variant.prefetch_next
        if plan.variant.five_blocks_per_sm and not plan.variant.prefetch_next:
            assert dataclasses.replace(plan.variant, prefetch_next=True) in cuqk._jit.VARIANTS
        return plan.variant.prefetch_next

    large = cuqk._jit.NARROW_MAX_HEADS
    sixteen_bit = dtype != "float32"
    assert prefetches(large, head_dim=128, dtype=dtype) == sixteen_bit
    assert prefetches(large, head_dim=256, dtype=dtype) == sixteen_bit
    assert not prefetches(large, head_dim=64, dtype=dtype)
    assert not prefetches(1, head_dim=128, dtype=dtype)  # narrow: one window
    assert not prefetches(large, head_dim=128, dtype=dtype, mrope=True)
    assert not prefetches(large, head_dim=128, dtype=dtype, cache_dtype="float16")  # general


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("D", [128, 256])
@pytest.mark.parametrize("flags", [{}, {"T": 1}, {"norm": "gemma"},
                                   {"norm": "none", "weight": None}, {"rope_first": True},
                                   {"rotary": 64}], ids=str)
def test_gpu_small_packed_calls_match_reference(dtype, is_neox, D, flags):
    """The narrow (warp per head) instances, where head_dim has one, in every flag's path."""
    run_packed(**{"dtype": dtype, "D": D, "is_neox": is_neox, "T": 5, **flags})


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("mrope", [None, "interleaved"])
def test_gpu_packed_instance_for_one_stride_tokens_matches_the_general_one(dtype, is_neox, mrope):
    """An in-place call whose tokens are one stride apart takes the packed instance; the same
    data laid out so the leading dims do not fold takes the general one, with the same bits, as
    do a cache that is not float32 and weights of another dtype."""
    qnr = sys.modules["cuqk.qk_norm_rope"]
    gen = torch.Generator(device="cuda").manual_seed(11)
    B, Hq, Hk, Hv, D = 3, 4, 2, 1, 128
    # Enough heads for the wide packed instance, which sums a head in the general one's order.
    S = cuqk._jit.NARROW_MAX_HEADS // (B * (Hq + Hk)) + 1
    width = (Hq + Hk + Hv) * D
    tdt = TORCH_DTYPES[dtype]
    section = (16, 24, 24) if mrope else None
    flags = {"mrope_section": section, "mrope_interleaved": mrope == "interleaved"}
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "num_v_heads": Hv, "head_dim": D}
    pos = torch.randint(0, 64, (3, B, S) if mrope else (B, S), generator=gen, device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(64, D)).cuda().float()
    w = (1 + 0.2 * torch.randn(D, generator=gen, device="cuda")).to(tdt)
    flat = torch.randn(B, S, width, generator=gen, device="cuda").to(tdt)
    gap_buffer = torch.full((B, S + 1, width), float("nan"), device="cuda", dtype=tdt)
    gapped = gap_buffer[:, :S]
    gapped.copy_(flat)

    def chosen(qkv, positions=pos, weight=w, table=cache):
        return qnr._plan_packed(qkv, positions, weight, weight, table, Hq, Hk, D, Hv, 1e-6,
                                is_neox, None, "rms", False, section,
                                flags["mrope_interleaved"]).variant

    rows = pos.view(*pos.shape[:-2], B * S)
    assert chosen(flat).packed and chosen(flat.view(B * S, width), rows).packed
    assert not chosen(gapped).packed and chosen(gapped).aligned
    if dtype != "float32":  # float32 activations take float32 weights only
        assert not chosen(flat, weight=w.float()).packed
    assert not chosen(flat, table=cache.to(torch.float16)).packed
    assert chosen(flat).is_mrope == bool(mrope)
    cuqk.qk_norm_rope_(flat, pos, w, w, cache, is_neox=is_neox, **dims, **flags)
    cuqk.qk_norm_rope_(gapped, pos, w, w, cache, is_neox=is_neox, **dims, **flags)
    torch.cuda.synchronize()
    assert torch.equal(flat, gapped)
    assert torch.isnan(gap_buffer[:, S]).all()


# ============================================================================ out= and aliasing


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_out_into_views_and_in_place(dtype):
    gen = torch.Generator(device="cuda").manual_seed(4)
    T, Hq, Hk, D = 33, 4, 2, 64
    tdt = TORCH_DTYPES[dtype]
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=gen, device="cuda").to(tdt)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
    pos = torch.randint(0, 100, (T,), generator=gen, device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(100, D)).cuda().float()
    want_q, want_k = cuqk.qk_norm_rope(q, k, pos, None, None, cache)
    # Strided views with a poisoned spare head after each row's heads.
    out_buf = torch.full((2, T, Hq + 1, D), float("nan"), device="cuda", dtype=tdt)
    outs = (out_buf[0, :, :Hq], out_buf[1, :, :Hk])
    got = cuqk.qk_norm_rope(q, k, pos, None, None, cache, out=outs)
    assert got[0] is outs[0] and got[1] is outs[1]
    torch.cuda.synchronize()
    assert torch.equal(outs[0], want_q) and torch.equal(outs[1], want_k)
    assert torch.isnan(out_buf[0, :, Hq:]).all() and torch.isnan(out_buf[1, :, Hk:]).all()
    cuqk.qk_norm_rope(q, k, pos, None, None, cache, out=(q, k))
    torch.cuda.synchronize()
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


@requires_gpu
def test_gpu_aliased_arguments_raise_and_write_nothing():
    T, Hq, Hk, D = 8, 4, 2, 64
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, device="cuda")
    before = qkv.clone()
    pos = torch.zeros(T, dtype=torch.int64, device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(16, D)).cuda().float()
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": D}
    with pytest.raises(ValueError, match="qkv overlaps q_weight"):
        cuqk.qk_norm_rope_(qkv, pos, qkv[0, :D], None, cache, **dims)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
    with pytest.raises(ValueError, match=r"out\[0\] overlaps q"):
        cuqk.qk_norm_rope(q, k, pos, None, None, cache, out=(qkv[:, D:(Hq + 1) * D].view(
            T, Hq, D), torch.empty_like(k)))
    with pytest.raises(ValueError, match=r"out\[0\] overlaps out\[1\]"):
        shared = torch.empty(T, Hq, D, device="cuda")
        cuqk.qk_norm_rope(q, k, pos, None, None, cache, out=(shared, shared[:, :Hk]))
    torch.cuda.synchronize()
    assert torch.equal(qkv, before)
    # q and k as overlapping views of one buffer are only read: that works.
    q_out, k_out = cuqk.qk_norm_rope(q, q[:, :Hk], pos, None, None, cache)
    torch.cuda.synchronize()
    assert torch.equal(q_out[:, :Hk], k_out)


@requires_gpu
def test_gpu_aliasing_caught_when_a_cached_plan_is_reused():
    """The second call has the first call's geometry (so its plan), but its weight is a view of
    qkv: the per-call pointer test must send it to the exact check."""
    T, Hq, Hk, D = 8, 4, 2, 64
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, device="cuda")
    pos = torch.zeros(T, dtype=torch.int64, device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(16, D)).cuda().float()
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": D}
    cuqk.qk_norm_rope_(qkv, pos, torch.ones(D, device="cuda"), None, cache, **dims)
    before = qkv.clone()
    with pytest.raises(ValueError, match="qkv overlaps q_weight"):
        cuqk.qk_norm_rope_(qkv, pos, qkv[1, :D], None, cache, **dims)
    # A weight in v's columns is only read next to written heads: allowed.
    cuqk.qk_norm_rope_(qkv, pos, qkv[1, (Hq + Hk) * D:(Hq + Hk + 1) * D], None, cache, **dims)
    torch.cuda.synchronize()
    assert not torch.equal(qkv, before)


def test_cpu_pointer_overlap_test_agrees_with_byte_ranges():
    rng = np.random.default_rng(7)
    qnr = sys.modules["cuqk.qk_norm_rope"]
    for _ in range(2000):
        shapes = [tuple(int(n) for n in rng.integers(0, 5, rng.integers(1, 3))) for _ in range(2)]
        infos = [cuqk._interop.ArrayInfo("torch", shape, tuple(int(st) for st in
                                         rng.integers(-3, 9, len(shape))), "float32", 0, 0)
                 for shape in shapes]
        pairs = qnr._overlap_pairs([("qkv", infos[0])], [("q_weight", infos[1])],
                                   {"qkv": 0, "q_weight": 1})
        plan = qnr._Plan("torch", 0, None, 0, b"", 0, (), None, None, [], (), pairs)
        pointers = tuple(int(p) for p in rng.integers(4096, 4096 + 256, 2))
        spans = [qnr._byte_span(inf) for inf in infos]
        lo = [p + first for p, (first, _) in zip(pointers, spans)]
        hi = [p + end for p, (_, end) in zip(pointers, spans)]
        assert qnr._ranges_meet(plan, pointers) == (lo[1] < hi[0] and lo[0] < hi[1])



def test_cpu_overlap_pairs_take_each_pair_once():
    qnr = sys.modules["cuqk.qk_norm_rope"]
    info = cuqk._interop.ArrayInfo("torch", (4, 8), (8, 1), "float32", 0, 0)
    index = {"out[0]": 2, "out[1]": 3, "q": 0, "q_weight": 7}
    pairs = qnr._overlap_pairs([("out[0]", info), ("out[1]", info)],
                               [("q", info), ("q_weight", None)], index)
    assert [(w, r) for w, r, _, _ in pairs] == [(2, 3), (2, 0), (3, 0)]


# ============================================================================ new flags on the CPU


@pytest.mark.parametrize("flags", [{"rope_first": True}, {"positions": None},
                                   {"mrope_section": (8, 12, 12)},
                                   {"mrope_section": (8, 12, 12), "mrope_interleaved": True}],
                         ids=str)
def test_cpu_flags_match_reference(flags):
    arrays, dims = _numpy_case(max_pos=64)
    flags = dict(flags)
    if "positions" in flags:
        arrays["positions"] = flags.pop("positions")
        arrays["cos_sin_cache"] = arrays["cos_sin_cache"][:6]
    if "mrope_section" in flags:
        arrays["positions"] = np.random.default_rng(1).integers(0, 64, (3, 6))
    orig = arrays["qkv"].copy()
    ref = reference.qkv_norm_rope(orig, *list(arrays.values())[1:], **dims, **flags)
    out = cuqk.qk_norm_rope_(*arrays.values(), **dims, **flags)
    assert_matches(out, ref, "float32", str(flags))


def test_cpu_rope_first_differs_from_norm_first_with_a_weight():
    arrays, dims = _numpy_case()
    first = cuqk.qk_norm_rope_(arrays["qkv"].copy(), *list(arrays.values())[1:], **dims,
                               rope_first=True)
    second = cuqk.qk_norm_rope_(arrays["qkv"].copy(), *list(arrays.values())[1:], **dims)
    assert not np.allclose(first, second)


def test_cpu_gate_matches_reference_and_copies_gate():
    rng = np.random.default_rng(3)
    T, Hq, Hk, D = 5, 4, 2, 64
    q_gate = rng.standard_normal((T, Hq * 2 * D)).astype(np.float32)
    k = rng.standard_normal((T, Hk * D)).astype(np.float32)
    pos = rng.integers(0, 50, T)
    cache = cos_sin_cache64(50, 32).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": D}
    outs = cuqk.qk_norm_rope_gate(q_gate, k, pos, w, w, cache, **dims)
    refs = reference.qk_norm_rope_gate(q_gate, k, pos, w, w, cache, **dims, norm="gemma")
    for out, ref in zip(outs, refs):
        assert_matches(out, ref, "float32", "gate op")
    assert np.array_equal(outs[2], q_gate.reshape(T, Hq, 2, D)[:, :, 1].reshape(T, Hq * D))


def _bad_flag_inputs():
    return [
        ("mrope needs positions", {"positions": None, "mrope_section": (8, 12, 12)},
         ValueError, "mrope_section needs positions"),
        ("mrope positions 1-D", {"mrope_section": (8, 12, 12)}, ValueError, r"\(3, 6\)"),
        ("mrope sum", {"mrope_section": (8, 12, 11), "positions3": True}, ValueError,
         "sum to rotary_dim // 2 = 32"),
        ("mrope two entries", {"mrope_section": (20, 12), "positions3": True}, ValueError,
         "three ints"),
        ("mrope negative", {"mrope_section": (40, -4, -4), "positions3": True}, ValueError,
         "mrope_section entry"),
        ("rope_first int", {"rope_first": 1}, TypeError, "rope_first"),
        ("interleaved str", {"mrope_interleaved": "yes"}, TypeError, "mrope_interleaved"),
    ]


@pytest.mark.parametrize("case", _bad_flag_inputs(), ids=lambda c: c[0])
def test_cpu_bad_flags_raise_and_write_nothing(case):
    _, flags, exc_type, words = case
    arrays, dims = _numpy_case()
    flags = dict(flags)
    if flags.pop("positions3", False):
        arrays["positions"] = np.zeros((3, 6), np.int64)
    if "positions" in flags:
        arrays["positions"] = flags.pop("positions")
    before = arrays["qkv"].copy()
    with pytest.raises(exc_type, match=words):
        cuqk.qk_norm_rope_(*arrays.values(), **dims, **flags)
    assert np.array_equal(arrays["qkv"], before)


def test_cpu_gate_bad_inputs():
    q_gate = np.zeros((3, 4 * 2 * 64), np.float32)
    k = np.zeros((3, 2 * 64), np.float32)
    cache = cos_sin_cache64(8, 64).astype(np.float32)
    pos = np.zeros(3, np.int64)
    dims = {"num_q_heads": 4, "num_kv_heads": 2, "head_dim": 64}
    with pytest.raises(ValueError, match=r"q_gate must be \[..., num_q_heads \* 2 \* head_dim"):
        cuqk.qk_norm_rope_gate(q_gate[:, :-64], k, pos, None, None, cache, **dims, norm="rms")
    with pytest.raises(ValueError, match="k must have q_gate's leading dims"):
        cuqk.qk_norm_rope_gate(q_gate, k[:2], pos, None, None, cache, **dims, norm="rms")
    with pytest.raises(TypeError, match="k must have q_gate's dtype"):
        cuqk.qk_norm_rope_gate(q_gate, k.astype(np.float16), pos, None, None, cache, **dims)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_nan_inf_and_zero_heads_follow_the_reference(dtype):
    """A NaN or Inf element poisons its own head as in the reference; an all-zero head gives
    zeros; nothing else is affected."""
    T, Hq, Hk, D = 6, 4, 2, 128
    gen = torch.Generator(device="cuda").manual_seed(9)
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=gen, device="cuda").to(TORCH_DTYPES[dtype])
    qkv[0, 5] = float("nan")
    qkv[1, D + 7] = float("inf")
    qkv[2, 2 * D:3 * D] = 0
    qkv[3, Hq * D + 1] = -float("inf")
    positions = torch.randint(0, 64, (T,), generator=gen, device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(64, D)).cuda().float()
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": D}
    ref = _ref_on_gpu(qkv, positions, None, None, cache, **dims)
    cuqk.qk_norm_rope_(qkv, positions, None, None, cache, **dims)
    torch.cuda.synchronize()
    k_end = (Hq + Hk) * D
    assert _rel_l2_gpu(qkv[:, :k_end], ref[:, :k_end]) <= TOLERANCES[dtype]
    assert torch.isnan(qkv[0, :D]).all() and not torch.isnan(qkv[0, D:k_end]).any()
    assert torch.equal(qkv[2, 2 * D:3 * D].float(), torch.zeros(D, device="cuda"))


# ============================================================================ the bound op


@pytest.mark.parametrize("flags", [{}, {"is_neox": False, "rotary_dim": 32, "norm": "gemma"},
                                   {"rope_first": True, "eps": 1e-5}])
def test_cpu_bound_op_matches_qk_norm_rope_(flags):
    arrays, dims = _numpy_case(seed=5)
    if flags.get("rotary_dim"):
        arrays["cos_sin_cache"] = cos_sin_cache64(50, flags["rotary_dim"]).astype(np.float32)
    want = cuqk.qk_norm_rope_(arrays["qkv"].copy(), arrays["positions"], arrays["q_weight"],
                              arrays["k_weight"], arrays["cos_sin_cache"], **dims, **flags)
    op = cuqk.QkNormRope(arrays["q_weight"], arrays["k_weight"], arrays["cos_sin_cache"],
                         **dims, **flags)
    for _ in range(2):  # the second call takes the cached plan
        got = arrays["qkv"].copy()
        assert op(got, arrays["positions"]) is got
        assert np.array_equal(got, want)


@pytest.mark.parametrize("flags, error, words", [
    ({"eps": -1.0}, ValueError, "eps"),
    ({"is_neox": 1}, TypeError, "is_neox"),
    ({"norm": "layer"}, ValueError, "norm"),
])
def test_cpu_bound_op_checks_flags_when_bound(flags, error, words):
    arrays, dims = _numpy_case()
    with pytest.raises(error, match=words):
        cuqk.QkNormRope(arrays["q_weight"], arrays["k_weight"], arrays["cos_sin_cache"],
                        **dims, **flags)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        cuqk.QkNormRope(None, None, [[1.0]], **dims)


def test_cpu_bound_op_checks_bad_arrays_at_the_call_and_writes_nothing():
    arrays, dims = _numpy_case()
    op = cuqk.QkNormRope(arrays["q_weight"][:32], arrays["k_weight"], arrays["cos_sin_cache"],
                         **dims)
    before = arrays["qkv"].copy()
    with pytest.raises(ValueError, match="q_weight must have shape"):
        op(arrays["qkv"], arrays["positions"])
    assert np.array_equal(arrays["qkv"], before)


def test_cpu_bound_op_names_a_qkv_of_another_framework_and_takes_no_positions():
    torch = pytest.importorskip("torch")
    arrays, dims = _numpy_case(seed=8)
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    op = cuqk.QkNormRope(t["q_weight"], t["k_weight"], t["cos_sin_cache"], **dims)
    with pytest.raises(TypeError, match="torch array but qkv is a numpy array"):
        op(arrays["qkv"], arrays["positions"])
    got = op(t["qkv"].clone(), None)
    want = cuqk.qk_norm_rope_(t["qkv"].clone(), None, t["q_weight"], t["k_weight"],
                              t["cos_sin_cache"], **dims)
    assert torch.equal(got, want)


def test_cpu_bound_op_rechecks_an_array_whose_memory_moved():
    torch = pytest.importorskip("torch")
    arrays, dims = _numpy_case(seed=6)
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    op = cuqk.QkNormRope(t["q_weight"], t["k_weight"], t["cos_sin_cache"], **dims)
    op(t["qkv"].clone(), t["positions"])
    t["q_weight"].data = 2 * t["q_weight"]  # new memory, new values
    got = op(t["qkv"].clone(), t["positions"])
    want = cuqk.qk_norm_rope_(t["qkv"].clone(), t["positions"], t["q_weight"], t["k_weight"],
                              t["cos_sin_cache"], **dims)
    assert torch.equal(got, want)
    t["q_weight"].data = torch.ones(dims["head_dim"] + 1)
    with pytest.raises(ValueError, match="q_weight must have shape"):
        op(t["qkv"].clone(), t["positions"])


def test_cpu_bound_op_refuses_grad_even_when_it_starts_after_binding():
    torch = pytest.importorskip("torch")
    arrays, dims = _numpy_case()
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    op = cuqk.QkNormRope(t["q_weight"], t["k_weight"], t["cos_sin_cache"], **dims)
    op(t["qkv"].clone(), t["positions"])
    t["k_weight"].requires_grad_(True)
    before = t["qkv"].clone()
    with pytest.raises(TypeError, match="k_weight require grad"):
        op(t["qkv"], t["positions"])
    assert torch.equal(t["qkv"], before)
    with torch.inference_mode():
        op(t["qkv"], t["positions"])


def test_cpu_bound_op_debug_mode_names_the_bad_position():
    arrays, dims = _numpy_case()
    op = cuqk.QkNormRope(arrays["q_weight"], arrays["k_weight"], arrays["cos_sin_cache"], **dims)
    arrays["positions"][3] = 50
    cuqk.set_debug(True)
    try:
        with pytest.raises(ValueError, match=r"positions\[3\] = 50"):
            op(arrays["qkv"], arrays["positions"])
    finally:
        cuqk.set_debug(False)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_gpu_bound_op_matches_qk_norm_rope_bit_for_bit(dtype, framework):
    if framework == "cupy" and dtype == "bfloat16":
        pytest.skip("CuPy has no bfloat16")
    gen = torch.Generator(device="cuda").manual_seed(7)
    Hq, Hk, Hv, D = 8, 2, 2, 128
    tdt = TORCH_DTYPES[dtype]
    # As many rows as tokens: positions=None reads row t for token t.
    cache = torch.from_numpy(cos_sin_cache64(3000, D)).cuda().float()
    w = [(1 + 0.2 * torch.randn(D, generator=gen, device="cuda")).to(tdt) for _ in "qk"]
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "num_v_heads": Hv, "head_dim": D}
    wrap = cupy.from_dlpack if framework == "cupy" else (lambda t: t)
    op = cuqk.QkNormRope(wrap(w[0]), wrap(w[1]), wrap(cache), **dims)
    for T in (0, 1, 33, 3000):  # zero tokens, the small and the strided grid
        qkv = torch.randn(T, (Hq + Hk + Hv) * D, generator=gen, device="cuda").to(tdt)
        pos = torch.randint(0, 3000, (T,), generator=gen, device="cuda")
        want = cuqk.qk_norm_rope_(qkv.clone(), pos, w[0], w[1], cache, **dims)
        for positions in (pos, None):
            got = qkv.clone()
            op(wrap(got), None if positions is None else wrap(positions))
            if positions is None:
                want = cuqk.qk_norm_rope_(qkv.clone(), None, w[0], w[1], cache, **dims)
            torch.cuda.synchronize()
            assert not got.isnan().any() and torch.equal(got, want), (T, positions is None)


@requires_gpu
def test_gpu_bound_op_follows_moved_weights_and_catches_aliasing():
    T, Hq, Hk, D = 8, 4, 2, 64
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, device="cuda")
    pos = torch.randint(0, 16, (T,), device="cuda")
    cache = torch.from_numpy(cos_sin_cache64(16, D)).cuda().float()
    w = torch.ones(D, device="cuda")
    dims = {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": D}
    op = cuqk.QkNormRope(w, None, cache, **dims)
    op(qkv.clone(), pos)
    w.data = torch.linspace(0.5, 1.5, D, device="cuda")
    want = cuqk.qk_norm_rope_(qkv.clone(), pos, w, None, cache, **dims)
    got = op(qkv.clone(), pos)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    # The same geometry (so the cached plan) with qkv laid over the bound weight's memory.
    buf = torch.randn(T * (Hq + 2 * Hk) * D + D, device="cuda")
    w.data = buf[:D]
    op(buf[D:].view(T, -1), pos)  # beside the weight: fine
    before = buf.clone()
    with pytest.raises(ValueError, match="overlaps q_weight"):
        op(buf[:-D].view(T, -1), pos)
    torch.cuda.synchronize()
    assert torch.equal(buf, before)
