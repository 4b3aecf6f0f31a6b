"""cuqk as torch custom ops, so that torch.compile (fullgraph) and CUDA graphs can hold them.

Importing this module registers, through ``torch.library.custom_op``:

- ``torch.ops.cuqk.qk_norm_rope_``: in place on a packed qkv (declared to mutate ``qkv`` only);
- ``torch.ops.cuqk.qk_norm_rope``: out of place, returns new contiguous ``(q_out, k_out)``;
- ``torch.ops.cuqk.qk_norm_rope_gate``: gated attention's prologue, returns new contiguous
  ``(q_out, k_out, gate_out)``;
- ``torch.ops.cuqk.cos_sin_of_complex``: ``[..., n]`` complex ``cos + i sin`` to a real
  ``[..., 2n]`` ``[cos | sin]``, which the fusion pass inserts for Llama 4's ``freqs_cis``;

each with a fake (meta) implementation for tracing. The functions below have the signatures of
``cuqk.qk_norm_rope_``, ``cuqk.qk_norm_rope`` and ``cuqk.qk_norm_rope_gate`` and call the ops.
Eager callers who do not compile can call the ``cuqk`` functions directly: they skip torch's
dispatcher (a few us less).

:func:`enable_fusion` turns on an Inductor pass that finds per-head RMSNorm followed by RoPE in
graphs compiled with ``torch.compile`` and replaces it with ``torch.ops.cuqk.qk_norm_rope``
(see ``cuqk._fusion``); :func:`fusion_report` says what it fused and what it left, and why.
"""

from __future__ import annotations

from typing import Optional

import torch

# The package attribute cuqk.qk_norm_rope is the function, not this submodule.
from .qk_norm_rope import qk_norm_rope as _core_split
from .qk_norm_rope import qk_norm_rope_ as _core_packed
from .qk_norm_rope import qk_norm_rope_gate as _core_gate

Tensor = torch.Tensor


@torch.library.custom_op("cuqk::qk_norm_rope_", mutates_args=("qkv",))
def _packed_op(qkv: Tensor, positions: Optional[Tensor], q_weight: Optional[Tensor],
               k_weight: Optional[Tensor], cos_sin_cache: Tensor, num_q_heads: int,
               num_kv_heads: int, head_dim: int, num_v_heads: Optional[int], eps: float,
               is_neox: bool, rotary_dim: Optional[int], norm: str, rope_first: bool = False,
               mrope_section: Optional[list[int]] = None,
               mrope_interleaved: bool = False) -> None:
    _core_packed(qkv, positions, q_weight, k_weight, cos_sin_cache,
                 num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 num_v_heads=num_v_heads, eps=eps, is_neox=is_neox, rotary_dim=rotary_dim,
                 norm=norm, rope_first=rope_first, mrope_section=mrope_section,
                 mrope_interleaved=mrope_interleaved)


@_packed_op.register_fake
def _packed_fake(qkv, positions, q_weight, k_weight, cos_sin_cache, num_q_heads, num_kv_heads,
                 head_dim, num_v_heads, eps, is_neox, rotary_dim, norm, rope_first=False,
                 mrope_section=None, mrope_interleaved=False):
    return None


@torch.library.custom_op("cuqk::qk_norm_rope", mutates_args=())
def _split_op(q: Tensor, k: Tensor, positions: Optional[Tensor], q_weight: Optional[Tensor],
              k_weight: Optional[Tensor], cos_sin_cache: Tensor, eps: float, is_neox: bool,
              rotary_dim: Optional[int], norm: str, rope_first: bool = False,
              mrope_section: Optional[list[int]] = None,
              mrope_interleaved: bool = False) -> tuple[Tensor, Tensor]:
    return _core_split(q, k, positions, q_weight, k_weight, cos_sin_cache, eps=eps,
                       is_neox=is_neox, rotary_dim=rotary_dim, norm=norm, rope_first=rope_first,
                       mrope_section=mrope_section, mrope_interleaved=mrope_interleaved)


