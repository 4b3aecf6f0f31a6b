"""End-to-end: one Qwen3-8B-shaped decoder layer forward, four ways, under CUDA graphs.

The layer is transformers' ``Qwen3DecoderLayer`` (hidden 4096, MLP 12288, 32 q / 8 kv heads of
128, random bf16 weights, SDPA attention), with cos/sin computed outside it as the model does.
Shapes: ``prefill`` is one sequence of 4096 tokens (causal, no cache); ``decode`` is 64 sequences
of one new token each (T = 64), each attending to 63 cached keys and values plus its own (a
small context, so that attention depends on q and k without dominating the step).

Variants:

- ``eager``: the module as transformers wrote it;
- ``cuqk_patched``: after ``cuqk.integrations.transformers.apply`` (the QK norm + RoPE in one
  cuqk call, the rest eager);
- ``compile``: ``torch.compile(fullgraph=True)`` (Inductor, default mode);
- ``compile_fused``: the same with ``cuqk.torch.enable_fusion()``.

Timing as ``python -m cuqk bench`` (``cuqk.bench.time_calls``), after one checked call (which
compiles): warm-up on a side stream; N forwards captured in one CUDA graph; replays timed with
CUDA events; median and 20/80 quantiles per forward.

Checks, each a non-zero exit status when it fails: every variant's update of the residual stream
(output minus input) matches eager's within 4e-2 relative L2 (bf16), and
``torch.ops.cuqk.qk_norm_rope`` runs once per forward in the cuqk variants and never in
``compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from . import torch as cuqk_torch
from .bench import time_calls, versions

SHAPES = {"prefill": (1, 4096), "decode": (64, 1)}  # (sequences, tokens per sequence)
VARIANTS = ("eager", "cuqk_patched", "compile", "compile_fused")
CUQK_CALLS = {"eager": 0, "cuqk_patched": 1, "compile": 0, "compile_fused": 1}
# torch.compile alone (no cuqk) moved this bf16 layer's update 2.6e-2 from eager on the H100
# (2026-11-23); a wrong q-norm weight moves it by more than 0.2.
TOLERANCE = 4e-2
QWEN3_8B = {"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 40960,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}


def qwen3_8b_layer():
    """``(layer, rotary)``: a bf16 Qwen3-8B-shaped decoder layer with random weights (norm
    weights too, so a q/k mix-up shows) and its rotary embedding, on the GPU."""
    import transformers
    from transformers.models.qwen3 import modeling_qwen3

    config = transformers.Qwen3Config(**QWEN3_8B, num_hidden_layers=1, vocab_size=1024,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = modeling_qwen3.Qwen3DecoderLayer(config, layer_idx=0)
        rotary = modeling_qwen3.Qwen3RotaryEmbedding(config)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return layer.to(torch.bfloat16).eval(), rotary


class DecodeContext:
    """``past_key_values`` for one decode step: ``context`` cached keys and values per sequence
    (random, as if from earlier steps). ``update`` returns them with the new token's appended,
    out of place, so that every CUDA-graph replay is the same step."""

    def __init__(self, sequences, context, gen):
        shape = (sequences, QWEN3_8B["num_key_value_heads"], context, QWEN3_8B["head_dim"])
        self.keys, self.values = (torch.randn(shape, device="cuda", generator=gen).to(
            torch.bfloat16) for _ in range(2))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return torch.cat((self.keys, key_states), 2), torch.cat((self.values, value_states), 2)


def layer_inputs(rotary, sequences, tokens):
    """``(hidden, cos, sin, cache)``: hidden states ``[sequences, tokens, 4096]``,
    transformers' cos/sin for them (positions 0.. for one sequence; for decode, a position per
    sequence after its 63 cached tokens) and a DecodeContext for decode, else None."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(sequences, tokens, QWEN3_8B["hidden_size"], device="cuda",
                         generator=gen).to(torch.bfloat16)
    if sequences == 1:
        positions, cache = torch.arange(tokens, device="cuda")[None], None
    else:
        positions = torch.randint(63, 4096, (sequences, tokens), device="cuda", generator=gen)
        cache = DecodeContext(sequences, 63, gen)
    return (hidden, *rotary(hidden, positions), cache)


def forward(layer, hidden, cos, sin, cache):
    return layer(hidden, attention_mask=None, position_embeddings=(cos, sin),
                 past_key_values=cache)


@contextlib.contextmanager
def variant_forward(variant, layer, args):
    """A no-argument forward for ``variant``, undone (patch, fusion, compiled code) on exit."""
    from .integrations import transformers as hf

    if variant == "eager":
        yield lambda: forward(layer, *args)
        return
    if variant == "cuqk_patched":
        hf.apply(layer)
        try:
            yield lambda: forward(layer, *args)
        finally:
            hf.restore(layer)
        return
    torch._dynamo.reset()
    if variant == "compile_fused":
        cuqk_torch.enable_fusion()
    try:
        compiled = torch.compile(forward, fullgraph=True)
        yield lambda: compiled(layer, *args)
    finally:
        cuqk_torch.disable_fusion()
        torch._dynamo.reset()


@contextlib.contextmanager
def counting_cuqk_calls():
    """Counts the calls that reach ``torch.ops.cuqk.qk_norm_rope``'s implementation."""
    calls = []
    core = cuqk_torch._core_split

    def counted(*args, **kwargs):
        calls.append(1)
        return core(*args, **kwargs)

    cuqk_torch._core_split = counted
    try:
        yield calls
    finally:
        cuqk_torch._core_split = core


