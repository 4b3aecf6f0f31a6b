"""Where the CPU time of one eager cuqk call goes: cProfile over many T=1 calls (needs a GPU).

    PYTHONPATH=. python3 scripts/profile_host.py [calls]
"""

import cProfile
import pstats
import sys
import time

import torch

import cuqk

calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
hq, hk, d = 32, 8, 128
qkv = torch.randn(1, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16)
positions = torch.zeros(1, dtype=torch.int64, device="cuda")
weight = torch.ones(d, device="cuda", dtype=torch.bfloat16)
cache = torch.randn(4096, d, device="cuda")
kwargs = {"num_q_heads": hq, "num_kv_heads": hk, "head_dim": d}


def loop(n):
    for _ in range(n):
        cuqk.qk_norm_rope_(qkv, positions, weight, weight, cache, **kwargs)


loop(100)
torch.cuda.synchronize()
start = time.perf_counter()
loop(calls)
print(f"{(time.perf_counter() - start) / calls * 1e6:.2f} us per call (no profiler)")
torch.cuda.synchronize()
profiler = cProfile.Profile()
profiler.runcall(loop, calls)
pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
