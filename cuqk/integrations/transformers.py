"""Run the QK-norm + RoPE prologue of Hugging Face attention modules through cuqk.

:func:`apply` walks a transformers model and, on every attention module of a supported family,
replaces the module's ``forward`` (an instance attribute; the class is untouched) with one that

1. computes the q, k, v projections as the original forward does;
2. normalises and rotates each q and k head in one cuqk torch custom op (so ``torch.compile``
   can trace the patched forward), in place of the module's norms and its RoPE function;
3. continues exactly as the original forward: KV-cache update, the configured attention
   interface (same scaling, sliding window and dropout), output gate if any, output projection.

Supported families and how their prologue maps onto cuqk:

=========== ========================= ==============================================
family      attention class           prologue -> cuqk call
=========== ========================= ==============================================
qwen3       ``Qwen3Attention``        RMSNorm ``w``, then NeoX RoPE ->
                                      ``qk_norm_rope``, ``norm="rms"``
qwen3_moe   ``Qwen3MoeAttention``     same as qwen3
gemma3      ``Gemma3Attention``       RMSNorm ``(1 + w)``, then NeoX RoPE ->
                                      ``norm="gemma"``
llama4      ``Llama4TextAttention``   GPT-J (complex) RoPE, then a weight-free RMS
                                      ("L2") norm -> ``is_neox=False``,
                                      ``rope_first=True``, no weights; without
                                      ``use_qk_norm``: ``norm="none"``
qwen3_next  ``Qwen3NextAttention``    q_proj holds ``[q | gate]`` per head; RMSNorm
                                      ``(1 + w)``, then partial NeoX RoPE ->
                                      ``qk_norm_rope_gate``, ``norm="gemma"``;
                                      ``sigmoid(gate)`` after attention
qwen3_5     ``Qwen3_5Attention``      same as qwen3_next (its interleaved mRoPE is
                                      already folded into the per-token cos/sin)
qwen3_5_moe ``Qwen3_5MoeAttention``   same as qwen3_next
=========== ========================= ==============================================

Modules whose prologue cuqk has nothing to do for are left as they are and listed in the
report's ``skipped`` with the reason: Llama 4's NoPE layers (no RoPE, no QK norm; their
attention temperature tuning runs unchanged in the original forward), and any module whose
q and k norms have different eps (cuqk takes one).

Gemma 3's ``query_pre_attn_scalar`` (the module's ``scaling``), sliding window and per-layer
local/global rotary tables are all outside the prologue and kept as they are: the patched forward
reads whichever ``position_embeddings`` the decoder layer passes in.

transformers passes RoPE per token, not as positions: ``(cos, sin)`` of shape ``[B, S, r]``
with each half duplicated (``rotate_half`` layout), or for Llama 4 a complex ``freqs_cis``
``[B, S, r/2]``. The patched forward turns either into a cuqk ``[cos | sin]`` cache with one row
per token and calls cuqk with ``positions=None`` (token t reads row t). When the table has
batch 1 (shared by the whole batch), token ``(b, s)`` is given position ``s`` instead.

Matching is on the exact class, so a subclass that may have changed ``forward`` is not patched.
The patched forward is for inference: cuqk has no backward yet, so a call that needs gradients
raises ``TypeError`` (run under ``torch.no_grad()`` or ``torch.inference_mode()``).
:func:`restore` puts the original forwards back.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Union

import torch

from .. import torch as cuqk_torch

# Set on each patched module: the family name, which also marks the module as patched.
_MARK = "_cuqk_family"


class _Prologue(NamedTuple):
    """The cuqk flags for one module's prologue, fixed when it is patched."""

    norm: str
    eps: float
    is_neox: bool = True
    rope_first: bool = False


# A module's prologue, or the reason it is left unpatched.
_PrologueOrReason = Union[_Prologue, str]


@dataclass(frozen=True)
class PatchReport:
    """What :func:`apply` patched.

    Attributes
    ----------
    modules : dict of str to tuple of str
        For each family found, the qualified names (as in ``model.named_modules()``) of its
        attention modules that now run the cuqk prologue.
    skipped : dict of str to str
        Attention modules of a supported family left unpatched, by qualified name, each with
        the reason (e.g. a Llama 4 NoPE layer, which has no prologue to fuse).
    """

    modules: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    @property
    def counts(self) -> dict:
        """Number of patched modules per family."""
        return {family: len(names) for family, names in self.modules.items()}

    @property
    def total(self) -> int:
        """Number of patched modules in all."""
        return sum(len(names) for names in self.modules.values())


# ----------------------------------------------------------------------------- RoPE tables


def _rotate_half_cache(position_embeddings):
    """cuqk ``[..., r]`` ``[cos | sin]`` rows from transformers' ``(cos, sin)`` ``[..., r]``."""
    cos, sin = position_embeddings
    half = cos.shape[-1] // 2
    # Both halves of HF's cos/sin are the same (rotate_half layout); cuqk keeps one of each.
    return torch.cat((cos[..., :half], sin[..., :half]), dim=-1)


