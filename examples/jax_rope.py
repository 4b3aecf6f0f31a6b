"""A Qwen3-style attention prologue in JAX: q/k/v projection, then per-head QK RMSNorm + RoPE by
cuqk, all inside one jitted function, checked against the same prologue written in plain JAX.

On a GPU the cuqk kernel runs on XLA's stream, between the projection and whatever consumes q
and k; without one, JAX's CPU backend runs the same script through cuqk's float64 reference.

Run: python examples/jax_rope.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import cuqk

on_gpu = jax.default_backend() == "gpu"
dtype = jnp.bfloat16 if on_gpu else jnp.float32
tokens, hidden, num_q_heads, num_kv_heads, head_dim = 64, 1024, 16, 4, 128
q_end = num_q_heads * head_dim
k_end = q_end + num_kv_heads * head_dim

keys = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(keys[0], (tokens, hidden), dtype)
w_qkv = (jax.random.normal(keys[1], (hidden, k_end + num_kv_heads * head_dim))
         / hidden**0.5).astype(dtype)
q_norm = (1 + 0.1 * jax.random.normal(keys[2], (head_dim,))).astype(dtype)
k_norm = (1 + 0.1 * jax.random.normal(keys[3], (head_dim,))).astype(dtype)
cos_sin_cache = jnp.asarray(cuqk.rope_cos_sin_cache(40960, head_dim, base=1e6))
positions = 1000 + jnp.arange(tokens, dtype=jnp.int32)


def project(x, w_qkv):
    qkv = x @ w_qkv
    return (qkv[:, :q_end].reshape(tokens, num_q_heads, head_dim),
            qkv[:, q_end:k_end].reshape(tokens, num_kv_heads, head_dim),
            qkv[:, k_end:].reshape(tokens, num_kv_heads, head_dim))


@jax.jit
def prologue_cuqk(x, w_qkv, positions, q_norm, k_norm, cos_sin_cache):
    q, k, v = project(x, w_qkv)
    q, k = cuqk.qk_norm_rope(q, k, positions, q_norm, k_norm, cos_sin_cache)
    return q, k, v


def norm_rope(heads, weight, positions, cos_sin_cache):
    """RMSNorm then NeoX RoPE in float32, as the model code writes it."""
    h = heads.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
    h = h * weight.astype(jnp.float32)
    cos, sin = jnp.split(cos_sin_cache[positions][:, None, :], 2, axis=-1)
    a, b = jnp.split(h, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(heads.dtype)


@jax.jit
def prologue_jax(x, w_qkv, positions, q_norm, k_norm, cos_sin_cache):
    q, k, v = project(x, w_qkv)
    return (norm_rope(q, q_norm, positions, cos_sin_cache),
            norm_rope(k, k_norm, positions, cos_sin_cache), v)


args = (x, w_qkv, positions, q_norm, k_norm, cos_sin_cache)
q, k, v = prologue_cuqk(*args)
q_jax, k_jax, _ = prologue_jax(*args)
# Both end in one rounding to the output dtype, of float32 (plain JAX) or float32/float64 (cuqk
# on GPU/CPU) math: bfloat16 results may differ in the last place, float32 ones by a few.
tolerance = {"bfloat16": 2e-2, "float32": 1e-5}[jnp.dtype(dtype).name]
for name, ours, theirs in (("q", q, q_jax), ("k", k, k_jax)):
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                               rtol=tolerance, atol=tolerance, err_msg=name)
print(f"{jax.default_backend()}, {jnp.dtype(dtype).name}: q {q.shape}, k {k.shape} match the "
      f"plain JAX prologue; q[0, 0, :4] = {np.asarray(q[0, 0, :4], np.float32)}")
