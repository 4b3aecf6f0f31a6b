"""Benchmark cuqk.qk_norm_rope_ against unfused and compiled PyTorch and a plain copy.

Providers: cuqk, cuqk_no_pdl (the same op launched without programmatic dependent launch),
torch_eager, torch_compile, copy.

Each case (config, dtype, T, provider) is timed as the device time of one call. N calls are
captured into one CUDA graph (N chosen so a replay lasts ~1 ms, 1 <= N <= 200) and the graph is
replayed ~25 times between CUDA events, so the figures contain no host launch overhead; for
small T they are the latency a model sees when it replays its own CUDA graph. Successive calls
use different input buffers, enough to span 3x the L2 cache, so large cases stream from HBM
instead of L2 (small ones cannot: all N buffers together are smaller than L2). Warm-up,
including torch.compile's and cuqk's compilation, happens before capture.

Bytes are what a fused kernel must move: read and write q and k, read one cache row and one
position per token. The "copy" provider copies that many bytes (read + write) device to device,
the roofline at that size, which "pct_of_copy" refers to; a 2 GiB copy gives the peak (the
header's GB/s and the plot's line). Copies go in pieces of at most COPY_PIECE_BYTES.

Extras: --host-overhead times eager calls on the CPU; --startup times import, first call and
cold compile in fresh subprocesses with their own CuPy disk cache.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch._dynamo

import cuqk


class Config(NamedTuple):
    num_q_heads: int
    num_kv_heads: int
    num_v_heads: int
    head_dim: int
    rotary_dim: int
    is_neox: bool = True
    norm: str = "rms"
    gate: bool = False  # qk_norm_rope_gate on [q | gate] heads instead of a packed qkv
    weights: bool = True
    rope_first: bool = False
    mrope_section: tuple | None = None
    mrope_interleaved: bool = False
    # Rows start one element past a 16-byte boundary (a view of a wider buffer): the kernel's
    # realigning wide instances.
    unaligned: bool = False


CONFIGS = {
    "qwen3-8b": Config(32, 8, 8, 128, 128),
    "qwen3-30b-a3b": Config(32, 4, 4, 128, 128),
    "d256": Config(16, 4, 4, 256, 256),
    "gptj-d64": Config(32, 8, 8, 64, 64, is_neox=False),
    "partial-d128": Config(32, 8, 8, 128, 64),
    "gemma-d256": Config(16, 8, 8, 256, 256, norm="gemma"),
    "qwen3.5-gate": Config(16, 2, 0, 256, 64, norm="gemma", gate=True),
    "qwen2.5-vl-mrope": Config(28, 4, 4, 128, 128, mrope_section=(16, 24, 24)),
    "qwen3-vl-mrope": Config(32, 8, 8, 128, 128, mrope_section=(24, 20, 20),
                             mrope_interleaved=True),
    "llama4-rope-first": Config(40, 8, 8, 128, 128, is_neox=False, weights=False,
                                rope_first=True),
    "qwen3-8b-unaligned": Config(32, 8, 8, 128, 128, unaligned=True),
}
# fp16 and fp32 get a subset by default so that a full run stays within a few minutes.
_SUBSET = ("qwen3-8b", "gptj-d64")
DEFAULT_CONFIGS = {"bfloat16": tuple(CONFIGS), "float16": _SUBSET, "float32": _SUBSET}
DTYPES = tuple(DEFAULT_CONFIGS)
SIZES = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
QUICK_SIZES = (1, 1024, 16384)
# cuqk_no_pdl: cuqk with programmatic dependent launch off (cuqk.set_pdl), as on devices older
# than compute capability 9.0.
PROVIDERS = ("cuqk", "cuqk_no_pdl", "torch_eager", "torch_compile", "copy")
MAX_POS = 65536
EPS = 1e-6
TARGET_REPLAY_US = 1000.0
MAX_CALLS = 200
# In a CUDA graph the driver moved copies of 512 MiB and more at 2.7 TB/s on the device's H200,
# against 4.0-4.2 TB/s for 86-256 MiB and for an eager 2 GiB copy (2026-12-04): so the copy
# roofline is timed as copies of at most this size.
COPY_PIECE_BYTES = 256 << 20


def reference_qk_norm_rope_(qkv, positions, q_weight, k_weight, cos_sin_cache, *, num_q_heads,
                            num_kv_heads, head_dim, **flags):
    """Unfused PyTorch version, written as a model would: the torch_eager/compile baseline."""
    tokens = qkv.shape[0]
    q_end = num_q_heads * head_dim
    k_end = q_end + num_kv_heads * head_dim
    q = qkv[:, :q_end].view(tokens, num_q_heads, head_dim)
    k = qkv[:, q_end:k_end].view(tokens, num_kv_heads, head_dim)
    q_out, k_out = _norm_rope_pair(q, k, positions, q_weight, k_weight, cos_sin_cache, **flags)
    q.copy_(q_out)
    k.copy_(k_out)
    return qkv


def reference_qk_norm_rope_gate(q_gate, k, positions, q_weight, k_weight, cos_sin_cache, *,
                                num_q_heads, num_kv_heads, head_dim, **flags):
    """Unfused PyTorch gated-attention prologue: split q from its gate, norm, RoPE."""
    tokens = q_gate.shape[0]
    heads = q_gate.view(tokens, num_q_heads, 2, head_dim)
    q_out, k_out = _norm_rope_pair(heads[:, :, 0], k.view(tokens, num_kv_heads, head_dim),
                                   positions, q_weight, k_weight, cos_sin_cache, **flags)
    return (q_out.to(q_gate.dtype).reshape(tokens, -1), k_out.to(k.dtype).reshape(tokens, -1),
            heads[:, :, 1].reshape(tokens, -1))


def _norm_rope_pair(q, k, positions, q_weight, k_weight, cos_sin_cache, *, is_neox, rotary_dim,
                    norm, eps, rope_first=False, mrope_section=None, mrope_interleaved=False):
    cos, sin = _cos_sin(cos_sin_cache, positions, mrope_section, mrope_interleaved)
    outs = []
    for x, weight in ((q, q_weight), (k, k_weight)):
        y = x.float()
        if rope_first:
            y = _rms_norm(_rotate(y, cos, sin, is_neox, rotary_dim), weight, norm, eps)
        else:
            y = _rotate(_rms_norm(y, weight, norm, eps), cos, sin, is_neox, rotary_dim)
        outs.append(y)
    return outs


def _cos_sin(cos_sin_cache, positions, mrope_section, mrope_interleaved):
    """Per-token ``[T, 1, rotary_dim / 2]`` cos and sin, gathered per section for mRoPE."""
    rows = cos_sin_cache[positions]
    if mrope_section is not None:
        sec, freq = _mrope_index(rows.shape[-1] // 2, tuple(mrope_section), mrope_interleaved,
                                 rows.device)
        rows = rows[sec, :, freq].T
    return rows.unsqueeze(1).chunk(2, dim=-1)


@functools.lru_cache(maxsize=None)
def _mrope_index(half, mrope_section, mrope_interleaved, device):
    """Index tensors picking, for each cos and sin column, its section's row; built once per
    layout so that nothing is copied to the device during CUDA-graph capture."""
    sec = cuqk.reference.mrope_frequency_sections(half, mrope_section, mrope_interleaved)
    freq = torch.arange(2 * half)
    return torch.from_numpy(np.concatenate([sec, sec])).to(device), freq.to(device)


def _rms_norm(x, weight, norm, eps):
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is None:
        return y
    # Gemma stores the scale as an offset from one.
    return y * (weight.float() + 1.0 if norm == "gemma" else weight.float())


def _rotate(x, cos, sin, is_neox, rotary_dim):
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        a, b = rot.chunk(2, dim=-1)
        rot = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    return torch.cat((rot, rest), dim=-1)


def op_kwargs(cfg: Config) -> dict:
    return {"num_q_heads": cfg.num_q_heads, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "is_neox": cfg.is_neox, "rotary_dim": cfg.rotary_dim,
            "norm": cfg.norm, "eps": EPS, "rope_first": cfg.rope_first,
            "mrope_section": cfg.mrope_section, "mrope_interleaved": cfg.mrope_interleaved}


def kernel_bytes(cfg: Config, dtype: torch.dtype, tokens: int) -> int:
    # Read and write every q and k element (and copy every gate); read one float32 cache row
    # (rotary_dim wide) and one int64 position per token (mRoPE: three). V is not touched.
    heads = cfg.num_q_heads * (2 if cfg.gate else 1) + cfg.num_kv_heads
    qk = 2 * tokens * heads * cfg.head_dim * dtype.itemsize
    positions = 3 if cfg.mrope_section else 1
    return qk + tokens * cfg.rotary_dim * 4 + tokens * 8 * positions


def rope_cache(rotary_dim: int) -> torch.Tensor:
    return torch.from_numpy(cuqk.rope_cos_sin_cache(MAX_POS, rotary_dim)).cuda()


def rotation_count(buffer_bytes: int, rotate: bool) -> int:
    """How many input copies to cycle through so that they do not all fit in L2."""
    if not rotate:
        return 1
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(properties, "L2_cache_size", 50 << 20)
    affordable = int(0.25 * torch.cuda.mem_get_info()[0]) // buffer_bytes
    return max(1, min(math.ceil(3 * l2 / buffer_bytes), MAX_CALLS, affordable))


def provider_calls(provider, cfg, dtype, tokens, compiled, rotate,
                   shared_positions=False) -> list[Callable]:
    """One zero-argument callable per rotating input buffer. With ``shared_positions`` every
    buffer gets the same positions, as the layers of one decoding step do: the cos/sin rows
    are then read from L2 after the first call instead of from DRAM."""
    if provider == "copy":
        half = kernel_bytes(cfg, dtype, tokens) // 2
        pairs = [(torch.empty(half, dtype=torch.uint8, device="cuda"),
                  torch.empty(half, dtype=torch.uint8, device="cuda"))
                 for _ in range(rotation_count(2 * half, rotate))]
        return [functools.partial(copy_in_pieces, dst, src) for src, dst in pairs]
    fused = cuqk.qk_norm_rope_gate if cfg.gate else cuqk.qk_norm_rope_
    op = {"cuqk": fused, "cuqk_no_pdl": functools.partial(_without_pdl, fused),
          "torch_eager": unfused_op(cfg), "torch_compile": compiled}[provider]
    kwargs = op_kwargs(cfg)
    if provider.startswith("cuqk") and not cfg.gate:
        kwargs["num_v_heads"] = cfg.num_v_heads
    D = cfg.head_dim
    widths = ((2 * cfg.num_q_heads * D, cfg.num_kv_heads * D) if cfg.gate else
              ((cfg.num_q_heads + cfg.num_kv_heads + cfg.num_v_heads) * D,))
    weights = [(1.0 + 0.1 * torch.randn(D, device="cuda")).to(dtype) if cfg.weights else None
               for _ in "qk"]
    cache = rope_cache(cfg.rotary_dim)
    position_shape = (3, tokens) if cfg.mrope_section else (tokens,)
    calls = []
    shared = torch.randint(0, MAX_POS, position_shape, device="cuda") if shared_positions else None
    for _ in range(rotation_count(tokens * (sum(widths) * dtype.itemsize + 8), rotate)):
        activations = [activation_rows(tokens, w, dtype, cfg.unaligned, "cuda") for w in widths]
        positions = shared if shared is not None else torch.randint(
            0, MAX_POS, position_shape, device="cuda")
        calls.append(functools.partial(op, *activations, positions, *weights, cache, **kwargs))
    return calls


def _without_pdl(op, *args, **kwargs):
    previous = cuqk.set_pdl(False)
    try:
        return op(*args, **kwargs)
    finally:
        cuqk.set_pdl(previous)


def activation_rows(tokens, width, dtype, unaligned, device, generator=None) -> torch.Tensor:
    """Random ``[tokens, width]`` activations; with ``unaligned``, a view that starts one element
    into a ``[tokens, width + 1]`` buffer, so neither the data nor the rows are 16-byte aligned."""
    rows = torch.randn(tokens, width + unaligned, generator=generator, device=device,
                       dtype=dtype)
    return rows[:, 1:] if unaligned else rows


def unfused_op(cfg: Config) -> Callable:
    return reference_qk_norm_rope_gate if cfg.gate else reference_qk_norm_rope_


def _warm_up(calls: list[Callable], warmup_ms: float) -> None:
    # On a side stream, as torch.cuda.graph asks, so that lazy initialisation (compilation,
    # autotuning, handles) happens before capture and is not captured.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
        torch.cuda.synchronize()
        deadline = time.perf_counter() + warmup_ms / 1e3
        for call in itertools.cycle(calls):
            if time.perf_counter() >= deadline:
                break
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def _replay_us(calls: list[Callable], n: int, reps: int) -> list[float]:
    """Per-call time of each replay of a graph holding n calls that cycle through the buffers."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for i in range(n):
            calls[i % len(calls)]()
    graph.replay()  # the first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    return times


