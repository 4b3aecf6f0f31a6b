"""Run the QK-norm + RoPE prologue of Hugging Face attention modules through cuqk.

:func:`apply` walks a transformers model and, on every attention module of a supported family,
replaces the module's ``forward`` (an instance attribute; the class is untouched) with one that

1. computes the q, k, v projections as the original forward does;
2. normalises each q and k head with the module's ``q_norm`` / ``k_norm`` weights and eps and
   applies RoPE, in one :func:`cuqk.torch.qk_norm_rope` call (a torch custom op, so
   ``torch.compile`` can trace the patched forward), in place of ``q_norm``, ``k_norm`` and
   ``apply_rotary_pos_emb``;
3. continues exactly as the original forward: KV-cache update, the configured attention
   interface (same scaling, sliding window and dropout), output projection.

Supported families and what their prologue is:

========== ===================== ==================================================
family     attention class       per-head norm before RoPE
========== ===================== ==================================================
qwen3      ``Qwen3Attention``    RMSNorm ``x * rsqrt(mean(x^2) + eps) * w`` (rms)
qwen3_moe  ``Qwen3MoeAttention`` same as qwen3 (rms)
gemma3     ``Gemma3Attention``   RMSNorm scaled by ``1 + w`` (gemma)
========== ===================== ==================================================

Gemma 3's ``query_pre_attn_scalar`` (the module's ``scaling``), sliding window and per-layer
local/global rotary tables are all outside the prologue and kept as they are: the patched forward
reads whichever ``position_embeddings`` the decoder layer passes in.

transformers passes RoPE as per-token ``(cos, sin)`` of shape ``[B, S, r]`` with each half
duplicated (``rotate_half`` layout, i.e. NeoX), not as positions. The patched forward turns them
into a cuqk cache with one row per token, ``cat(cos[..., :r/2], sin[..., :r/2])``, and gives
token ``(b, s)`` the position of its own row. When cos/sin have batch 1 (shared by the whole
batch) the rows are shared too.

Matching is on the exact class, so a subclass that may have changed ``forward`` is not patched.
The patched forward is for inference: cuqk has no backward yet, so a call that needs gradients
raises ``TypeError`` (run under ``torch.no_grad()`` or ``torch.inference_mode()``).
:func:`restore` puts the original forwards back.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import torch as cuqk_torch


@dataclass(frozen=True)
class _Family:
    name: str
    norm: str
    eps_attr: str


# Keyed by (module, qualname) rather than by class so that finding out what a model holds
# imports none of the model families it does not use.
_FAMILIES = {
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3Attention"):
        _Family("qwen3", "rms", "variance_epsilon"),
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeAttention"):
        _Family("qwen3_moe", "rms", "variance_epsilon"),
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3Attention"):
        _Family("gemma3", "gemma", "eps"),
}
SUPPORTED_FAMILIES = tuple(f.name for f in _FAMILIES.values())

_LLAMA4_ATTENTION = ("transformers.models.llama4.modeling_llama4", "Llama4TextAttention")

# Set on each patched module: the family name, which also marks the module as patched.
_MARK = "_cuqk_family"


@dataclass(frozen=True)
class PatchReport:
    """What :func:`apply` patched.

    Attributes
    ----------
    modules : dict of str to tuple of str
        For each family found, the qualified names (as in ``model.named_modules()``) of its
        attention modules that now run the cuqk prologue.
    """

    modules: dict = field(default_factory=dict)

    @property
    def counts(self) -> dict:
        """Number of patched modules per family."""
        return {family: len(names) for family, names in self.modules.items()}

    @property
    def total(self) -> int:
        """Number of patched modules in all."""
        return sum(len(names) for names in self.modules.values())


def _key(module):
    cls = type(module)
    return cls.__module__, cls.__qualname__


def _rope_inputs(position_embeddings, input_shape):
    """cuqk ``(positions, cos_sin_cache)`` for transformers' per-token ``(cos, sin)``."""
    cos, sin = position_embeddings
    batch, seq = input_shape
    rows, width = cos.shape[0], cos.shape[-1]
    if rows not in (1, batch) or cos.shape[1] != seq:
        raise ValueError(
            f"position_embeddings of shape {tuple(cos.shape)} do not match hidden states "
            f"[batch={batch}, seq={seq}]"
        )
    half = width // 2
    # Both halves of HF's cos/sin are the same (rotate_half layout); cuqk keeps one of each.
    cache = torch.cat((cos[..., :half], sin[..., :half]), dim=-1).reshape(rows * seq, width)
    # Row t of the cache belongs to token t; batch-1 tables serve every sequence of the batch.
    positions = torch.arange(rows * seq, device=cos.device).view(rows, seq)
    return positions.expand(batch, seq).contiguous(), cache


