"""cuqk.bench: the unfused PyTorch baselines compute the same thing as cuqk.reference (CPU), so
the speed-ups in BENCHMARKS.md compare like with like."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_matches, requires_gpu

torch = pytest.importorskip("torch")
bench = pytest.importorskip("cuqk.bench")

from cuqk import reference  # noqa: E402


@pytest.mark.parametrize("name", list(bench.CONFIGS))
def test_unfused_baseline_matches_reference(name):
    cfg = bench.CONFIGS[name]
    gen = torch.Generator().manual_seed(0)
    T, D = 5, cfg.head_dim
    kwargs = bench.op_kwargs(cfg)
    cache = torch.from_numpy(bench.cuqk.rope_cos_sin_cache(64, cfg.rotary_dim))
    positions = torch.randint(0, 64, (3, T) if cfg.mrope_section else (T,), generator=gen)
    weights = [1 + 0.1 * torch.randn(D, generator=gen) if cfg.weights else None for _ in "qk"]
    flags = {k: v for k, v in kwargs.items() if k not in ("num_q_heads", "num_kv_heads")}
    if cfg.gate:
        q_gate = torch.randn(T, 2 * cfg.num_q_heads * D, generator=gen)
        k = torch.randn(T, cfg.num_kv_heads * D, generator=gen)
        got = bench.reference_qk_norm_rope_gate(q_gate, k, positions, *weights, cache, **kwargs)
        want = reference.qk_norm_rope_gate(q_gate.numpy(), k.numpy(), positions.numpy(),
                                           *(None if w is None else w.numpy() for w in weights),
                                           cache.numpy(), num_q_heads=cfg.num_q_heads,
                                           num_kv_heads=cfg.num_kv_heads, **flags)
    else:
        width = (cfg.num_q_heads + cfg.num_kv_heads + cfg.num_v_heads) * D
        qkv = bench.activation_rows(T, width, torch.float32, cfg.unaligned, "cpu", gen)
        want = [reference.qkv_norm_rope(qkv.numpy(), positions.numpy(),
                                        *(None if w is None else w.numpy() for w in weights),
                                        cache.numpy(), num_q_heads=cfg.num_q_heads,
                                        num_kv_heads=cfg.num_kv_heads, **flags)]
        got = [bench.reference_qk_norm_rope_(qkv, positions, *weights, cache, **kwargs)]
    for g, w in zip(got, want):
        assert_matches(g.double().numpy(), np.asarray(w), "float32", name)


def test_copy_in_pieces_copies_everything_in_pieces_of_at_most_the_limit(monkeypatch):
    """The copy roofline is timed as copies of at most COPY_PIECE_BYTES (a CUDA graph moved
    larger ones at two thirds of the speed), and still copies every byte."""
    monkeypatch.setattr(bench, "COPY_PIECE_BYTES", 8)
    src = torch.arange(11, dtype=torch.float32)
    dst = torch.zeros_like(src)
    sizes = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_",
                        lambda d, s: sizes.append(s.nbytes) or real_copy(d, s))
    bench.copy_in_pieces(dst, src)
    assert torch.equal(dst, src)
    assert sizes == [8, 8, 8, 8, 8, 4]


def test_cli_parses_shared_positions_and_lists():
    args = bench._parse_args(["bench", "--shared-positions", "--configs", "qwen3-8b,d256",
                              "--sizes", "1,16"])
    assert args.shared_positions and args.configs == ("qwen3-8b", "d256")
    assert args.sizes == (1, 16)
    assert not bench._parse_args([]).shared_positions
    assert bench._parse_args(["--hot"]).hot and not bench._parse_args([]).hot


@requires_gpu
@pytest.mark.parametrize("shared", [False, True])
def test_gpu_bench_times_every_provider_and_shares_positions_on_request(shared):
    cfg = bench.CONFIGS["qwen3-8b"]
    calls = bench.provider_calls("cuqk", cfg, torch.bfloat16, 4, None, True, shared)
    assert len(calls) > 1
    distinct = {id(call.args[1]) for call in calls}
    assert len(distinct) == (1 if shared else len(calls))
    result = bench.bench(configs=("qwen3-8b",), dtypes=("bfloat16",), sizes=(4,),
                         providers=("cuqk", "copy"), warmup_ms=1.0, reps=3,
                         shared_positions=shared)
    assert result["shared_positions"] is shared
    assert [r["provider"] for r in result["rows"]] == ["cuqk", "copy"]
    assert all(r["median_us"] > 0 and "error" not in r for r in result["rows"])


@requires_gpu
def test_gpu_bench_hot_uses_one_set_of_inputs():
    cfg = bench.CONFIGS["qwen3-8b"]
    assert len(bench.provider_calls("cuqk", cfg, torch.bfloat16, 4, None, False)) == 1
    result = bench.bench(configs=("qwen3-8b",), dtypes=("bfloat16",), sizes=(4,),
                         providers=("cuqk", "copy"), rotate=False, warmup_ms=1.0, reps=3)
    assert result["rotate"] is False
    assert all(r["median_us"] > 0 and r["buffers"] == 1 for r in result["rows"])


@requires_gpu
def test_gpu_host_overhead_reports_function_bound_op_and_add():
    report = bench.host_overhead(calls=50, rounds=1)
    for name in ("cuqk_torch", "cuqk_bound_torch", "torch_add", "cuqk_cupy", "cupy_add"):
        assert report[f"{name}_host_us"] > 0, name
    assert report["cuqk_bound_torch_over_torch_add"] > 0