def _complex_cache(freqs_cis):
    """cuqk ``[..., r]`` ``[cos | sin]`` rows from Llama 4's complex ``freqs_cis [..., r/2]``."""
    # Any attention_scaling is folded into the magnitude, so c and s carry it as HF's does.
    return torch.view_as_real(freqs_cis).transpose(-1, -2).flatten(-2)


def _per_token(cache, input_shape):
    """cuqk ``(positions, cos_sin_cache)`` for a per-token ``[rows, S, r]`` table."""
    batch, seq = input_shape
    if cache.dim() != 3 or cache.shape[0] not in (1, batch) or cache.shape[1] != seq:
        raise ValueError(
            f"position_embeddings of shape {tuple(cache.shape)} do not match hidden states "
            f"[batch={batch}, seq={seq}]"
        )
    rows = cache.shape[0]
    cache = cache.reshape(rows * seq, cache.shape[-1])
    if rows == batch:
        return None, cache
    # A batch-1 table serves every sequence: token (b, s) reads row s, with no copy of the rows.
    return torch.arange(seq, device=cache.device).expand(batch, seq), cache


# ----------------------------------------------------------------------------- forwards


def _attend(module, eager, query, key, value, attention_mask, past_key_values, input_shape,
            **kwargs):
    """The original forwards' tail from RoPE'd ``[B, S, H, D]`` q, k to ``[B, S, Hq * D]``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    query, key = query.transpose(1, 2), key.transpose(1, 2)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, module.layer_idx)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager
    )
    attn_output, attn_weights = attention_interface(
        module, query, key, value, attention_mask,
        dropout=module.attention_dropout if module.training else 0.0,
        scaling=module.scaling,
        **kwargs,
    )
    return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights


def _project_qkv(module, hidden_states):
    """The q, k, v projections as the original forwards compute them: q and k stay
    ``[B, S, heads, head_dim]`` (contiguous rows) for cuqk and are transposed to transformers'
    ``[B, heads, S, head_dim]`` after it, as the originals do after RoPE; v is transposed now."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    query = module.q_proj(hidden_states).view(hidden_shape)
    key = module.k_proj(hidden_states).view(hidden_shape)
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    return input_shape, query, key, value


def _qk_norm_forward(prologue: _Prologue, eager: Callable):
    """Qwen3 / Qwen3-MoE / Gemma 3: weighted norm, then NeoX RoPE, with a sliding window."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None,
                past_key_values=None, **kwargs):
        input_shape, query, key, value = _project_qkv(self, hidden_states)

        positions, cache = _per_token(_rotate_half_cache(position_embeddings), input_shape)
        query, key = cuqk_torch.qk_norm_rope(
            query, key, positions, self.q_norm.weight, self.k_norm.weight, cache,
            eps=prologue.eps, is_neox=True, norm=prologue.norm,
        )
        attn_output, attn_weights = _attend(
            self, eager, query, key, value, attention_mask, past_key_values, input_shape,
            sliding_window=self.sliding_window, **kwargs,
        )
        return self.o_proj(attn_output), attn_weights

    return forward


def _llama4_forward(prologue: _Prologue, eager: Callable):
    """Llama 4 RoPE layers: GPT-J RoPE, then (with use_qk_norm) a weight-free RMS norm."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None,
                past_key_values=None, **kwargs):
        input_shape, query, key, value = _project_qkv(self, hidden_states)

        positions, cache = _per_token(
            _complex_cache(position_embeddings.to(query.device)), input_shape
        )
        query, key = cuqk_torch.qk_norm_rope(
            query, key, positions, None, None, cache, eps=prologue.eps, is_neox=False,
            norm=prologue.norm, rope_first=prologue.rope_first,
        )
        # Attention temperature tuning only touches NoPE layers, which are never patched.
        attn_output, attn_weights = _attend(
            self, eager, query, key, value, attention_mask, past_key_values, input_shape,
            **kwargs,
        )
        return self.o_proj(attn_output), attn_weights

    return forward


