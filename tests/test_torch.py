"""cuqk.torch: custom ops (opcheck, torch.compile fullgraph, CUDA graphs, devices) and the vLLM
drop-in, on the CPU (reference path) and on the GPU."""

from __future__ import annotations

import pytest
from conftest import HAS_GPU, TOLERANCES, cos_sin_cache64, requires_gpu

torch = pytest.importorskip("torch")
cuqk_torch = pytest.importorskip("cuqk.torch")

import cuqk  # noqa: E402
from cuqk.compat.vllm import fused_qk_norm_rope  # noqa: E402

DIMS = {"num_q_heads": 4, "num_kv_heads": 2, "head_dim": 64}
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def _inputs(device, dtype=torch.float32, tokens=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hq, hk, d = DIMS["num_q_heads"], DIMS["num_kv_heads"], DIMS["head_dim"]
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=gen).to(dtype)
    positions = torch.randint(0, 100, (tokens,), generator=gen)
    weight = (1 + 0.2 * torch.randn(d, generator=gen)).to(dtype)
    cache = torch.from_numpy(cos_sin_cache64(100, d)).float()
    return [t.to(device) for t in (qkv, positions, weight, weight.flip(0), cache)]


def _split(qkv):
    hq, hk, d = DIMS["num_q_heads"], DIMS["num_kv_heads"], DIMS["head_dim"]
    return (qkv[:, : hq * d].view(-1, hq, d), qkv[:, hq * d:(hq + hk) * d].view(-1, hk, d))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    qkv, positions, qw, kw, cache = _inputs(device, dtype)
    packed_args = (qkv, positions, qw, kw, cache, 4, 2, 64, None, 1e-6, True, None, "rms")
    torch.library.opcheck(torch.ops.cuqk.qk_norm_rope_.default, packed_args)
    q, k = _split(qkv)
    split_args = (q, k, positions, qw, kw, cache, 1e-6, False, None, "gemma")
    torch.library.opcheck(torch.ops.cuqk.qk_norm_rope.default, split_args)


def _gate_inputs(device, dtype=torch.float32, tokens=9, seed=3):
    gen = torch.Generator().manual_seed(seed)
    hq, hk, d = DIMS["num_q_heads"], DIMS["num_kv_heads"], DIMS["head_dim"]
    q_gate = torch.randn(tokens, hq * 2 * d, generator=gen).to(dtype)
    k = torch.randn(tokens, hk * d, generator=gen).to(dtype)
    return [t.to(device) for t in (q_gate, k)]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_new_flags_and_the_gate_op(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    qkv, positions, qw, kw, cache = _inputs(device, dtype)
    q, k = _split(qkv)
    per_token = cache[:q.shape[0]].contiguous()  # row t for token t: positions=None
    for args in [(q, k, None, qw, kw, per_token, 1e-6, True, None, "rms", False, None, False),
                 (q, k, positions, None, None, cache, 1e-6, False, None, "rms", True, None, False),
                 (q, k, positions.expand(3, -1).contiguous(), qw, kw, cache, 1e-6, True, None,
                  "gemma", False, [8, 12, 12], True)]:
        torch.library.opcheck(torch.ops.cuqk.qk_norm_rope.default, args)
    packed_args = (qkv, None, qw, kw, per_token, 4, 2, 64, None, 1e-6, True, None, "rms", False,
                   [16, 8, 8], False)
    torch.library.opcheck(torch.ops.cuqk.qk_norm_rope_.default,
                          (packed_args[0], positions.expand(3, -1).contiguous(),
                           *packed_args[2:]))
    q_gate, k_flat = _gate_inputs(device, dtype)
    gate_args = (q_gate, k_flat, positions, qw, kw, cache, 4, 2, 64, 1e-6, True, None, "gemma")
    torch.library.opcheck(torch.ops.cuqk.qk_norm_rope_gate.default, gate_args)


@pytest.mark.parametrize("device", DEVICES)
def test_cos_sin_of_complex(device):
    # The op the fusion pass puts in front of Llama 4's freqs_cis.
    angles = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(7)).to(device)
    freqs = torch.polar(torch.ones_like(angles), angles)
    torch.library.opcheck(torch.ops.cuqk.cos_sin_of_complex.default, (freqs,))
    got = torch.ops.cuqk.cos_sin_of_complex(freqs)
    assert got.dtype == torch.float32 and got.shape == (2, 9, 32)
    torch.testing.assert_close(got, torch.cat([angles.cos(), angles.sin()], -1), rtol=0,
                               atol=1e-6)


