"""cuqk.integrations.transformers on tiny, randomly initialised Qwen3, Qwen3-MoE and Gemma 3 models.

On CPU cuqk runs its float64 reference with one rounding to float32, so patched and unpatched
float32 models agree to float32 rounding; the CUDA test compares the kernel in bfloat16.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cuqk.integrations import transformers as hf

COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 128,
          "max_position_embeddings": 256}


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON))


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(**COMMON, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2)
    return transformers.Qwen3MoeForCausalLM(config)


def _gemma3():
    # A sliding window shorter than the test sequences, and one local and one global layer,
    # so that the window and both rotary tables are exercised.
    config = transformers.Gemma3TextConfig(
        **COMMON, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
    )
    return transformers.Gemma3ForCausalLM(config)


FAMILIES = {"qwen3": _qwen3, "qwen3_moe": _qwen3_moe, "gemma3": _gemma3}


def _model(family, dtype=torch.float32, device="cpu", attn_implementation="eager"):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    # Norm weights start at 1 (Qwen3) or 0 (Gemma3); random ones check that cuqk applies them.
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


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_float32(family, attn_implementation, monkeypatch):
    model = _model(family, attn_implementation=attn_implementation)
    input_ids, attention_mask = _inputs()
    # Batch 2 with left padding, and batch 1 without a mask.
    cases = [(input_ids, attention_mask), (input_ids[:1], None)]
    expected = [_logits(model, *case) for case in cases]
    report = hf.apply(model)
    calls = []
    op = hf.cuqk_torch.qk_norm_rope

    def counted(*args, **kwargs):
        calls.append(1)
        return op(*args, **kwargs)

    monkeypatch.setattr(hf.cuqk_torch, "qk_norm_rope", counted)
    for case, want in zip(cases, expected):
        torch.testing.assert_close(_logits(model, *case), want, rtol=1e-4, atol=1e-4)
    # Each layer's prologue went through cuqk, once per forward.
    assert len(calls) == len(cases) * COMMON["num_hidden_layers"]
    assert report.counts == {family: COMMON["num_hidden_layers"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_identical(family):
    model = _model(family)
    input_ids, attention_mask = _inputs()
    def generate():
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5,
                              do_sample=False, pad_token_id=0)

    expected = generate()
    hf.apply(model)
    assert torch.equal(generate(), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_report_apply_twice_and_restore(family):
    model = _model(family)
    report = hf.apply(model)
    layers = COMMON["num_hidden_layers"]
    assert report.modules == {
        family: tuple(f"model.layers.{i}.self_attn" for i in range(layers))
    }
    assert report.total == layers
    patched = model.model.layers[0].self_attn.forward
    assert hf.apply(model) == report
    assert model.model.layers[0].self_attn.forward is patched
    assert hf.restore(model) == layers
    assert "forward" not in vars(model.model.layers[0].self_attn)
    assert hf.restore(model) == 0


def test_unknown_model_raises_value_error():
    config = transformers.LlamaConfig(**COMMON)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*qwen3, qwen3_moe, gemma3"):
        hf.apply(transformers.LlamaForCausalLM(config))


def test_llama4_raises_not_implemented():
    if not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip("this transformers has no Llama 4")
    config = transformers.Llama4TextConfig(
        **COMMON, intermediate_size_mlp=128, num_local_experts=2, num_experts_per_tok=1,
        use_qk_norm=True,
    )
    with pytest.raises(NotImplementedError, match="after RoPE"):
        hf.apply(transformers.Llama4ForCausalLM(config))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_bfloat16_cuda(family):
    model = _model(family, dtype=torch.bfloat16, device="cuda")
    input_ids, attention_mask = _inputs("cuda")
    expected = _logits(model, input_ids, attention_mask)
    hf.apply(model)
    got = _logits(model, input_ids, attention_mask)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_instance_forward_is_not_overwritten():
    model = _model("qwen3")
    attn = model.model.layers[1].self_attn
    attn.forward = attn.forward  # stands in for a wrapper such as an accelerate hook
    with pytest.raises(ValueError, match="model.layers.1.self_attn"):
        hf.apply(model)
    # Nothing was patched, not even the layer before the refused one.
    assert "forward" not in vars(model.model.layers[0].self_attn)


def test_patched_forward_compiles_fullgraph():
    model = _model("qwen3", attn_implementation="sdpa")
    input_ids, attention_mask = _inputs()
    expected = _logits(model, input_ids, attention_mask)
    hf.apply(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(_logits(compiled, input_ids, attention_mask), expected,
                               rtol=1e-4, atol=1e-4)