def _gated_forward(prologue: _Prologue, eager: Callable):
    """Qwen3-Next / Qwen3.5: q_proj gives ``[q | gate]`` per head; the output is gated."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None,
                past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q_gate = self.q_proj(hidden_states)
        key = self.k_proj(hidden_states)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        positions, cache = _per_token(_rotate_half_cache(position_embeddings), input_shape)
        # Head counts from the projections rather than the config, which a tensor-parallel
        # plan may have sharded.
        query, key, gate = cuqk_torch.qk_norm_rope_gate(
            q_gate, key, positions, self.q_norm.weight, self.k_norm.weight, cache,
            num_q_heads=q_gate.shape[-1] // (2 * self.head_dim),
            num_kv_heads=key.shape[-1] // self.head_dim, head_dim=self.head_dim,
            eps=prologue.eps, is_neox=True, norm=prologue.norm,
        )
        attn_output, attn_weights = _attend(
            self, eager, query.view(hidden_shape), key.view(hidden_shape), value,
            attention_mask, past_key_values, input_shape, **kwargs,
        )
        attn_output = attn_output * torch.sigmoid(gate)
        return self.o_proj(attn_output), attn_weights

    return forward


# ----------------------------------------------------------------------------- families


def _qk_norm_prologue(norm: str, eps_attr: str):
    """Prologue of modules with ``q_norm`` / ``k_norm`` RMSNorms storing eps as ``eps_attr``."""

    def plan(module) -> _PrologueOrReason:
        q_eps = getattr(module.q_norm, eps_attr)
        k_eps = getattr(module.k_norm, eps_attr)
        if q_eps != k_eps:
            return f"q_norm eps {q_eps} differs from k_norm eps {k_eps}; cuqk takes one eps"
        return _Prologue(norm, q_eps)

    return plan


def _llama4_prologue(module) -> _PrologueOrReason:
    if not module.use_rope:
        return "Llama 4 NoPE layer: no RoPE and no QK norm, nothing to fuse"
    if hasattr(module, "qk_norm"):  # use_qk_norm
        return _Prologue("rms", module.qk_norm.eps, is_neox=False, rope_first=True)
    return _Prologue("none", 0.0, is_neox=False)


@dataclass(frozen=True)
class _Family:
    name: str
    plan: Callable  # module -> _Prologue, or the reason to leave it unpatched
    make_forward: Callable  # (_Prologue, eager_attention_forward) -> forward


_QWEN3_NEXT_STYLE = (_qk_norm_prologue("gemma", "eps"), _gated_forward)

# Keyed by (module, qualname) rather than by class so that finding out what a model holds
# imports none of the model families it does not use.
_FAMILIES = {
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3Attention"):
        _Family("qwen3", _qk_norm_prologue("rms", "variance_epsilon"), _qk_norm_forward),
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeAttention"):
        _Family("qwen3_moe", _qk_norm_prologue("rms", "variance_epsilon"), _qk_norm_forward),
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3Attention"):
        _Family("gemma3", _qk_norm_prologue("gemma", "eps"), _qk_norm_forward),
    ("transformers.models.llama4.modeling_llama4", "Llama4TextAttention"):
        _Family("llama4", _llama4_prologue, _llama4_forward),
    ("transformers.models.qwen3_next.modeling_qwen3_next", "Qwen3NextAttention"):
        _Family("qwen3_next", *_QWEN3_NEXT_STYLE),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5Attention"):
        _Family("qwen3_5", *_QWEN3_NEXT_STYLE),
    ("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeAttention"):
        _Family("qwen3_5_moe", *_QWEN3_NEXT_STYLE),
}
SUPPORTED_FAMILIES = tuple(f.name for f in _FAMILIES.values())


def _key(module):
    cls = type(module)
    return cls.__module__, cls.__qualname__


def apply(model: torch.nn.Module) -> PatchReport:
    """Run the QK-norm + RoPE prologue of ``model``'s attention modules through cuqk.

    Patches in place every attention module of a supported family (see the module docstring)
    that has a prologue for cuqk; other modules are left alone. Calling ``apply`` again on a
    patched model patches nothing new and returns the same report.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model (e.g. ``Qwen3ForCausalLM``, ``Gemma3ForConditionalGeneration``,
        ``Llama4ForCausalLM``, ``Qwen3NextForCausalLM``, ``Qwen3_5ForCausalLM``) or any module
        holding one.

    Returns
    -------
    PatchReport
        The patched module names per family, and the modules left unpatched with the reason.

    Raises
    ------
    ValueError
        When ``model`` holds no attention module of a supported family, or when a module to patch
        already has an instance-level ``forward`` (e.g. an accelerate hook) that patching would
        drop.
    """
    found = [(name, m, _FAMILIES[_key(m)]) for name, m in model.named_modules()
             if _key(m) in _FAMILIES]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention module of a supported family; cuqk "
            f"patches {', '.join(SUPPORTED_FAMILIES)}"
        )
    plans = [(name, module, family, family.plan(module)) for name, module, family in found]
    # Check every module before patching any, so that a refusal leaves the model untouched.
    for name, module, _, prologue in plans:
        if isinstance(prologue, _Prologue) and not hasattr(module, _MARK) and (
            "forward" in module.__dict__
        ):
            raise ValueError(
                f"{name} ({type(module).__name__}) already has an instance-level forward "
                "(e.g. an accelerate hook); cuqk would replace it"
            )
    modules, skipped = {}, {}
    for name, module, family, prologue in plans:
        if not isinstance(prologue, _Prologue):
            skipped[name] = prologue
            continue
        if not hasattr(module, _MARK):
            eager = sys.modules[type(module).__module__].eager_attention_forward
            forward = family.make_forward(prologue, eager)
            forward.__doc__ = (
                f"{family.name} attention forward with the QK-norm + RoPE prologue in cuqk."
            )
            module.forward = types.MethodType(forward, module)
            setattr(module, _MARK, family.name)
        modules.setdefault(family.name, []).append(name)
    return PatchReport({family: tuple(names) for family, names in modules.items()}, skipped)


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