def test_wrappers_pass_every_flag_through():
    qkv, positions, qw, kw, cache = _inputs("cpu")
    q, k = _split(qkv)
    sections = {"mrope_section": (8, 12, 12), "mrope_interleaved": True}
    three = positions.expand(3, -1).contiguous()
    flags = {"eps": 1e-5, "is_neox": False, "norm": "gemma", "rope_first": True}
    for got, want in [
        (cuqk_torch.qk_norm_rope(q, k, three, qw, kw, cache, **flags, **sections),
         cuqk.qk_norm_rope(q, k, three, qw, kw, cache, **flags, **sections)),
        (cuqk_torch.qk_norm_rope(q, k, None, qw, kw, cache[:9].contiguous(), **flags),
         cuqk.qk_norm_rope(q, k, None, qw, kw, cache[:9].contiguous(), **flags)),
        (cuqk_torch.qk_norm_rope_gate(*_gate_inputs("cpu"), positions, qw, kw, cache, **DIMS,
                                      **flags),
         cuqk.qk_norm_rope_gate(*_gate_inputs("cpu"), positions, qw, kw, cache, **DIMS, **flags)),
        ((cuqk_torch.qk_norm_rope_(qkv.clone(), three, qw, kw, cache, **DIMS, **flags,
                                   **sections),),
         (cuqk.qk_norm_rope_(qkv.clone(), three, qw, kw, cache, **DIMS, **flags, **sections),)),
    ]:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def _model(qkv, positions, qw, kw, cache):
    # A model's prologue around the op: the op must not break the graph.
    qkv = qkv * 1.5
    cuqk_torch.qk_norm_rope_(qkv, positions, qw, kw, cache, **DIMS)
    q, k = _split(qkv)
    q2, k2 = cuqk_torch.qk_norm_rope(q, k, positions, None, None, cache, is_neox=False,
                                     norm="none")
    # Per-token rows (positions=None) and norm after RoPE, as the fusion pass and Llama 4 use.
    q3, k3 = cuqk_torch.qk_norm_rope(q2, k2, None, qw, kw, cache[:q.shape[0]], rope_first=True)
    q_gate = torch.cat([q2, q3], dim=-1).flatten(-2)
    q4, k4, gate = cuqk_torch.qk_norm_rope_gate(q_gate, k3.flatten(-2), positions, qw, kw, cache,
                                                **DIMS)
    return qkv.sum(dim=-1), q2, k2, q3, k3, q4, k4, gate


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    backend = "inductor" if device == "cuda" else "aot_eager"  # no C++ build on the CPU
    args = _inputs(device, torch.bfloat16 if device == "cuda" else torch.float32)
    compiled = torch.compile(_model, fullgraph=True, backend=backend)
    expected = _model(*[a.clone() for a in args])
    got = compiled(*[a.clone() for a in args])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_vllm_drop_in_matches_core(device):
    qkv, positions, qw, kw, cache = _inputs(device)
    expected = qkv.clone()
    cuqk.qk_norm_rope_(expected, positions, qw, kw, cache, **DIMS, num_v_heads=2, eps=1e-5,
                       is_neox=False)
    result = fused_qk_norm_rope(qkv, 4, 2, 2, 64, 1e-5, qw, kw, cache, False, positions)
    assert result is None
    torch.testing.assert_close(qkv, expected, rtol=0, atol=0)


@requires_gpu
def test_cuda_graph_replays_with_new_values_without_allocating():
    qkv, positions, qw, kw, cache = _inputs("cuda", torch.bfloat16, tokens=64)
    static = qkv.clone()
    cuqk.qk_norm_rope_(static.clone(), positions, qw, kw, cache, **DIMS)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuqk.qk_norm_rope_(static, positions, qw, kw, cache, **DIMS)
    for seed in (1, 2):
        fresh = _inputs("cuda", torch.bfloat16, tokens=64, seed=seed)[0]
        static.copy_(fresh)
        allocated = torch.cuda.memory_allocated()
        graph.replay()
        cuqk.qk_norm_rope_(fresh, positions, qw, kw, cache, **DIMS)  # eager in place, too
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated
        torch.testing.assert_close(static, fresh, rtol=0, atol=0)


@requires_gpu
def test_capture_before_compile_raises_a_clear_error(monkeypatch):
    import importlib

    from cuqk import _jit

    core = importlib.import_module("cuqk.qk_norm_rope")  # the submodule, not the function

    qkv, positions, qw, kw, cache = _inputs("cuda", torch.float16, tokens=5)
    monkeypatch.setattr(_jit, "_functions", {})
    monkeypatch.setattr(core, "_packed_plans", {})
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="precompile"):
        with torch.cuda.graph(graph):
            cuqk.qk_norm_rope_(qkv, positions, qw, kw, cache, **DIMS)


@requires_gpu
def test_inference_mode_and_no_grad_on_gpu():
    qkv, positions, qw, kw, cache = _inputs("cuda", torch.bfloat16)
    qw.requires_grad_(True)
    with pytest.raises(TypeError, match="require grad"):
        cuqk.qk_norm_rope_(qkv, positions, qw, kw, cache, **DIMS)
    with torch.inference_mode():
        cuqk.qk_norm_rope_(qkv, positions, qw, kw, cache, **DIMS)
    with torch.no_grad():
        cuqk.qk_norm_rope_(qkv, positions, qw, kw, cache, **DIMS)


@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_runs_there():
    args = _inputs("cuda:1", torch.bfloat16)
    expected = _inputs("cpu", torch.float32)
    cuqk.qk_norm_rope_(*args, **DIMS)
    cuqk.qk_norm_rope_(*expected, **DIMS)
    torch.cuda.synchronize(1)
    err = (args[0].float().cpu() - expected[0]).norm() / expected[0].norm()
    assert err <= TOLERANCES["bfloat16"]
