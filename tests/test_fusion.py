"""The torch.compile fusion pass (cuqk._fusion): what it fuses, what it refuses and says why, and
that compiled-with-the-pass matches eager.

On the CPU Inductor compiles C++ (a compiler must be on PATH) and the fused op runs cuqk's float64
reference with one rounding, so float32 results match eager to float32 rounding. The GPU part
runs the kernels in bfloat16.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import TOLERANCES, requires_gpu

torch = pytest.importorskip("torch")
cuqk_torch = pytest.importorskip("cuqk.torch")

import torch.nn.functional as F  # noqa: E402
from torch._functorch import config as functorch_config  # noqa: E402

import cuqk  # noqa: E402
from cuqk import _fusion  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="Inductor needs a C++ compiler (CPU code, and the GPU launchers)")

EPS = 1e-5


@pytest.fixture
def fusion(monkeypatch):
    """Fusion on, Inductor's caches off (a cached graph is not re-examined, so not reported),
    and a count of the fused op's calls."""
    calls = []
    core = cuqk_torch._core_split

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return core(*args, **kwargs)

    monkeypatch.setattr(cuqk_torch, "_core_split", counted)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        cuqk_torch.enable_fusion()
        try:
            yield calls
        finally:
            cuqk_torch.disable_fusion()
            torch._dynamo.reset()


def _rel_err(got, want):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all()
    return float((got - want).norm() / want.norm())


def _assert_close(got, want, dtype="float32"):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        err = _rel_err(g, w)
        assert err <= TOLERANCES[dtype], f"relative L2 error {err:.3g} > {TOLERANCES[dtype]}"


# ----------------------------------------------------------------------------- model spellings


def norm_plain(x, w, eps):
    # Qwen3 / Llama: float32 statistics, weight applied in the input dtype.
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def norm_functional(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def norm_gemma(x, w, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + w.float())).type_as(x)


def norm_weightless(x, w, eps):
    # Llama 4's L2Norm: no weight (w is ignored).
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