def time_calls(calls: list[Callable], warmup_ms: float, reps: int) -> dict:
    _warm_up(calls, warmup_ms)
    probe = 10
    estimate = max(statistics.median(_replay_us(calls, probe, 3)), 1e-3)
    n = max(1, min(MAX_CALLS, math.ceil(TARGET_REPLAY_US / estimate)))
    per_call = _replay_us(calls, n, max(reps, 2))
    p20, _, _, p80 = statistics.quantiles(per_call, n=5)
    return {"median_us": statistics.median(per_call), "p20_us": p20, "p80_us": p80,
            "calls_per_replay": n, "buffers": len(calls)}


def copy_in_pieces(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for flat tensors, as copies of at most COPY_PIECE_BYTES."""
    piece = max(1, COPY_PIECE_BYTES // src.element_size())
    for d, s in zip(dst.split(piece), src.split(piece), strict=True):
        d.copy_(s)


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    median_us = time_calls([functools.partial(copy_in_pieces, dst, src)], 10.0, 10)["median_us"]
    return 2 * nbytes / median_us / 1e3


def empty_kernel_us() -> float:
    # torch.cuda._sleep(0) launches a kernel that spins for zero cycles: an empty kernel.
    return time_calls([functools.partial(torch.cuda._sleep, 0)], 5.0, 10)["median_us"]


def bench_case(name, cfg, dtype, tokens, provider, compiled, copy_gbps, rotate, warmup_ms,
               reps, shared_positions=False) -> dict:
    row = {"config": name, "dtype": str(dtype).removeprefix("torch."), "T": tokens,
           "provider": provider, "bytes": kernel_bytes(cfg, dtype, tokens)}
    try:
        calls = provider_calls(provider, cfg, dtype, tokens, compiled, rotate, shared_positions)
        row |= time_calls(calls, warmup_ms, reps)
    except Exception as exc:  # noqa: BLE001 - one failing case must not stop the run
        row["error"] = _error_text(exc)
        # A failed capture can leave its side stream current.
        torch.cuda.set_stream(torch.cuda.default_stream())
        print(f"  ! {name} {row['dtype']} T={tokens} {provider}: {row['error']}")
        return row
    row["GBps"] = row["bytes"] / row["median_us"] / 1e3
    row["pct_of_copy"] = 100.0 * row["GBps"] / copy_gbps
    return row


def bench(configs=None, dtypes=DTYPES, sizes=SIZES, providers=PROVIDERS, rotate=True,
          warmup_ms=25.0, reps=25, shared_positions=False) -> dict:
    """Time every (config, dtype, T, provider); configs=None takes DEFAULT_CONFIGS per dtype.
    ``shared_positions``: see ``provider_calls``."""
    # Every T is a new static shape, so a recompile; the default limit (8) is too low.
    limit_name = next(n for n in ("recompile_limit", "cache_size_limit")
                      if hasattr(torch._dynamo.config, n))
    setattr(torch._dynamo.config, limit_name, max(64, len(sizes)))
    copy_gbps = copy_bandwidth_gbps()
    result = {"device": torch.cuda.get_device_name(), "versions": versions(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "configs": {name: cfg._asdict() for name, cfg in CONFIGS.items()},
              "shared_positions": shared_positions, "rotate": rotate,
              "copy_bandwidth_GBps": copy_gbps, "empty_kernel_us": _guarded(empty_kernel_us),
              "rows": []}
    print(f"{result['device']}: copy {copy_gbps:.0f} GB/s, "
          f"empty kernel in a graph {_fmt(result['empty_kernel_us'])} us")
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for name in configs or DEFAULT_CONFIGS[dtype_name]:
            torch._dynamo.reset()  # keeps each config's recompiles under the limit
            compiled = torch.compile(unfused_op(CONFIGS[name]), dynamic=False)
            print(f"\n{name} {dtype_name} {CONFIGS[name]}, median us per call\n"
                  f"{_table_header(providers)}")
            for tokens in sizes:
                rows = [bench_case(name, CONFIGS[name], dtype, tokens, provider, compiled,
                                   copy_gbps, rotate, warmup_ms, reps, shared_positions)
                        for provider in providers]
                _relate_to_same_size_copy(rows)
                result["rows"] += rows
                print(_table_line(rows, providers), flush=True)
                torch.cuda.empty_cache()
    return result


def _relate_to_same_size_copy(rows) -> None:
    """pct_of_copy against the copy of the same bytes in the same run, when it was timed: at
    small T the copy's own launch and latency are part of the roofline."""
    copy = next((r for r in rows if r["provider"] == "copy" and "median_us" in r), None)
    if copy is None:
        return
    for row in rows:
        if "median_us" in row:
            row["pct_of_copy"] = 100.0 * copy["median_us"] / row["median_us"]


def _table_header(providers) -> str:
    columns = [*providers, "cuqk GB/s", "cuqk %copy", "vs compile"]
    return f"{'T':>7}" + "".join(f"{c:>14}" for c in columns)


def _table_line(rows, providers) -> str:
    by_provider = {row["provider"]: row for row in rows}
    cells = [_cell(by_provider[p], "median_us", "{:.2f}") for p in providers]
    cuqk_row = by_provider.get("cuqk", {})
    cells += [_cell(cuqk_row, "GBps", "{:.0f}"), _cell(cuqk_row, "pct_of_copy", "{:.0f}%")]
    compile_row = by_provider.get("torch_compile", {})
    if "median_us" in cuqk_row and "median_us" in compile_row:
        cells.append(f"{compile_row['median_us'] / cuqk_row['median_us']:.2f}x")
    else:
        cells.append("-")
    return f"{rows[0]['T']:>7}" + "".join(f"{c:>14}" for c in cells)


def _cell(row: dict, key: str, spec: str) -> str:
    if "error" in row:
        return "ERR"
    return spec.format(row[key]) if key in row else "-"


def host_overhead(calls: int = 5000, rounds: int = 7) -> dict:
    """CPU time per eager call, T=1 qwen3-8b bf16, next to one small in-place add: the
    function (``qk_norm_rope_``) and the bound op (``QkNormRope``) on torch tensors, the
    function on CuPy arrays.

    The cases take turns for ``rounds`` rounds of ``calls`` calls each and each reports its
    fastest round: the device's shared CPU drifts by tens of percent between seconds, and the
    minimum is the least disturbed estimate of what a call costs."""
    cfg = CONFIGS["qwen3-8b"]
    call = provider_calls("cuqk", cfg, torch.bfloat16, 1, None, rotate=False)[0]
    small = torch.zeros(16, device="cuda")
    qkv, positions, *bound = call.args
    bound_op = cuqk.QkNormRope(*bound, **call.keywords)
    cases = {"cuqk_torch": call, "cuqk_bound_torch": functools.partial(bound_op, qkv, positions),
             "torch_add": functools.partial(small.add_, 1.0)}
    report = {}
    cupy_cases = _guarded(_cupy_cases, call, small)
    if "error" in cupy_cases:
        report["cupy_error"] = cupy_cases.pop("error")
    timings = {name: [] for name in cases | cupy_cases}
    for _ in range(rounds):
        for name, fn in (cases | cupy_cases).items():
            timings[name].append(_guarded(_host_us, fn, calls))
    for name, values in timings.items():
        numbers = [v for v in values if isinstance(v, float)]
        report[f"{name}_host_us"] = min(numbers) if numbers else values[0]
    # If the device time exceeded the host time the launch queue would fill and throttle the
    # loop, so the host figure would be a GPU figure.
    report["cuqk_device_us"] = _guarded(lambda: time_calls([call], 5.0, 10)["median_us"])
    for num, den in (("cuqk_torch", "torch_add"), ("cuqk_bound_torch", "torch_add"),
                     ("cuqk_cupy", "cupy_add")):
        a, b = report.get(f"{num}_host_us"), report.get(f"{den}_host_us")
        if isinstance(a, float) and isinstance(b, float):
            report[f"{num}_over_{den}"] = a / b
    return report


def _cupy_cases(call: functools.partial, small: torch.Tensor) -> dict:
    """The same two calls on CuPy views of the same memory (views made once, outside the loop)."""
    cupy = importlib.import_module("cupy")
    arrays = [cupy.from_dlpack(t) for t in call.args]
    small_cp = cupy.from_dlpack(small)
    return {"cuqk_cupy": functools.partial(cuqk.qk_norm_rope_, *arrays, **call.keywords),
            "cupy_add": functools.partial(cupy.add, small_cp, 1.0, out=small_cp)}


def _host_us(fn: Callable, calls: int) -> float:
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


# Run in fresh interpreters by startup(); argv[1] is "call" or "precompile".
_CHILD = r"""
import json, os, sys, time
def cached_files():
    return sum(len(files) for _, _, files in os.walk(os.environ["CUPY_CACHE_DIR"]))
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import cuqk
t2 = time.perf_counter()
out = {"import_torch_ms": (t1 - t0) * 1e3, "import_cuqk_ms": (t2 - t1) * 1e3,
       "cache_files_after_import": cached_files()}
if sys.argv[1] == "call":
    hq, hk, d = 32, 8, 128
    qkv = torch.randn(1, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16)
    positions = torch.zeros(1, device="cuda", dtype=torch.int64)
    weight = torch.ones(d, device="cuda", dtype=torch.bfloat16)
    cache = torch.zeros(16, d, device="cuda")
    for key in ("first_call_ms", "second_call_ms"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        cuqk.qk_norm_rope_(qkv, positions, weight, weight, cache, num_q_heads=hq,
                           num_kv_heads=hk, head_dim=d)
        torch.cuda.synchronize()
        out[key] = (time.perf_counter() - t) * 1e3
else:
    t = time.perf_counter()
    out["precompile_variants"] = len(cuqk.precompile(dtypes=["bfloat16"]))
    out["precompile_ms"] = (time.perf_counter() - t) * 1e3
out["cache_files_at_exit"] = cached_files()
print(json.dumps(out))
"""


def _run_child(mode: str, cache_dir: str) -> dict:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cuqk.__file__)))
    path = os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))
    env = dict(os.environ, CUPY_CACHE_DIR=cache_dir, PYTHONPATH=path)
    env.pop("CUPY_CACHE_IN_MEMORY", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"child '{mode}' exited {proc.returncode}: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def startup() -> dict:
    """Import time, warm-cache first call and one variant's cold compile, in fresh processes."""
    with tempfile.TemporaryDirectory(prefix="cuqk-bench-") as tmp:
        cache_dir = os.path.join(tmp, "call")
        cold = _run_child("call", cache_dir)  # empty cache: compiles one variant
        warm = _run_child("call", cache_dir)  # same cache, now warm
        report = {
            "import_torch_ms": warm["import_torch_ms"],
            "import_cuqk_ms": warm["import_cuqk_ms"],
            "import_compiles_nothing": cold["cache_files_after_import"] == 0,
            "first_call_warm_cache_ms": warm["first_call_ms"],
            "first_call_cold_cache_ms": cold["first_call_ms"],
            "cold_compile_one_variant_ms": cold["first_call_ms"] - warm["first_call_ms"],
            "second_call_ms": warm["second_call_ms"],
            "cache_files_after_first_call": cold["cache_files_at_exit"],
        }
        # All bf16 variants from an empty cache: the cost `python -m cuqk precompile` moves
        # out of a first call.
        pre = _guarded(_run_child, "precompile", os.path.join(tmp, "precompile"))
        report["precompile_bf16_ms"] = pre.get("precompile_ms", pre.get("error"))
        report["precompile_bf16_variants"] = pre.get("precompile_variants")
    return report


def plot(result: dict, path: str) -> None:
    """One panel per config (bf16): GB/s against T for each provider, copy peak as a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    rows = [r for r in result["rows"] if r["dtype"] == "bfloat16" and "GBps" in r]
    names = list(dict.fromkeys(r["config"] for r in rows))
    if not names:
        print(f"no bfloat16 results: no plot written to {path}")
        return
    ncols = min(3, len(names))
    fig, axes = plt.subplots(math.ceil(len(names) / ncols), ncols, squeeze=False,
                             figsize=(5 * ncols, 4 * math.ceil(len(names) / ncols)))
    for ax, name in zip(axes.flat, names, strict=False):
        for provider in dict.fromkeys(r["provider"] for r in rows):
            points = sorted((r["T"], r["GBps"]) for r in rows
                            if r["config"] == name and r["provider"] == provider)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=provider)
        ax.axhline(result["copy_bandwidth_GBps"], color="grey", linestyle="--",
                   label="2 GiB copy")
        ax.set(xscale="log", yscale="log", title=name, xlabel="T (tokens)", ylabel="GB/s")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"cuqk.qk_norm_rope_, bfloat16, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def versions() -> dict:
    cupy, triton = _try_import("cupy"), _try_import("triton")
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cupy": getattr(cupy, "__version__", None),
            "triton": getattr(triton, "__version__", None),
            "cuqk": getattr(cuqk, "__version__", "unknown")}


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _guarded(fn: Callable, *args):
    """fn(*args), or the error text: an extra must not stop the run."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        return {"error": _error_text(exc)}


def _error_text(exc: Exception) -> str:
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0]}"[:300]