def residual_update_error(out, hidden, reference):
    """Relative L2 distance of ``out - hidden`` from ``reference - hidden``, in float32."""
    got, want = (out.float() - hidden.float()), (reference.float() - hidden.float())
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm())


def bench_shape(shape, layer, rotary, variants, warmup_ms, reps):
    sequences, tokens = SHAPES[shape]
    args = layer_inputs(rotary, sequences, tokens)
    hidden = args[0]
    with torch.no_grad():
        reference = forward(layer, *args)
    rows = []
    for variant in variants:
        row = {"shape": shape, "sequences": sequences, "tokens": tokens, "variant": variant}
        problems = []
        try:
            with torch.no_grad(), variant_forward(variant, layer, args) as run:
                started = time.perf_counter()
                with counting_cuqk_calls() as calls:
                    out = run()
                    torch.cuda.synchronize()
                row["first_call_s"] = time.perf_counter() - started
                row["cuqk_calls"] = len(calls)
                if variant == "compile_fused":
                    row["fusion_report"] = str(cuqk_torch.fusion_report())
                row["rel_err_vs_eager"] = residual_update_error(out, hidden, reference)
                row |= time_calls([run], warmup_ms, reps)
        except Exception as exc:  # noqa: BLE001 - report every variant, then fail
            problems.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
            torch.cuda.set_stream(torch.cuda.default_stream())  # a failed capture may leave one
        if row.get("cuqk_calls", CUQK_CALLS[variant]) != CUQK_CALLS[variant]:
            problems.append(f"torch.ops.cuqk.qk_norm_rope ran {row['cuqk_calls']} times per "
                            f"forward, expected {CUQK_CALLS[variant]}")
        if row.get("rel_err_vs_eager", 0.0) > TOLERANCE:
            problems.append(f"output differs from eager: relative L2 "
                            f"{row['rel_err_vs_eager']:.3g} > {TOLERANCE:g}")
        if problems:
            row["problems"] = problems
        rows.append(row)
        print(_line(row, rows), flush=True)
    return rows


def _line(row, rows):
    eager = next((r for r in rows if r["shape"] == row["shape"] and r["variant"] == "eager"
                  and "median_us" in r), None)
    if "median_us" not in row:
        timing = f"{'-':>10} {'':>21} {'':>8}"
    else:
        speedup = f"{eager['median_us'] / row['median_us']:7.2f}x" if eager else f"{'':>8}"
        timing = (f"{row['median_us']:10.1f} [{row['p20_us']:8.1f}, {row['p80_us']:8.1f}] "
                  f"{speedup}")
    err = row.get("rel_err_vs_eager")
    text = (f"{row['shape']:<8} {row['sequences']:>3}x{row['tokens']:<5} {row['variant']:<14} "
            f"{timing} {'' if err is None else f'{err:9.2e}':>9}")
    return text + "".join(f"\n  ! {p}" for p in row.get("problems", []))


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m cuqk bench --e2e",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma list of {','.join(SHAPES)} (default: both)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list of {','.join(VARIANTS)} (default: all)")
    parser.add_argument("--json", metavar="PATH", default="cuqk_bench_e2e.json",
                        help="where to write the results (default: %(default)s)")
    parser.add_argument("--warmup-ms", type=float, default=50.0)
    parser.add_argument("--reps", type=int, default=20, help="timed replays per variant")
    args = parser.parse_args(argv)
    args.shapes, args.variants = args.shapes.split(","), args.variants.split(",")
    for name, given, known in (("--shapes", args.shapes, SHAPES),
                               ("--variants", args.variants, VARIANTS)):
        if not set(given) <= set(known):
            parser.error(f"{name}: unknown {sorted(set(given) - set(known))}")
    return args


def main(argv=None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("cuqk bench --e2e: no CUDA device", file=sys.stderr)
        return 1
    try:
        layer, rotary = qwen3_8b_layer()
    except ImportError as exc:
        print(f"cuqk bench --e2e: needs transformers ({exc})", file=sys.stderr)
        return 1
    started = time.perf_counter()
    print(f"Qwen3-8B-shaped decoder layer, bf16, {torch.cuda.get_device_name()}; per forward, "
          "CUDA-graph replay, median [p20, p80] us; speed-up over eager; relative L2 of the "
          "residual update against eager")
    print(f"{'shape':<8} {'B x S':<9} {'variant':<14} {'median':>10} {'[p20, p80]':>21} "
          f"{'vs eager':>8} {'rel err':>9}")
    rows = []
    for shape in args.shapes:
        rows += bench_shape(shape, layer, rotary, args.variants, args.warmup_ms, args.reps)
    elapsed = time.perf_counter() - started
    failed = [row for row in rows if "problems" in row]
    result = {"versions": versions(), "gpu": torch.cuda.get_device_name(),
              "layer": {**QWEN3_8B, "dtype": "bfloat16", "attention": "sdpa"},
              "shapes": {s: SHAPES[s] for s in args.shapes}, "tolerance": TOLERANCE,
              "rows": rows, "seconds": elapsed}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{len(rows)} cases, {len(failed)} failed, {elapsed:.0f} s; wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
