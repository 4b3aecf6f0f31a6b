"""A Qwen3 attention block's prologue in torch: q/k/v projection, per-head QK RMSNorm, RoPE.

Unfused (as the Hugging Face model writes it) against cuqk on the same inputs: the same numbers
within bf16 rounding, and the time of each. Runs on the GPU if there is one, else on the CPU
(where cuqk runs its float64 reference, so the times there mean nothing).

Run: python examples/qwen3_attention.py
"""

import time

import torch

import cuqk

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16
hidden, num_q_heads, num_kv_heads, head_dim = 4096, 32, 8, 128  # Qwen3-8B
tokens = 2048 if device == "cuda" else 16
torch.manual_seed(0)

qkv_proj = torch.nn.Linear(hidden, (num_q_heads + 2 * num_kv_heads) * head_dim, bias=False,
                           device=device, dtype=dtype)
q_norm_weight = 1 + 0.1 * torch.randn(head_dim, device=device, dtype=dtype)
k_norm_weight = 1 + 0.1 * torch.randn(head_dim, device=device, dtype=dtype)
cos_sin_cache = torch.from_numpy(cuqk.rope_cos_sin_cache(40960, head_dim, base=1e6))
cos_sin_cache = cos_sin_cache.to(device)
hidden_states = torch.randn(tokens, hidden, device=device, dtype=dtype)
positions = torch.arange(tokens, device=device)


def rms_norm(x, weight, eps=1e-6):
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def unfused(x):
    q, k, v = qkv_proj(x).split([num_q_heads * head_dim, num_kv_heads * head_dim,
                                 num_kv_heads * head_dim], dim=-1)
    q = rms_norm(q.view(tokens, num_q_heads, head_dim), q_norm_weight)
    k = rms_norm(k.view(tokens, num_kv_heads, head_dim), k_norm_weight)
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    q = (q * cos + rotate_half(q) * sin).to(dtype)
    k = (k * cos + rotate_half(k) * sin).to(dtype)
    return q, k, v


def fused(x):
    qkv = qkv_proj(x)
    cuqk.qk_norm_rope_(qkv, positions, q_norm_weight, k_norm_weight, cos_sin_cache,
                       num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    return q.view(tokens, num_q_heads, head_dim), k.view(tokens, num_kv_heads, head_dim), v


def timed(fn, reps=20):
    fn(hidden_states)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        out = fn(hidden_states)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / reps * 1e6


with torch.inference_mode():
    (q_ref, k_ref, _), t_unfused = timed(unfused)
    (q_cuqk, k_cuqk, _), t_fused = timed(fused)
for name, ref, got in (("q", q_ref, q_cuqk), ("k", k_ref, k_cuqk)):
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"{name}: relative L2 difference {err:.2e}")
    assert err < 1e-2, f"{name} differs: {err}"
print(f"{device}, T={tokens}: unfused {t_unfused:.1f} us, cuqk {t_fused:.1f} us per prologue")