def _csv(kind: Callable, valid: Callable) -> Callable:
    """argparse type for a comma list whose items must all be valid."""
    def parse(text: str) -> tuple:
        items = tuple(kind(item) for item in text.split(","))
        if not all(map(valid, items)):
            raise argparse.ArgumentTypeError(f"invalid item in {text!r}")
        return items
    return parse


def _parse_args(argv) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="python -m cuqk bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=_csv(str, CONFIGS.__contains__),
                        help=f"of {','.join(CONFIGS)} (default: all for bf16, "
                        f"{','.join(_SUBSET)} for the others)")
    parser.add_argument("--dtypes", type=_csv(str, DTYPES.__contains__),
                        help=f"of {','.join(DTYPES)} (default: all)")
    parser.add_argument("--sizes", type=_csv(int, lambda t: t > 0),
                        help=f"token counts T (default: {','.join(map(str, SIZES))})")
    parser.add_argument("--providers", type=_csv(str, PROVIDERS.__contains__),
                        default=PROVIDERS, help=f"of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--shared-positions", action="store_true",
                        help="one positions array for all rotating buffers (the layers of one "
                        "decoding step): cos/sin rows come from L2, not DRAM")
    parser.add_argument("--hot", action="store_true",
                        help="one set of inputs for every call, so small cases run from L2 (as "
                        "a decode step finds the q/k its projection just wrote); default: "
                        "rotate over 3x the L2")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against T (bf16)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: bf16, T in {QUICK_SIZES}, no extras")
    parser.add_argument("--host-overhead", action="store_true", help="CPU time per eager call")
    parser.add_argument("--startup", action="store_true",
                        help="import, first-call and cold-compile times in fresh processes")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip --host-overhead and --startup unless asked for")
    return parser.parse_args(argv)


