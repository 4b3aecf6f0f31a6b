"""cuqk.integrations.transformers on tiny, randomly initialised models of every supported family.

On CPU cuqk runs its float64 reference with one rounding to float32, so patched and unpatched
float32 models agree to float32 rounding; the CUDA tests run the kernels (float32 generation,
bfloat16 logits).
"""

from functools import partial

import pytest
from conftest import requires_gpu

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cuqk.integrations import transformers as hf  # noqa: E402

# rms_norm_eps is far from every default so that a prologue run with the wrong eps shows.
COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 128,
          "max_position_embeddings": 256, "rms_norm_eps": 1e-3}
MOE = {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}
# Qwen3-Next / Qwen3.5: gated attention layers around a linear-attention one (never patched).
HYBRID = {**COMMON, "num_hidden_layers": 3,
          "layer_types": ["full_attention", "linear_attention", "full_attention"],
          "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
          "linear_num_value_heads": 4}


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON))


def _qwen3_moe():
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**COMMON, **MOE))


def _gemma3():
    # A sliding window shorter than the test sequences, and one local and one global layer,
    # so that the window and both rotary tables are exercised.
    config = transformers.Gemma3TextConfig(
        **COMMON, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
    )
    return transformers.Gemma3ForCausalLM(config)


def _llama4(use_qk_norm=True):
    # Layer 1 is NoPE (left unpatched); chunked attention and the NoPE layer's temperature
    # tuning are set to act within the test sequences. YaRN scales cos and sin (its attention
    # factor), without which the weight-free norm would commute with the rotation and the
    # order of RoPE and norm would not show.
    config = transformers.Llama4TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, intermediate_size_mlp=128, num_local_experts=2,
        num_experts_per_tok=1, use_qk_norm=use_qk_norm, no_rope_layers=[1, 0, 1],
        attention_chunk_size=4, floor_scale=2, attn_scale=0.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64},
    )
    return transformers.Llama4ForCausalLM(config)


def _qwen3_next():
    config = transformers.Qwen3NextConfig(**HYBRID, **MOE, shared_expert_intermediate_size=32)
    return transformers.Qwen3NextForCausalLM(config)


def _qwen3_5():
    return transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**HYBRID))


def _qwen3_5_moe():
    config = transformers.Qwen3_5MoeTextConfig(**HYBRID, **MOE, shared_expert_intermediate_size=32)
    return transformers.Qwen3_5MoeForCausalLM(config)


NOPE = {"model.layers.1.self_attn": "Llama 4 NoPE layer: no RoPE and no QK norm, nothing to fuse"}
# test id: (model builder, family, indices of the patched layers, skipped modules)
CASES = {
    "qwen3": (_qwen3, "qwen3", (0, 1), {}),
    "qwen3_moe": (_qwen3_moe, "qwen3_moe", (0, 1), {}),
    "gemma3": (_gemma3, "gemma3", (0, 1), {}),
    "llama4": (_llama4, "llama4", (0, 2), NOPE),
    "llama4_no_qk_norm": (partial(_llama4, use_qk_norm=False), "llama4", (0, 2), NOPE),
    "qwen3_next": (_qwen3_next, "qwen3_next", (0, 2), {}),
    "qwen3_5": (_qwen3_5, "qwen3_5", (0, 2), {}),
    "qwen3_5_moe": (_qwen3_5_moe, "qwen3_5_moe", (0, 2), {}),
}


def _model(case, dtype=torch.float32, device="cpu", attn_implementation="eager"):
    torch.manual_seed(0)
    model = CASES[case][0]()
    # Norm weights start at 1 (Qwen3) or 0 (Gemma 3, Qwen3-Next, Qwen3.5); random ones check
    # that cuqk applies them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.normal_(0.0, 0.5)
    model.set_attn_implementation(attn_implementation)
    return model.to(device=device, dtype=dtype).eval()


def _inputs(device="cpu"):
    torch.manual_seed(1)
    input_ids = torch.randint(0, COMMON["vocab_size"], (2, 10), device=device)
    # The second sequence is left-padded by 3 tokens.
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return input_ids, attention_mask