NORMS = {"plain": (norm_plain, "rms"), "functional": (norm_functional, "rms"),
         "gemma": (norm_gemma, "gemma"), "weightless": (norm_weightless, "rms")}


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def hf_cos_sin(positions, rotary_dim, is_neox, dtype):
    """transformers-style per-token cos/sin ``[B, S, r]``: halves duplicated (NeoX) or each
    frequency repeated twice (GPT-J)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    freqs = positions.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), -1) if is_neox else freqs.repeat_interleave(2, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class HFAttentionPrologue(torch.nn.Module):
    """q/k projections [B, S, H*D] -> per-head norm -> [B, H, S, D] -> RoPE with per-token
    cos/sin [B, S, r] (transformers' apply_rotary_pos_emb, partial rotary as in GLM/Phi); with
    rope_first, RoPE -> norm."""

    def __init__(self, norm="plain", is_neox=True, rotary_dim=64, head_dim=64, heads=(4, 2),
                 dtype=torch.float32, rope_first=False):
        super().__init__()
        self.norm, self.kind = NORMS[norm]
        self.is_neox, self.rotary_dim, self.head_dim = is_neox, rotary_dim, head_dim
        self.rope_first = rope_first
        gen = torch.Generator().manual_seed(0)
        self.q_weight, self.k_weight = (
            torch.nn.Parameter((1 + 0.3 * torch.randn(head_dim, generator=gen)).to(dtype),
                               requires_grad=False) for _ in heads)

    def rope(self, x, cos, sin):
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        turn = rotate_half if self.is_neox else rotate_every_two
        return torch.cat((rot * cos + turn(rot) * sin, rest), dim=-1)

    def forward(self, q, k, cos, sin):
        shape = (*q.shape[:-1], -1, self.head_dim)
        if self.rope_first:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q, k = (self.rope(x.view(shape).transpose(1, 2), cos, sin) for x in (q, k))
            return self.norm(q, self.q_weight, EPS), self.norm(k, self.k_weight, EPS)
        q = self.norm(q.view(shape), self.q_weight, EPS).transpose(1, 2)
        k = self.norm(k.view(shape), self.k_weight, EPS).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return self.rope(q, cos, sin), self.rope(k, cos, sin)


def hf_inputs(batch=2, seq=7, heads=(4, 2), head_dim=64, rotary_dim=64, is_neox=True,
              dtype=torch.float32, cos_batch=None, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, seq, h * head_dim, generator=gen).to(dtype) for h in heads)
    positions = torch.randint(0, 500, (cos_batch or batch, seq), generator=gen)
    cos, sin = hf_cos_sin(positions, rotary_dim, is_neox, dtype)
    return [t.to(device) for t in (q, k, cos, sin)]


class VllmAttentionPrologue(torch.nn.Module):
    """vLLM's layout: flat [T, H*D] projections, the norm on a [T, H, D] view, RoPE from a
    [max_position, r] cos | sin cache gathered by positions (RotaryEmbedding.forward_native)."""

    def __init__(self, norm="functional", is_neox=True, rotary_dim=64, head_dim=64,
                 heads=(4, 2), gather="index_select", dtype=torch.float32):
        super().__init__()
        self.norm, self.kind = NORMS[norm]
        self.is_neox, self.rotary_dim, self.head_dim, self.gather = (
            is_neox, rotary_dim, head_dim, gather)
        gen = torch.Generator().manual_seed(0)
        self.q_weight, self.k_weight = (
            torch.nn.Parameter((1 + 0.3 * torch.randn(head_dim, generator=gen)).to(dtype),
                               requires_grad=False) for _ in heads)
        self.register_buffer("cos_sin_cache",
                             torch.from_numpy(cuqk.rope_cos_sin_cache(512, rotary_dim)))

    def rope(self, x, cos, sin):
        x = x.view(x.shape[0], -1, self.head_dim)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        if self.is_neox:
            x1, x2 = torch.chunk(rot, 2, dim=-1)
        else:
            x1, x2 = rot[..., ::2], rot[..., 1::2]
        o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        rot = torch.cat((o1, o2), -1) if self.is_neox else torch.stack((o1, o2), -1).flatten(-2)
        return torch.cat((rot, rest), dim=-1).flatten(-2)

    def forward(self, positions, q, k):
        tokens = q.shape[0]
        q = self.norm(q.view(tokens, -1, self.head_dim), self.q_weight, EPS).view(tokens, -1)
        k = self.norm(k.view(tokens, -1, self.head_dim), self.k_weight, EPS).view(tokens, -1)
        if self.gather == "index_select":
            cos_sin = self.cos_sin_cache.index_select(0, positions)
        else:
            cos_sin = self.cos_sin_cache[positions]
        cos, sin = cos_sin.chunk(2, dim=-1)
        return self.rope(q, cos, sin), self.rope(k, cos, sin)


def vllm_inputs(tokens=9, heads=(4, 2), head_dim=64, dtype=torch.float32, device="cpu", seed=2):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(tokens, h * head_dim, generator=gen).to(dtype) for h in heads)
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    return [t.to(device) for t in (positions, q, k)]


def _compile_and_run(module, inputs, **compile_kwargs):
    with torch.no_grad():
        want = module(*inputs)
        got = torch.compile(module, fullgraph=True, **compile_kwargs)(*inputs)
    return got, want


def _one_site(report):
    assert not report.rejected, str(report)
    assert len(report.fused) == 1, str(report)
    return report.fused[0]


# ----------------------------------------------------------------------------- CPU: what fuses


HF_CASES = {  # id: (norm, is_neox, rotary_dim, cos batch)
    "plain-neox-full": ("plain", True, 64, None),
    "functional-gptj-partial": ("functional", False, 32, None),
    "gemma-neox-partial-cos-batch-1": ("gemma", True, 48, 1),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_style_fuses_one_site_and_matches_eager(fusion, case):
    norm, is_neox, rotary, cos_batch = HF_CASES[case]
    module = HFAttentionPrologue(norm, is_neox, rotary)
    got, want = _compile_and_run(module, hf_inputs(rotary_dim=rotary, is_neox=is_neox,
                                                   cos_batch=cos_batch))
    _assert_close(got, want)
    site = _one_site(cuqk_torch.fusion_report())
    assert (site.num_q_heads, site.num_kv_heads, site.head_dim) == (4, 2, 64)
    assert (site.rotary_dim, site.is_neox, site.norm) == (rotary, is_neox, module.kind)
    assert site.eps == pytest.approx(EPS)  # F.rms_norm rounds eps to float32
    assert "per-token cos/sin" in site.cos_sin and "transformers" in site.cos_sin
    assert fusion == [(2, 7, 4, 64)]  # the fused op ran, once, on q [B, S, Hq, D]


ROPE_FIRST_CASES = {  # id: (norm, is_neox, rotary_dim)
    "weightless-neox-full": ("weightless", True, 64),
    "plain-gptj-partial": ("plain", False, 32),
}


@pytest.mark.parametrize("case", ROPE_FIRST_CASES)
def test_rope_then_norm_fuses_with_rope_first(fusion, case):
    norm, is_neox, rotary = ROPE_FIRST_CASES[case]
    module = HFAttentionPrologue(norm, is_neox, rotary, rope_first=True)
    got, want = _compile_and_run(module, hf_inputs(rotary_dim=rotary, is_neox=is_neox))
    _assert_close(got, want)
    site = _one_site(cuqk_torch.fusion_report())
    assert site.rope_first and "RoPE then norm" in str(site)
    assert (site.rotary_dim, site.is_neox, site.norm) == (rotary, is_neox, module.kind)
    assert fusion == [(2, 7, 4, 64)]


VLLM_CASES = {  # id: (norm, is_neox, rotary_dim, gather)
    "functional-neox-partial-index-select": ("functional", True, 32, "index_select"),
    "plain-gptj-full-index": ("plain", False, 64, "index"),
}


@pytest.mark.parametrize("case", VLLM_CASES)
def test_vllm_style_fuses_with_positions_and_the_cache(fusion, case):
    norm, is_neox, rotary, gather = VLLM_CASES[case]
    module = VllmAttentionPrologue(norm, is_neox, rotary, gather=gather)
    got, want = _compile_and_run(module, vllm_inputs())
    _assert_close(got, want)
    site = _one_site(cuqk_torch.fusion_report())
    assert (site.rotary_dim, site.is_neox, site.tokens) == (rotary, is_neox, ("9",))
    assert "gathered by" in site.cos_sin
    assert fusion == [(9, 4, 64)]


def test_bfloat16_casts_are_followed(fusion):
    module = HFAttentionPrologue("plain", dtype=torch.bfloat16)
    inputs = hf_inputs(dtype=torch.bfloat16)
    got, _ = _compile_and_run(module, inputs)
    _one_site(cuqk_torch.fusion_report())
    # The fused op rounds once; eager bfloat16 rounds after every op, so compare both with
    # float32 on the same (bfloat16-valued) weights and inputs.
    exact = HFAttentionPrologue("plain", dtype=torch.bfloat16).float()(*[t.float() for t in inputs])
    _assert_close(got, exact, "bfloat16")


def test_dynamic_shapes(fusion):
    module = HFAttentionPrologue("plain")
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        for batch, seq in ((2, 7), (3, 5)):
            inputs = hf_inputs(batch=batch, seq=seq, cos_batch=1)
            for t in inputs:
                torch._dynamo.mark_dynamic(t, 1)
            for t in inputs[:2]:  # cos/sin keep batch 1
                torch._dynamo.mark_dynamic(t, 0)
            _assert_close(compiled(*inputs), module(*inputs))
    _one_site(cuqk_torch.fusion_report())  # one graph for both shapes
    assert fusion == [(2, 7, 4, 64), (3, 5, 4, 64)]


# ----------------------------------------------------------------------------- CPU: what does not


def _only_rejected(reason_part):
    report = cuqk_torch.fusion_report()
    assert not report.fused, str(report)
    assert report.rejected, str(report)
    assert all(reason_part in r.reason for r in report.rejected), str(report)
    return report


def _compile_expecting_rejection(fn, reason_part):
    """Compile and run ``fn`` on the HF-style inputs; the pass must reject every candidate."""
    with torch.no_grad():
        torch.compile(fn, fullgraph=True)(*hf_inputs())
    _only_rejected(reason_part)


def test_float64_is_rejected_with_the_reason(fusion):
    module = HFAttentionPrologue(dtype=torch.float64)
    got, want = _compile_and_run(module, hf_inputs(dtype=torch.float64))
    _assert_close(got, want)
    assert len(_only_rejected("dtype float64 unsupported").rejected) == 2
    assert not fusion


@pytest.mark.parametrize("static_head_dim", [False, True])
def test_dynamic_true_is_rejected_with_the_reason(fusion, static_head_dim):
    # dynamic=True makes the float eps a graph input, whose value the pass cannot read, and
    # the projections' widths symbolic, so head_dim too.
    module = HFAttentionPrologue()
    inputs = hf_inputs()
    if static_head_dim:
        for t in inputs:
            torch._dynamo.mark_static(t, 2)
    with torch.no_grad():
        torch.compile(module, fullgraph=True, dynamic=True)(*inputs)
    _only_rejected("eps is a graph input" if static_head_dim else "head_dim")


def test_head_dim_not_supported_is_rejected(fusion):
    module = HFAttentionPrologue(head_dim=24, rotary_dim=24)
    _compile_and_run(module, hf_inputs(head_dim=24, rotary_dim=24))
    _only_rejected("head_dim 24 unsupported")


def test_norm_over_all_heads_is_rejected(fusion):
    # OLMo 2: q_norm over the whole projection, then split into heads for RoPE.
    module = HFAttentionPrologue()
    weights = [torch.nn.Parameter(w.repeat(h), requires_grad=False)
               for w, h in ((module.q_weight, 4), (module.k_weight, 2))]

    def olmo2(q, k, cos, sin):
        q = norm_plain(q, weights[0], EPS).view(*q.shape[:-1], -1, 64).transpose(1, 2)
        k = norm_plain(k, weights[1], EPS).view(*k.shape[:-1], -1, 64).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return module.rope(q, cos, sin), module.rope(k, cos, sin)

    _compile_expecting_rejection(olmo2, "not a per-head norm")


def test_lone_site_is_rejected(fusion):
    module = HFAttentionPrologue()

    def q_only(q, k, cos, sin):
        q = norm_plain(q.view(*q.shape[:-1], -1, 64), module.q_weight, EPS).transpose(1, 2)
        return module.rope(q, cos.unsqueeze(1), sin.unsqueeze(1)), k

    _compile_expecting_rejection(q_only, "no second norm + RoPE")


def test_cos_varying_across_heads_is_rejected(fusion):
    module = HFAttentionPrologue()

    def per_head_cos(q, k, cos, sin):
        q, k = (norm_plain(t.view(*t.shape[:-1], -1, 64), w, EPS).transpose(1, 2)
                for t, w in ((q, module.q_weight), (k, module.k_weight)))
        # A cos/sin of shape [B, H, S, D]: not one rotation per token.
        cos_q, sin_q = cos[:, None].repeat(1, 4, 1, 1), sin[:, None].repeat(1, 4, 1, 1)
        return module.rope(q, cos_q, sin_q), module.rope(k, cos_q[:, :2], sin_q[:, :2])

    _compile_expecting_rejection(per_head_cos, "vary along every leading dim")


def test_training_graph_is_rejected(fusion):
    # With gradients the forward graph saves the norm's intermediates for the backward: fusing
    # would remove nothing (and cuqk has no backward), so the pass says so and leaves it.
    module = HFAttentionPrologue()
    module.q_weight.requires_grad_(True)
    module.k_weight.requires_grad_(True)
    inputs = hf_inputs()
    got = torch.compile(module, fullgraph=True)(*inputs)
    sum(t.sum() for t in got).backward()
    _only_rejected("saved for backward")
    assert module.q_weight.grad is not None


def test_disable_stops_fusing(fusion):
    cuqk_torch.enable_fusion()  # twice on, once off: off
    cuqk_torch.disable_fusion()
    assert not isinstance(torch._inductor.config.post_grad_custom_pre_pass, _fusion.FusionPass)
    module = HFAttentionPrologue()
    _compile_and_run(module, hf_inputs())
    report = cuqk_torch.fusion_report()
    assert not report.fused and not report.rejected
    assert not fusion


def test_fused_rms_norm_op_is_matched():
    # Where the device has a fused RMSNorm kernel, F.rms_norm stays one aten._fused_rms_norm
    # node in the graph; make_fx(pre_dispatch=True) keeps it on the CPU too.
    from torch.fx.experimental.proxy_tensor import make_fx

    module = HFAttentionPrologue(rotary_dim=32)

    def prologue(q, k, cos, sin, q_weight, k_weight):
        q, k = (torch.ops.aten._fused_rms_norm.default(t.view(*t.shape[:-1], -1, 64), [64], w,
                                                       EPS)[0].transpose(1, 2)
                for t, w in ((q, q_weight), (k, k_weight)))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return module.rope(q, cos, sin), module.rope(k, cos, sin)

    inputs = [*hf_inputs(rotary_dim=32), module.q_weight.detach(), module.k_weight.detach()]
    graph_module = make_fx(prologue, pre_dispatch=True, tracing_mode="fake")(*inputs)
    cuqk_torch.enable_fusion()
    try:
        assert _fusion.fuse(graph_module.graph) == 1
    finally:
        cuqk_torch.disable_fusion()
    graph_module.recompile()
    targets = {n.target for n in graph_module.graph.nodes}
    assert torch.ops.cuqk.qk_norm_rope.default in targets
    assert torch.ops.aten._fused_rms_norm.default not in targets
    _assert_close(graph_module(*inputs), prologue(*inputs))
    assert "_fused_rms_norm" in str(cuqk_torch.fusion_report())


def test_a_pass_the_user_installed_still_runs(fusion):
    seen = []

    class UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            seen.append(len(graph.nodes))

        def uuid(self):
            return "user pass"

    cuqk_torch.disable_fusion()
    with torch._inductor.config.patch(post_grad_custom_pre_pass=UserPass()):
        cuqk_torch.enable_fusion()
        _compile_and_run(HFAttentionPrologue(), hf_inputs())
        cuqk_torch.disable_fusion()
        assert isinstance(torch._inductor.config.post_grad_custom_pre_pass, UserPass)
    assert len(seen) == 1
    _one_site(cuqk_torch.fusion_report())


# ----------------------------------------------------------------------------- transformers


def _qwen3_config(**overrides):
    transformers = pytest.importorskip("transformers")
    config = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
              "vocab_size": 128, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
              "attn_implementation": "sdpa", **overrides}
    return transformers, transformers.Qwen3Config(**config)


def _randomize_norms(model):
    # Fresh norms have unit weights; random ones make a mix-up of q and k weights show.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))


def qwen3_layer(dtype=torch.float32, device="cpu"):
    _, config = _qwen3_config()
    from transformers.models.qwen3 import modeling_qwen3

    torch.manual_seed(0)  # the same weights for every dtype
    layer = modeling_qwen3.Qwen3DecoderLayer(config, layer_idx=0)
    _randomize_norms(layer)
    rotary = modeling_qwen3.Qwen3RotaryEmbedding(config)
    return layer.to(device, dtype).eval(), rotary.to(device)


def qwen3_layer_inputs(rotary, batch, seq, dtype, device, seed=4):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, 128, generator=gen).to(device, dtype)
    positions = torch.arange(seq, device=device)[None] + 3
    return hidden, rotary(hidden, positions)


def test_qwen3_decoder_layer_fuses_one_site(fusion):
    layer, rotary = qwen3_layer()
    hidden, (cos, sin) = qwen3_layer_inputs(rotary, 2, 11, torch.float32, "cpu")

    def run(hidden, cos, sin):
        return layer(hidden, attention_mask=None, position_embeddings=(cos, sin))

    got, want = _compile_and_run(run, (hidden, cos, sin))
    _assert_close([got], [want])
    report = cuqk_torch.fusion_report()
    site = _one_site(report)
    assert "q_norm" in site.q and "k_norm" in site.k
    assert len(report.ignored) == 2  # input_layernorm, post_attention_layernorm
    assert "1 fused, 0 rejected" in str(report)
    assert fusion == [(2, 11, 4, 64)]


def _shared(config):
    """The Qwen3 test config's sizes, for another family's config."""
    return {k: getattr(config, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
        "rms_norm_eps")}


def _gemma3_model(transformers, config):
    # Gemma 3 normalises q and k after the transpose to [B, H, S, D], with (1 + w); one
    # sliding layer (local rotary table) and one global.
    text = transformers.Gemma3TextConfig(
        **_shared(config),
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, attn_implementation="sdpa")
    return transformers.Gemma3ForCausalLM(text), "gemma"


def _qwen3_5_model(transformers, config):
    # Qwen3.5 gated attention: q is the first half of each [q | gate] head of q_proj (a
    # strided view), (1 + w) norms, partial rotary. Full-attention layers only.
    text = transformers.Qwen3_5TextConfig(
        **_shared(config),
        layer_types=["full_attention"] * 2, attn_implementation="sdpa")
    return transformers.Qwen3_5ForCausalLM(text), "gemma"


def _llama4_model(transformers, config):
    # Llama 4: complex (GPT-J) RoPE, then the weight-free L2 norm; layer 1 is a NoPE layer
    # (neither), so one site in two layers.
    text = transformers.Llama4TextConfig(
        **_shared(config),
        intermediate_size_mlp=config.intermediate_size, use_qk_norm=True, no_rope_layers=[1, 0],
        moe_layers=[], attn_implementation="sdpa")
    return transformers.Llama4ForCausalLM(text), "rms"


def _qwen3_moe_model(transformers, config):
    moe = transformers.Qwen3MoeConfig(
        **_shared(config),
        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        attn_implementation="sdpa")
    return transformers.Qwen3MoeForCausalLM(moe), "rms"


def _qwen3_next_model(transformers, config):
    # Gated attention as Qwen3.5's, MoE MLPs; full-attention layers only.
    nxt = transformers.Qwen3NextConfig(
        **_shared(config),
        layer_types=["full_attention"] * 2, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, shared_expert_intermediate_size=32, attn_implementation="sdpa")
    return transformers.Qwen3NextForCausalLM(nxt), "gemma"


def _qwen3_5_moe_model(transformers, config):
    moe = transformers.Qwen3_5MoeTextConfig(
        **_shared(config), layer_types=["full_attention"] * 2, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
        attn_implementation="sdpa")
    return transformers.Qwen3_5MoeForCausalLM(moe), "gemma"


FAMILIES = {  # family: (model builder, norm modules fused, whether RoPE comes first)
    "qwen3": (lambda t, c: (t.Qwen3ForCausalLM(c), "rms"), ("q_norm", "q_norm"), False),
    "qwen3_moe": (_qwen3_moe_model, ("q_norm", "q_norm"), False),
    "qwen3_next": (_qwen3_next_model, ("q_norm", "q_norm"), False),
    "gemma3": (_gemma3_model, ("q_norm", "q_norm"), False),
    "qwen3_5": (_qwen3_5_model, ("q_norm", "q_norm"), False),
    "qwen3_5_moe": (_qwen3_5_moe_model, ("q_norm", "q_norm"), False),
    "llama4": (_llama4_model, ("qk_norm",), True),
}


def _family_model(family, dtype=torch.float32, device="cpu"):
    transformers, config = _qwen3_config()
    build, names, rope_first = FAMILIES[family]
    torch.manual_seed(0)
    model, norm = build(transformers, config)
    _randomize_norms(model)
    sites = [f"model.layers.{i}.self_attn.{name}" for i, name in enumerate(names)]
    return model.to(device, dtype).eval(), norm, sites, rope_first


def _check_family_report(report, norm, sites, rope_first):
    assert not report.rejected, str(report)
    assert sorted(s.q.split(" ")[0] for s in report.fused) == sites, str(report)
    assert all(s.norm == norm and (s.num_q_heads, s.num_kv_heads) == (4, 2)
               and s.rope_first == rope_first for s in report.fused), str(report)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_model_fuses_one_site_per_layer(fusion, family):
    model, norm, sites, rope_first = _family_model(family)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, fullgraph=True)(ids).logits
    _assert_close([got], [want])
    _check_family_report(cuqk_torch.fusion_report(), norm, sites, rope_first)
    assert len(fusion) == len(sites)


# ----------------------------------------------------------------------------- GPU


@requires_gpu
def test_gpu_qwen3_decoder_layer_bfloat16(fusion):
    layer, rotary = qwen3_layer(torch.bfloat16, "cuda")
    hidden, (cos, sin) = qwen3_layer_inputs(rotary, 2, 37, torch.bfloat16, "cuda")
    exact_layer, _ = qwen3_layer(torch.float32, "cuda")

    def run(layer, hidden, cos, sin):
        return layer(hidden, attention_mask=None, position_embeddings=(cos, sin))

    with torch.no_grad():
        exact = run(exact_layer, hidden.float(), cos.float(), sin.float())
        fused = torch.compile(run, fullgraph=True)(layer, hidden, cos, sin)
        cuqk_torch.disable_fusion()
        torch._dynamo.reset()
        unfused = torch.compile(run, fullgraph=True)(layer, hidden, cos, sin)
    assert fusion == [(2, 37, 4, 64)]
    # The fused prologue rounds once where the unfused one rounds after every op: it must be
    # no further from the float32 layer than the unfused bfloat16 layer is (with some slack).
    err_fused, err_unfused = _rel_err(fused, exact), _rel_err(unfused, exact)
    assert err_fused <= 1.25 * err_unfused + 1e-3, (err_fused, err_unfused)


@requires_gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_hf_model_bfloat16(fusion, family):
    # Each family compiled with the pass on the GPU in bfloat16: the fused sites run the
    # kernels; logits are as close to the float32 model as the unfused bfloat16 model's are.
    model, norm, sites, rope_first = _family_model(family, torch.bfloat16, "cuda")
    exact, *_ = _family_model(family, torch.float32, "cuda")
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        want = exact(ids).logits
        unfused = model(ids).logits
        got = torch.compile(model, fullgraph=True)(ids).logits
    _check_family_report(cuqk_torch.fusion_report(), norm, sites, rope_first)
    assert len(fusion) == len(sites)
    err_fused, err_unfused = _rel_err(got, want), _rel_err(unfused, want)
    assert err_fused <= 1.25 * err_unfused + 1e-3, (err_fused, err_unfused)


@requires_gpu
@pytest.mark.parametrize("style", ["hf", "vllm", "rope-first"])
def test_gpu_synthetic_bfloat16(fusion, style):
    if style in ("hf", "rope-first"):
        first = style == "rope-first"
        module, exact_module = (
            HFAttentionPrologue("weightless" if first else "functional", dtype=d,
                                rope_first=first).cuda() for d in (torch.bfloat16, torch.float32))
        inputs = hf_inputs(dtype=torch.bfloat16, device="cuda", seq=33)
    else:
        module, exact_module = (VllmAttentionPrologue("plain", False, 32, dtype=d).cuda()
                                for d in (torch.bfloat16, torch.float32))
        inputs = vllm_inputs(tokens=65, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        exact = exact_module(*[t.float() if t.is_floating_point() else t for t in inputs])
        got = torch.compile(module, fullgraph=True)(*inputs)
    _one_site(cuqk_torch.fusion_report())
    assert len(fusion) == 1
    for g, e in zip(got, exact):
        assert _rel_err(g, e) <= 4 * TOLERANCES["bfloat16"]
