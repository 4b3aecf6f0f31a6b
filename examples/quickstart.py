"""Qwen3-8B-shaped QK norm + RoPE on a packed qkv, in place, on a GPU if there is one.

Run: python examples/quickstart.py   (without a GPU it runs the float64 reference on the CPU)
"""

import torch

import cuqk

device = "cuda" if torch.cuda.is_available() else "cpu"
tokens, num_q_heads, num_kv_heads, head_dim, max_position = 16, 32, 8, 128, 4096

qkv = torch.randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device=device,
                  dtype=torch.bfloat16)
positions = torch.arange(tokens, device=device)
q_weight = torch.ones(head_dim, device=device, dtype=torch.bfloat16)
k_weight = torch.ones(head_dim, device=device, dtype=torch.bfloat16)
cos_sin_cache = torch.from_numpy(cuqk.rope_cos_sin_cache(max_position, head_dim, base=1e6))
cos_sin_cache = cos_sin_cache.to(device)

cuqk.qk_norm_rope_(qkv, positions, q_weight, k_weight, cos_sin_cache,
                   num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
q = qkv[:, : num_q_heads * head_dim].view(tokens, num_q_heads, head_dim)
print(f"{device}: q head 0 of token 0 has RMS {q[0, 0].float().pow(2).mean().sqrt():.3f}")
