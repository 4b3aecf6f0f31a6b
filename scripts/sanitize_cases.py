"""Small GPU cases for compute-sanitizer: every kernel variant plus the edge shapes.

Run under a sanitizer by scripts/sanitize.sh; on its own it is a quick smoke test. Every case is
small, since the sanitizer slows kernels down by orders of magnitude.
"""

import numpy as np
import torch

import cuqk
from cuqk import _jit
from cuqk.cli import _selftest_gpu_variant


def edge_cases():
    """(name, dtype, tokens, Hq, Hk, Hv, head_dim, rotary_dim, is_neox, offset, bad_positions)"""
    return [
        ("one token, one head", torch.bfloat16, 1, 1, 1, 0, 128, 128, True, 0, False),
        ("smallest head_dim", torch.float16, 3, 2, 1, 1, 32, 32, False, 0, False),
        ("largest head_dim", torch.float32, 3, 2, 1, 1, 512, 512, True, 0, False),
        ("partial rotary 2, GPT-J", torch.bfloat16, 5, 3, 1, 1, 48, 2, False, 0, False),
        ("odd head_dim, partial", torch.float16, 5, 3, 1, 1, 80, 34, True, 0, False),
        ("misaligned view", torch.bfloat16, 7, 4, 2, 2, 64, 64, True, 1, False),
        ("out-of-range positions", torch.float32, 9, 2, 2, 2, 64, 32, True, 0, True),
        ("zero tokens", torch.bfloat16, 0, 4, 2, 2, 128, 128, True, 0, False),
    ]


def run_edge_case(dtype, tokens, hq, hk, hv, head_dim, rotary_dim, is_neox, offset, bad):
    width = (hq + hk + hv) * head_dim
    flat = torch.randn(tokens * width + offset, device="cuda").to(dtype)
    qkv = flat[offset:].view(tokens, width)
    positions = torch.randint(0, 64, (tokens,), device="cuda")
    if bad and tokens:
        positions[0], positions[-1] = -1, 64
    cache = torch.from_numpy(cuqk.rope_cos_sin_cache(64, rotary_dim)).cuda()
    weight = torch.ones(head_dim, device="cuda", dtype=dtype)
    cuqk.qk_norm_rope_(qkv, positions, weight, weight, cache, num_q_heads=hq, num_kv_heads=hk,
                       head_dim=head_dim, num_v_heads=hv, is_neox=is_neox)
    if tokens:
        q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
        k = qkv[:, hq * head_dim:(hq + hk) * head_dim].view(tokens, hk, head_dim)
        cuqk.qk_norm_rope(q, k, positions, None, None, cache, is_neox=is_neox)


def main():
    rng = np.random.default_rng(0)
    for variant in _jit.VARIANTS:
        problem = _selftest_gpu_variant(variant, rng)
        print(f"{variant.name:<45} {problem or 'ok'}")
    for name, *case in edge_cases():
        run_edge_case(*case)
        print(f"{name:<45} ran")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