def _logits(model, input_ids, attention_mask):
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def _patched_names(case):
    return tuple(f"model.layers.{i}.self_attn" for i in CASES[case][2])


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_logits_match_float32(case, attn_implementation, monkeypatch):
    model = _model(case, attn_implementation=attn_implementation)
    input_ids, attention_mask = _inputs()
    # Batch 2 with left padding (one RoPE table shared by the batch), and batch 1 without a
    # mask.
    cases = [(input_ids, attention_mask), (input_ids[:1], None)]
    expected = [_logits(model, *c) for c in cases]
    report = hf.apply(model)
    calls = []
    for name in ("qk_norm_rope", "qk_norm_rope_gate"):
        op = getattr(hf.cuqk_torch, name)

        def counted(*args, op=op, **kwargs):
            calls.append(1)
            return op(*args, **kwargs)

        monkeypatch.setattr(hf.cuqk_torch, name, counted)
    for c, want in zip(cases, expected):
        torch.testing.assert_close(_logits(model, *c), want, rtol=1e-4, atol=1e-4)
    # Each patched layer's prologue went through cuqk, once per forward.
    patched = len(CASES[case][2])
    assert len(calls) == len(cases) * patched
    assert report.counts == {CASES[case][1]: patched}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_gpu)])
@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_identical(case, device):
    model = _model(case, device=device)
    input_ids, attention_mask = _inputs(device)

    def generate():
        # Generation passes per-sequence position ids: one RoPE table row per token.
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5,
                              do_sample=False, pad_token_id=0)

    expected = generate()
    hf.apply(model)
    assert torch.equal(generate(), expected)


@pytest.mark.parametrize("case", CASES)
def test_report_apply_twice_and_restore(case):
    model = _model(case)
    report = hf.apply(model)
    _, family, layers, skipped = CASES[case]
    assert report.modules == {family: _patched_names(case)}
    assert report.skipped == skipped
    assert report.total == len(layers)
    first = model.model.layers[layers[0]].self_attn
    patched = first.forward
    assert hf.apply(model) == report
    assert first.forward is patched
    for name in skipped:
        assert "forward" not in vars(model.get_submodule(name))
    assert hf.restore(model) == len(layers)
    assert "forward" not in vars(first)
    assert hf.restore(model) == 0


def test_unknown_model_raises_value_error():
    config = transformers.LlamaConfig(**COMMON)
    families = "qwen3, qwen3_moe, gemma3, llama4, qwen3_next, qwen3_5, qwen3_5_moe"
    with pytest.raises(ValueError, match=rf"LlamaForCausalLM.*{families}"):
        hf.apply(transformers.LlamaForCausalLM(config))


def test_different_q_and_k_eps_is_skipped_with_reason():
    model = _model("qwen3")
    model.model.layers[1].self_attn.k_norm.variance_epsilon = 1e-5
    report = hf.apply(model)
    assert report.modules == {"qwen3": ("model.layers.0.self_attn",)}
    assert list(report.skipped) == ["model.layers.1.self_attn"]
    assert "k_norm eps 1e-05" in report.skipped["model.layers.1.self_attn"]
    assert "forward" not in vars(model.model.layers[1].self_attn)


def test_instance_forward_is_not_overwritten():
    model = _model("qwen3")
    attn = model.model.layers[1].self_attn
    attn.forward = attn.forward  # stands in for a wrapper such as an accelerate hook
    with pytest.raises(ValueError, match="model.layers.1.self_attn"):
        hf.apply(model)
    # Nothing was patched, not even the layer before the refused one.
    assert "forward" not in vars(model.model.layers[0].self_attn)


@pytest.mark.parametrize("case", ["qwen3", "llama4", "qwen3_5"])
def test_patched_forward_compiles_fullgraph(case):
    model = _model(case, attn_implementation="sdpa")
    input_ids, attention_mask = _inputs()
    expected = _logits(model, input_ids, attention_mask)
    hf.apply(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(_logits(compiled, input_ids, attention_mask), expected,
                               rtol=1e-4, atol=1e-4)


@requires_gpu
@pytest.mark.parametrize("case", CASES)
def test_logits_match_bfloat16_cuda(case):
    model = _model(case, dtype=torch.bfloat16, device="cuda")
    input_ids, attention_mask = _inputs("cuda")
    expected = _logits(model, input_ids, attention_mask)
    hf.apply(model)
    got = _logits(model, input_ids, attention_mask)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