def _print_section(title: str, report: dict) -> None:
    print(f"\n{title}")
    for key, value in report.items():
        print(f"  {key:<32} {_fmt(value)}")


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        print("cuqk bench: no CUDA device", file=sys.stderr)
        return 1
    started = time.perf_counter()
    result = bench(configs=args.configs,
                   dtypes=args.dtypes or (("bfloat16",) if args.quick else DTYPES),
                   sizes=args.sizes or (QUICK_SIZES if args.quick else SIZES),
                   providers=args.providers, rotate=not args.hot,
                   shared_positions=args.shared_positions)
    extras = not (args.quick or args.no_extras)
    if args.host_overhead or extras:
        result["host_overhead"] = _guarded(host_overhead)
        _print_section("host overhead, us per eager call (T=1, qwen3-8b, bf16)",
                       result["host_overhead"])
    if args.startup or extras:
        result["startup"] = _guarded(startup)
        _print_section("startup (fresh processes, CUPY_CACHE_DIR in a temporary dir)",
                       result["startup"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    failed = [row for row in result["rows"] if "error" in row]
    print(f"\n{len(result['rows'])} cases, {len(failed)} failed, "
          f"{time.perf_counter() - started:.0f} s")
    return 1 if any(row["provider"].startswith("cuqk") for row in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
