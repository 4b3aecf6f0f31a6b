"""cuqk as torch custom ops, so that torch.compile (fullgraph) and CUDA graphs can hold them.

Importing this module registers, through ``torch.library.custom_op``:

- ``torch.ops.cuqk.qk_norm_rope_``: in place on a packed qkv (declared to mutate ``qkv`` only);
- ``torch.ops.cuqk.qk_norm_rope``: out of place, returns new contiguous ``(q_out, k_out)``;

each with a fake (meta) implementation for tracing. The functions below have the signatures of
``cuqk.qk_norm_rope_`` and ``cuqk.qk_norm_rope`` and call the ops. Eager callers who do not
compile can call ``cuqk.qk_norm_rope_`` directly: it skips torch's dispatcher (a few us less).
"""

from __future__ import annotations

from typing import Optional

import torch

# The package attribute cuqk.qk_norm_rope is the function, not this submodule.
from .qk_norm_rope import qk_norm_rope as _core_split
from .qk_norm_rope import qk_norm_rope_ as _core_packed

Tensor = torch.Tensor


@torch.library.custom_op("cuqk::qk_norm_rope_", mutates_args=("qkv",))
def _packed_op(qkv: Tensor, positions: Tensor, q_weight: Optional[Tensor],
               k_weight: Optional[Tensor], cos_sin_cache: Tensor, num_q_heads: int,
               num_kv_heads: int, head_dim: int, num_v_heads: Optional[int], eps: float,
               is_neox: bool, rotary_dim: Optional[int], norm: str) -> None:
    _core_packed(qkv, positions, q_weight, k_weight, cos_sin_cache,
                 num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 num_v_heads=num_v_heads, eps=eps, is_neox=is_neox, rotary_dim=rotary_dim,
                 norm=norm)


@_packed_op.register_fake
def _packed_fake(qkv, positions, q_weight, k_weight, cos_sin_cache, num_q_heads, num_kv_heads,
                 head_dim, num_v_heads, eps, is_neox, rotary_dim, norm):
    return None


@torch.library.custom_op("cuqk::qk_norm_rope", mutates_args=())
def _split_op(q: Tensor, k: Tensor, positions: Tensor, q_weight: Optional[Tensor],
              k_weight: Optional[Tensor], cos_sin_cache: Tensor, eps: float, is_neox: bool,
              rotary_dim: Optional[int], norm: str) -> tuple[Tensor, Tensor]:
    return _core_split(q, k, positions, q_weight, k_weight, cos_sin_cache, eps=eps,
                       is_neox=is_neox, rotary_dim=rotary_dim, norm=norm)


@_split_op.register_fake
def _split_fake(q, k, positions, q_weight, k_weight, cos_sin_cache, eps, is_neox, rotary_dim,
                norm):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def qk_norm_rope_(qkv, positions, q_weight, k_weight, cos_sin_cache, *, num_q_heads,
                  num_kv_heads, head_dim, num_v_heads=None, eps=1e-6, is_neox=True,
                  rotary_dim=None, norm="rms"):
    """``cuqk.qk_norm_rope_`` through ``torch.ops.cuqk.qk_norm_rope_``; returns ``qkv``."""
    torch.ops.cuqk.qk_norm_rope_(qkv, positions, q_weight, k_weight, cos_sin_cache,
                                 num_q_heads, num_kv_heads, head_dim, num_v_heads, float(eps),
                                 is_neox, rotary_dim, norm)
    return qkv


def qk_norm_rope(q, k, positions, q_weight, k_weight, cos_sin_cache, *, eps=1e-6, is_neox=True,
                 rotary_dim=None, norm="rms"):
    """``cuqk.qk_norm_rope`` through ``torch.ops.cuqk.qk_norm_rope``; returns ``(q_out, k_out)``."""
    return torch.ops.cuqk.qk_norm_rope(q, k, positions, q_weight, k_weight, cos_sin_cache,
                                       float(eps), is_neox, rotary_dim, norm)
