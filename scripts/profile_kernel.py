"""A few in-place calls of one bench config, for Nsight Compute to profile one of them. Needs a
GPU and torch.

    ncu --clock-control none -k regex:qk_norm --launch-skip 4 --launch-count 1 \
        --section SpeedOfLight --section InstructionStats --page details \
        python3 scripts/profile_kernel.py qwen3-8b-unaligned bfloat16 8192 [general]

``general`` gives the weights float32, which rules out the packed instances. Each call takes
fresh inputs made as the bench makes them (cuqk/bench.py), so the profiled one does not run
from the L2.
"""

import sys

import torch

import cuqk
from cuqk import bench


def main(config, dtype, tokens, general=""):
    cfg = bench.CONFIGS[config]
    dtype, tokens = getattr(torch, dtype), int(tokens)
    width = (cfg.num_q_heads + cfg.num_kv_heads + cfg.num_v_heads) * cfg.head_dim
    weight_dtype = torch.float32 if general == "general" else dtype
    weights = [(1.0 + 0.1 * torch.randn(cfg.head_dim, device="cuda")).to(weight_dtype)
               for _ in "qk"]
    cache = bench.rope_cache(cfg.rotary_dim)
    kwargs = {**bench.op_kwargs(cfg), "num_v_heads": cfg.num_v_heads}
    for _ in range(6):
        qkv = bench.activation_rows(tokens, width, dtype, cfg.unaligned, "cuda")
        positions = torch.randint(0, bench.MAX_POS, (tokens,), device="cuda")
        cuqk.qk_norm_rope_(qkv, positions, *weights, cache, **kwargs)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(*sys.argv[1:])