def _make_forward(family: _Family, eager_attention_forward: Callable):
    """An attention ``forward`` for ``family`` with the cuqk prologue, to bind to a module."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def forward(self, hidden_states, position_embeddings, attention_mask=None,
                past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        # q and k stay [B, S, heads, head_dim] (contiguous rows) for cuqk and are transposed
        # to transformers' [B, heads, S, head_dim] after it, as the original does after RoPE.
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        positions, cos_sin_cache = _rope_inputs(position_embeddings, input_shape)
        query, key = cuqk_torch.qk_norm_rope(
            query, key, positions, self.q_norm.weight, self.k_norm.weight, cos_sin_cache,
            eps=getattr(self.q_norm, family.eps_attr), is_neox=True, norm=family.norm,
        )
        query, key = query.transpose(1, 2), key.transpose(1, 2)

        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    forward.__doc__ = f"{family.name} attention forward with the QK-norm + RoPE prologue in cuqk."
    return forward


def _check_supported(model, found):
    if found:
        return
    if any(_key(m) == _LLAMA4_ATTENTION for m in model.modules()):
        raise NotImplementedError(
            f"{type(model).__name__}: Llama 4 applies its weight-free QK L2 norm after RoPE, "
            "and cuqk only normalises before RoPE; Llama 4 is not supported yet"
        )
    raise ValueError(
        f"{type(model).__name__} has no attention module of a supported family; cuqk patches "
        f"{', '.join(SUPPORTED_FAMILIES)}"
    )


def apply(model: torch.nn.Module) -> PatchReport:
    """Run the QK-norm + RoPE prologue of ``model``'s attention modules through cuqk.

    Patches in place every attention module of a supported family (see the module docstring);
    other modules are left alone. Calling ``apply`` again on a patched model patches nothing new
    and returns the same report.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model (e.g. ``Qwen3ForCausalLM``, ``Qwen3MoeModel``,
        ``Gemma3ForCausalLM``, ``Gemma3ForConditionalGeneration``) or any module holding one.

    Returns
    -------
    PatchReport
        The patched module names per family.

    Raises
    ------
    NotImplementedError
        For a Llama 4 model (its QK norm comes after RoPE, which cuqk cannot do yet).
    ValueError
        When ``model`` holds no attention module of a supported family, or when a module to patch
        already has an instance-level ``forward`` (e.g. an accelerate hook) that patching would
        drop.
    """
    found = [(name, m, _FAMILIES[_key(m)]) for name, m in model.named_modules()
             if _key(m) in _FAMILIES]
    _check_supported(model, found)
    # Check every module before patching any, so that a refusal leaves the model untouched.
    for name, module, _ in found:
        if hasattr(module, _MARK):
            continue
        if "forward" in module.__dict__:
            raise ValueError(
                f"{name} ({type(module).__name__}) already has an instance-level forward "
                "(e.g. an accelerate hook); cuqk would replace it"
            )
    modules = {}
    for name, module, family in found:
        if not hasattr(module, _MARK):
            eager = sys.modules[type(module).__module__].eager_attention_forward
            module.forward = types.MethodType(_make_forward(family, eager), module)
            setattr(module, _MARK, family.name)
        modules.setdefault(family.name, []).append(name)
    return PatchReport({family: tuple(names) for family, names in modules.items()})


def restore(model: torch.nn.Module) -> int:
    """Put back the original forwards of the modules that :func:`apply` patched.

    Parameters
    ----------
    model : torch.nn.Module
        A model passed to :func:`apply` (modules never patched are left alone).

    Returns
    -------
    int
        The number of modules restored.
    """
    restored = 0
    for module in model.modules():
        if hasattr(module, _MARK):
            # The class's forward shows through again once the instance attribute is gone.
            del module.forward
            delattr(module, _MARK)
            restored += 1
    return restored