@_split_op.register_fake
def _split_fake(q, k, positions, q_weight, k_weight, cos_sin_cache, eps, is_neox, rotary_dim,
                norm, rope_first=False, mrope_section=None, mrope_interleaved=False):
    # Contiguous, as the real op allocates them (Inductor plans buffers from these).
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("cuqk::qk_norm_rope_gate", mutates_args=())
def _gate_op(q_gate: Tensor, k: Tensor, positions: Optional[Tensor], q_weight: Optional[Tensor],
             k_weight: Optional[Tensor], cos_sin_cache: Tensor, num_q_heads: int,
             num_kv_heads: int, head_dim: int, eps: float, is_neox: bool,
             rotary_dim: Optional[int], norm: str, rope_first: bool = False,
             mrope_section: Optional[list[int]] = None,
             mrope_interleaved: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return _core_gate(q_gate, k, positions, q_weight, k_weight, cos_sin_cache,
                      num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      eps=eps, is_neox=is_neox, rotary_dim=rotary_dim, norm=norm,
                      rope_first=rope_first, mrope_section=mrope_section,
                      mrope_interleaved=mrope_interleaved)


@_gate_op.register_fake
def _gate_fake(q_gate, k, positions, q_weight, k_weight, cos_sin_cache, num_q_heads,
               num_kv_heads, head_dim, eps, is_neox, rotary_dim, norm, rope_first=False,
               mrope_section=None, mrope_interleaved=False):
    lead = q_gate.shape[:-1]
    q_width = num_q_heads * head_dim
    return (q_gate.new_empty((*lead, q_width)), k.new_empty((*lead, num_kv_heads * head_dim)),
            q_gate.new_empty((*lead, q_width)))


@torch.library.custom_op("cuqk::cos_sin_of_complex", mutates_args=())
def _cos_sin_of_complex(freqs: Tensor) -> Tensor:
    # An op of its own: Inductor generates no code for complex tensors (on the GPU, views of
    # them failed to compile), and an opaque op leaves it none to generate.
    return torch.cat([freqs.real, freqs.imag], dim=-1)


@_cos_sin_of_complex.register_fake
def _cos_sin_of_complex_fake(freqs):
    return torch.empty((*freqs.shape[:-1], 2 * freqs.shape[-1]), dtype=freqs.dtype.to_real(),
                       device=freqs.device)


def _section(mrope_section):
    # The op schema takes list[int]; callers may pass a tuple.
    return None if mrope_section is None else [int(s) for s in mrope_section]


def qk_norm_rope_(qkv, positions, q_weight, k_weight, cos_sin_cache, *, num_q_heads,
                  num_kv_heads, head_dim, num_v_heads=None, eps=1e-6, is_neox=True,
                  rotary_dim=None, norm="rms", rope_first=False, mrope_section=None,
                  mrope_interleaved=False):
    """``cuqk.qk_norm_rope_`` through ``torch.ops.cuqk.qk_norm_rope_``; returns ``qkv``."""
    torch.ops.cuqk.qk_norm_rope_(qkv, positions, q_weight, k_weight, cos_sin_cache,
                                 num_q_heads, num_kv_heads, head_dim, num_v_heads, float(eps),
                                 is_neox, rotary_dim, norm, rope_first, _section(mrope_section),
                                 mrope_interleaved)
    return qkv


def qk_norm_rope(q, k, positions, q_weight, k_weight, cos_sin_cache, *, eps=1e-6, is_neox=True,
                 rotary_dim=None, norm="rms", rope_first=False, mrope_section=None,
                 mrope_interleaved=False):
    """``cuqk.qk_norm_rope`` through ``torch.ops.cuqk.qk_norm_rope``; returns ``(q_out, k_out)``."""
    return torch.ops.cuqk.qk_norm_rope(q, k, positions, q_weight, k_weight, cos_sin_cache,
                                       float(eps), is_neox, rotary_dim, norm, rope_first,
                                       _section(mrope_section), mrope_interleaved)


def qk_norm_rope_gate(q_gate, k, positions, q_weight, k_weight, cos_sin_cache, *, num_q_heads,
                      num_kv_heads, head_dim, eps=1e-6, is_neox=True, rotary_dim=None,
                      norm="gemma", rope_first=False, mrope_section=None,
                      mrope_interleaved=False):
    """``cuqk.qk_norm_rope_gate`` through ``torch.ops.cuqk.qk_norm_rope_gate``; returns
    ``(q_out, k_out, gate_out)``."""
    return torch.ops.cuqk.qk_norm_rope_gate(
        q_gate, k, positions, q_weight, k_weight, cos_sin_cache, num_q_heads, num_kv_heads,
        head_dim, float(eps), is_neox, rotary_dim, norm, rope_first, _section(mrope_section),
        mrope_interleaved)


def enable_fusion():
    """Fuse per-head RMSNorm + RoPE into ``torch.ops.cuqk.qk_norm_rope`` in every graph that
    ``torch.compile`` (Inductor) compiles from now on, and start a new :func:`fusion_report`.

    Installs a pass as ``torch._inductor.config.post_grad_custom_pre_pass`` (a pass already
    there keeps running, first). For inference: a graph that saves the norm for a backward is
    left as it is (and reported). How sites are recognised: ``cuqk._fusion``.
    """
    from . import _fusion

    _fusion.enable()


def disable_fusion():
    """Stop fusing in graphs compiled from now on (graphs already compiled keep their fusion;
    ``torch._dynamo.reset()`` drops them)."""
    from . import _fusion

    _fusion.disable()


def fusion_report():
    """What the fusion pass did since :func:`enable_fusion`: a ``cuqk._fusion.FusionReport``
    with each site fused and each candidate left with the reason; ``print`` it for a summary."""
    from . import _fusion

    return _fusion.report()
