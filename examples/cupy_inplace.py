"""The in-place op on CuPy arrays (NumPy, through the float64 reference, without a GPU).

Run: python examples/cupy_inplace.py
"""

import numpy as np

import cuqk

try:
    import cupy as xp

    xp.cuda.runtime.getDeviceCount()
except Exception:  # no GPU or no driver: the same code on NumPy
    xp = np

tokens, num_q_heads, num_kv_heads, head_dim = 8, 16, 4, 128
rng = np.random.default_rng(0)
qkv = xp.asarray(rng.standard_normal((tokens, (num_q_heads + 2 * num_kv_heads) * head_dim)),
                 dtype=xp.float16)
positions = xp.arange(tokens, dtype=xp.int32)
cos_sin_cache = xp.asarray(cuqk.rope_cos_sin_cache(1024, head_dim))
q_weight = xp.ones(head_dim, dtype=xp.float32)

v_before = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].copy()
cuqk.qk_norm_rope_(qkv, positions, q_weight, q_weight, cos_sin_cache, num_q_heads=num_q_heads,
                   num_kv_heads=num_kv_heads, head_dim=head_dim, is_neox=False)
v_after = qkv[:, (num_q_heads + num_kv_heads) * head_dim:]
print(f"{xp.__name__}: v untouched: {bool((v_after == v_before).all())}, "
      f"q[0, :4] = {qkv[0, :4]}")
