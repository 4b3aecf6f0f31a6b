"""Small GPU cases for compute-sanitizer: every kernel variant through every op, then each flag
and the edge shapes.

scripts/sanitize.sh runs this under each tool; on its own it is a quick smoke test. It checks
that the cases reached every variant in ``cuqk._jit.VARIANTS`` (values are the tests' job) and
exits non-zero if a case raised or a variant was missed. Sizes are tiny: a sanitizer slows
kernels down by orders of magnitude.

sanitize.sh turns torch's caching allocator off, so that every array is its own allocation of
exactly its size and memcheck sees a read or write past any of them. Inputs are filled from the
host, so that no kernel but cuqk's runs.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch

import cuqk
from cuqk import _jit
from cuqk.qk_norm_rope import HEAD_DIMS

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_POSITION = 64
_rng = np.random.default_rng(0)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    op: str = "packed"  # qk_norm_rope_ ("packed"), qk_norm_rope ("split"), qk_norm_rope_gate
    dtype: str = "bfloat16"
    lead: tuple = (5,)  # leading dims; their product is the token count
    hq: int = 2
    hk: int = 1
    hv: int = 1  # packed op only
    head_dim: int = 64
    rotary_dim: int | None = None  # default: head_dim
    is_neox: bool = True
    norm: str = "rms"
    weights: str = "same"  # "same" (the activation dtype), "float32" or "none"
    cache_dtype: str = "float32"
    positions: str = "random"  # "random", "out of range" or "none" (a per-token cache)
    pos_dtype: str = "int64"
    mrope: str = ""  # "", "sectioned" or "interleaved"
    rope_first: bool = False
    offset: int = 0  # elements from the allocation's start to the data; 1 misaligns it
    side_offset: int = 0  # the same for the weights (1: the scalar instances)
    row_pad: int = 0  # spare elements after each row (strided rows)
    out: str = ""  # split op: "" (allocated), "strided" (padded views) or "in place"


def device_tensor(shape, dtype, *, offset=0, row_pad=0):
    """Random values in an allocation of their own: a view ``offset`` elements in, each
    last-dim row followed by ``row_pad`` spare elements."""
    *lead, last = shape
    rows = int(np.prod(lead, dtype=np.int64))
    host = torch.randn(rows * (last + row_pad) + offset).to(TORCH_DTYPES[dtype])
    return host.cuda()[offset:].view(*lead, last + row_pad)[..., :last]


def _positions(case, lead):
    if case.positions == "none":
        return None
    values = _rng.integers(0, MAX_POSITION, (3, *lead) if case.mrope else lead)
    if case.positions == "out of range" and values.size:
        info = np.iinfo(case.pos_dtype)
        flat = values.reshape(-1)
        bad = (-1, MAX_POSITION, info.min, info.max)
        for i, value in zip(range(0, flat.size, max(1, flat.size // len(bad))), bad):
            flat[i] = value
    return torch.from_numpy(values.astype(case.pos_dtype)).cuda()


def _side_inputs(case):
    """positions, q_weight, k_weight, cos_sin_cache and the flag keywords of ``case``."""
    rotary = case.rotary_dim or case.head_dim
    tokens = int(np.prod(case.lead, dtype=np.int64))
    rows = max(1, tokens) if case.positions == "none" else MAX_POSITION
    cache = torch.from_numpy(cuqk.rope_cos_sin_cache(rows, rotary))
    cache = cache.to(TORCH_DTYPES[case.cache_dtype]).cuda()
    if case.weights == "none":
        q_weight = k_weight = None
    else:
        w_dtype = case.dtype if case.weights == "same" else case.weights
        q_weight, k_weight = (device_tensor((case.head_dim,), w_dtype, offset=case.side_offset)
                              for _ in range(2))
    section = None
    if case.mrope:
        half = rotary // 2
        section = (half - 2 * (half // 3), half // 3, half // 3)
    flags = {"is_neox": case.is_neox, "rotary_dim": rotary, "norm": case.norm,
             "rope_first": case.rope_first, "mrope_section": section,
             "mrope_interleaved": case.mrope == "interleaved"}
    return _positions(case, case.lead), q_weight, k_weight, cache, flags


def run(case: Case) -> None:
    positions, q_weight, k_weight, cache, flags = _side_inputs(case)
    d, hq, hk = case.head_dim, case.hq, case.hk
    layout = {"offset": case.offset, "row_pad": case.row_pad}
    if case.op == "gate":
        q_gate = device_tensor((*case.lead, hq * 2 * d), case.dtype, **layout)
        k = device_tensor((*case.lead, hk * d), case.dtype, **layout)
        cuqk.qk_norm_rope_gate(q_gate, k, positions, q_weight, k_weight, cache, num_q_heads=hq,
                               num_kv_heads=hk, head_dim=d, **flags)
        return
    hv = case.hv if case.op == "packed" else 0
    qkv = device_tensor((*case.lead, (hq + case.hk + hv) * d), case.dtype, **layout)
    if case.op == "packed":
        cuqk.qk_norm_rope_(qkv, positions, q_weight, k_weight, cache, num_q_heads=hq,
                           num_kv_heads=hk, head_dim=d, num_v_heads=hv, **flags)
        return
    q = qkv[..., : hq * d].unflatten(-1, (hq, d))
    k = qkv[..., hq * d:].unflatten(-1, (hk, d))
    out = None
    if case.out == "strided":
        out = tuple(device_tensor((*case.lead, h, d), case.dtype, row_pad=16) for h in (hq, hk))
    elif case.out == "in place":
        out = (q, k)
    cuqk.qk_norm_rope(q, k, positions, q_weight, k_weight, cache, out=out, **flags)


def _largest_head_dim(variant) -> int:
    """The largest head_dim the dispatcher sends to ``variant``: it then uses every unit, or
    as many as the chunks instances' weight table holds. An instance compiled for one head
    size gets that size; the packed chunks one that reads it at run time gets the largest size
    without an instance of its own."""
    if variant.head_dim:
        return variant.head_dim
    same_kind = dataclasses.replace(variant, max_units=0)
    smaller = max((v.max_units for v in _jit.VARIANTS
                   if dataclasses.replace(v, max_units=0) == same_kind
                   and v.max_units < variant.max_units), default=0)
    return max(d for d in HEAD_DIMS
               if smaller < _jit.lanes_and_units(d, variant.vec)[1] <= variant.max_units
               and _jit.prefetch_next(variant, d) == variant.prefetch_next
               and (not variant.chunks or d <= _jit.CHUNKS_MAX_HEAD_DIM)
               and not (variant.chunks and variant.packed and d in _jit.CHUNKS_PACKED_HEAD_DIMS))


def variant_cases():
    """Each variant through each op: aligned wide variants get aligned data, realigning ones a
    view one element in, scalar ones that and weights one element in. Realigning instances of
    heads that could move in chunks are reached under partial rotary; the split op writes in
    place for the chunked ones (its new outputs would sit at another offset)."""
    for v in _jit.VARIANTS:
        head_dim = _largest_head_dim(v)
        for op in ("packed", "split", "gate"):
            yield Case(f"{v.name} {op}", op=op, dtype=v.dtype, lead=(3,), is_neox=v.is_neox,
                       head_dim=head_dim, rotary_dim=_jit.rotary_dim_reaching(v, head_dim),
                       offset=0 if v.aligned and v.vec > 1 else 1,
                       side_offset=1 if v.vec == 1 else 0,
                       mrope="sectioned" if v.is_mrope else "",
                       out="in place" if v.chunks else "")


def edge_cases():
    return [
        Case("T=1, one q and one k head, no v", lead=(1,), hq=1, hk=1, hv=0, head_dim=128),
        Case("smallest head_dim, rotary_dim 2, GPT-J", dtype="float16", head_dim=32,
             rotary_dim=2, is_neox=False),
        Case("largest head_dim, partial rotary 34", dtype="float32", head_dim=512,
             rotary_dim=34),
        Case("largest head_dim, gemma, float32 weights", head_dim=512, norm="gemma",
             weights="float32"),
        Case("odd partial rotary, split, GPT-J", op="split", dtype="float16", head_dim=80,
             rotary_dim=34, is_neox=False),
        Case("misaligned view with padded rows", lead=(7,), hq=4, hk=2, hv=2, offset=1,
             row_pad=8),
        Case("chunks: rows one element longer (every offset), head_dim 32", lead=(9,),
             head_dim=32, offset=1, row_pad=1),
        Case("chunks: packed qkv without v, its last head ending its allocation mid-chunk",
             lead=(9,), hv=0, head_dim=64, offset=1),
        Case("chunks: every offset, head_dim 256, float32 weights, out-of-range positions",
             dtype="float16", lead=(9,), head_dim=256, offset=3, row_pad=1, weights="float32",
             positions="out of range"),
        Case("aligned padded rows, 2-D leading dims, int32 positions", dtype="float16",
             lead=(2, 3), row_pad=8, pos_dtype="int32"),
        Case("3-D leading dims, split", op="split", lead=(2, 2, 3)),
        Case("many tokens and GQA heads (several blocks)", lead=(40,), hq=16, hk=2, hv=2,
             head_dim=128),
        Case("out-of-range int64 positions", dtype="float32", lead=(9,), hk=2, hv=2,
             positions="out of range"),
        Case("out-of-range int32 positions, split", op="split", lead=(9,),
             positions="out of range", pos_dtype="int32"),
        Case("out-of-range positions, gate", op="gate", lead=(9,), positions="out of range"),
        Case("positions=None, per-token cache", lead=(2, 3), positions="none"),
        Case("positions=None, split, misaligned", op="split", dtype="float16", lead=(4,),
             positions="none", offset=1),
        Case("positions=None, gate", op="gate", lead=(3,), positions="none"),
        Case("rope_first with a weight-free norm (Llama 4)", rope_first=True, weights="none"),
        Case("rope_first, split, GPT-J", op="split", rope_first=True, is_neox=False),
        Case("norm none, no weights", dtype="float16", norm="none", weights="none"),
        Case("bfloat16 cache, float16 data", dtype="float16", cache_dtype="bfloat16"),
        Case("float16 cache, float32 data, scalar", dtype="float32", cache_dtype="float16",
             offset=1, side_offset=1),
        Case("mRoPE sectioned, 2-D leading dims", lead=(2, 3), mrope="sectioned"),
        Case("mRoPE interleaved (Qwen3-VL)", lead=(5,), head_dim=128, mrope="interleaved"),
        Case("mRoPE interleaved, misaligned, partial rotary", dtype="float16", head_dim=128,
             rotary_dim=64, mrope="interleaved", offset=1),
        Case("mRoPE, out-of-range positions", mrope="sectioned", lead=(6,),
             positions="out of range"),
        Case("mRoPE, split, rope_first", op="split", mrope="interleaved", rope_first=True),
        Case("mRoPE, gate", op="gate", head_dim=128, mrope="interleaved"),
        Case("mRoPE, one q and one k head: windows of 33 tokens, 2 per block", lead=(18000,),
             hq=1, hk=1, head_dim=128, mrope="sectioned"),
        Case("split into strided out=", op="split", lead=(5,), hq=3, out="strided"),
        Case("split with out=(q, k): in place", op="split", out="in place"),
        Case("gate, misaligned, gemma, float32 weights", op="gate", dtype="float16", hq=3,
             norm="gemma", weights="float32", offset=1),
        Case("gate, padded rows, GPT-J, partial rotary", op="gate", head_dim=128,
             rotary_dim=64, is_neox=False, row_pad=8),
        Case("gate, float32, largest head_dim", op="gate", dtype="float32", head_dim=512),
        Case("zero tokens, packed", lead=(0,)),
        Case("zero tokens, split", op="split", lead=(0,)),
        Case("zero tokens, gate", op="gate", lead=(2, 0)),
    ]


def main() -> int:
    cases = [*variant_cases(), *edge_cases()]
    failures = 0
    for case in cases:
        try:
            run(case)
            torch.cuda.synchronize()
            status = "ran"
        except Exception as exc:  # noqa: BLE001 - report every case, not only the first
            failures += 1
            status = f"FAILED {type(exc).__name__}: {exc}"
        print(f"{case.name:<60} {status}", flush=True)
    reached = {name for name, _ in _jit.compiled_variants()}
    missed = [v.name for v in _jit.VARIANTS if v.name not in reached]
    if missed:
        failures += 1
        print(f"variants no case reached: {', '.join(missed)}")
    print(f"{len(cases)} cases, {len(_jit.VARIANTS) - len(missed)}/{len(_jit.VARIANTS)} "
          f"variants, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
