"""vLLM's ``fused_qk_norm_rope`` with its arguments and in-place semantics, backed by cuqk.

A vLLM-style model file switches with one import::

    from cuqk.compat.vllm import fused_qk_norm_rope

Differences from vLLM's op, all in what cuqk accepts beyond it: any head_dim that is a multiple of
16 from 32 to 512 (vLLM: 64, 128, 256), a cos/sin cache and weights in float32 whatever the
activation dtype, strided rows, and CPU tensors (the float64 reference). Positions outside the
cache give NaN rows instead of reading out of bounds. The call goes through
``torch.ops.cuqk.qk_norm_rope_``, so torch.compile traces it like vLLM's op.
"""

from __future__ import annotations

from ..torch import qk_norm_rope_


def fused_qk_norm_rope(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight,
                       k_weight, cos_sin_cache, is_neox, position_ids) -> None:
    """RMSNorm each q and k head of ``qkv [T, (Hq + Hk + Hv) * D]`` with ``q_weight`` /
    ``k_weight`` ``[D]``, then RoPE from ``cos_sin_cache [max_pos, rotary_dim]`` at
    ``position_ids [T]``; in place, returns None (as vLLM's op does)."""
    qk_norm_rope_(qkv, position_ids, q_weight, k_weight, cos_sin_cache, num_q_heads=num_heads_q,
                  num_kv_heads=num_heads_k, num_v_heads=num_heads_v, head_dim=head_dim, eps=eps,
                  is_neox=is_neox)
