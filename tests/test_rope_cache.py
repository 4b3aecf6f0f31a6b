"""cuqk.rope_cache: the cos/sin cache against transformers' own RoPE initialisation (CPU only),
plus shape, layout and bad-input checks that need no transformers."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from conftest import cos_sin_cache64

from cuqk.rope_cache import rope_cos_sin_cache, rope_inv_freq

# Rows compared at the 1e-6 tolerance. transformers stores inv_freq in float32, so its phase at
# position p is off by up to p * inv_freq * 2**-24; past ~16 rows that alone exceeds 1e-6.
SHORT = 16
# Longer range, held to what the float32 rounding of transformers' inv_freq explains.
LONG = 4096

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# (id, head_dim, rotary_dim, rope_theta, scaling, seq_len)
CASES = [
    ("default", 128, 128, 10000.0, None, None),
    ("default-qwen-theta", 128, 128, 1e6, {"rope_type": "default"}, None),
    ("default-partial", 64, 32, 10000.0, None, None),
    ("linear-2", 128, 128, 10000.0, {"rope_type": "linear", "factor": 2.0}, None),
    ("linear-old-type-key", 64, 64, 10000.0, {"type": "linear", "factor": 4.0}, None),
    ("linear-partial", 128, 32, 10000.0, {"rope_type": "linear", "factor": 3.0}, None),
    ("dynamic-below", 128, 128, 10000.0,
     {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2048}, 1024),
    ("dynamic-at", 128, 128, 10000.0,
     {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2048}, 2048),
    ("dynamic-above", 128, 128, 10000.0,
     {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2048}, 8192),
    ("dynamic-above-partial", 64, 32, 500000.0,
     {"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 4096}, 20000),
    ("yarn-qwen2.5", 128, 128, 1e6,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, None),
    ("yarn-betas", 128, 128, 10000.0,
     {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
      "beta_fast": 16, "beta_slow": 2}, None),
    ("yarn-deepseek-v3", 192, 64, 10000.0,
     {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, None),
    ("yarn-mscale-ratio", 128, 128, 10000.0,
     {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
      "mscale": 0.707, "mscale_all_dim": 1.0}, None),
    ("yarn-mscale-only", 128, 128, 10000.0,
     {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
      "mscale": 0.707}, None),
    ("yarn-attention-factor", 64, 64, 10000.0,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
      "attention_factor": 1.25}, None),
    ("yarn-partial", 128, 64, 10000.0,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, None),
    ("yarn-gpt-oss-no-truncate", 64, 64, 150000.0,
     {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}, None),
    ("llama3.1", 128, 128, 500000.0, LLAMA31, None),
    ("llama3.2", 64, 64, 500000.0, {**LLAMA31, "factor": 32.0}, None),
    ("llama3-partial", 128, 64, 500000.0, LLAMA31, None),
    ("llama3-bands", 128, 128, 10000.0,
     {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
      "high_freq_factor": 8.0, "original_max_position_embeddings": 1024}, None),
]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    return transformers


def _hf_inv_freq(hf, head_dim, rotary_dim, theta, scaling, seq_len):
    """transformers' (inv_freq as float64, attention_factor) for one case."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(scaling) if scaling else {"rope_type": "default"}
    rope_type = params.get("rope_type", params.get("type"))
    original = params.get("original_max_position_embeddings", 4096)
    # dynamic reads its trained length from config.max_position_embeddings; yarn and llama3 read
    # the dict, and a config length of original * factor keeps their consistency checks quiet.
    max_pos = original if rope_type == "dynamic" else int(original * params.get("factor", 1))
    # rope_theta / partial_rotary_factor / rope_scaling kwargs are read by transformers 4.x and
    # folded into config.rope_parameters by 5.x, so one call builds the config for both.
    config = hf.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                            max_position_embeddings=max_pos, rope_theta=theta,
                            partial_rotary_factor=rotary_dim / head_dim, rope_scaling=params)
    init = ROPE_INIT_FUNCTIONS.get(rope_type)
    if init is None:  # transformers 5 keeps "default" on the model classes
        # GPT-NeoX's default honours partial_rotary_factor; Llama's ignores it.
        from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

        init = GPTNeoXRotaryEmbedding.compute_default_rope_parameters
    inv_freq, attention_factor = init(config, None, seq_len=seq_len)
    inv_freq = inv_freq.double().numpy()
    assert inv_freq.shape == (rotary_dim // 2,)
    return inv_freq, float(attention_factor)


def _reference_cache(inv_freq, attention_factor, rows):
    angles = np.arange(rows, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1) * attention_factor


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers(hf, case):
    _, head_dim, rotary_dim, theta, scaling, seq_len = case
    if scaling and scaling.get("truncate") is False:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if "truncate" not in inspect.getsource(ROPE_INIT_FUNCTIONS["yarn"]):
            pytest.skip("this transformers has no yarn 'truncate'")
    their_freq, their_factor = _hf_inv_freq(hf, head_dim, rotary_dim, theta, scaling, seq_len)

    our_freq, our_factor = rope_inv_freq(rotary_dim, base=theta, scaling=scaling,
                                         seq_len=seq_len)
    # Theirs is float32: allow a few ulps of its pow/divide, nothing more.
    np.testing.assert_allclose(our_freq, their_freq, rtol=1e-6, atol=0)
    assert our_factor == pytest.approx(their_factor, rel=1e-12, abs=0)

    ours = rope_cos_sin_cache(SHORT, rotary_dim, base=theta, scaling=scaling, seq_len=seq_len)
    assert ours.shape == (SHORT, rotary_dim) and ours.dtype == np.float32
    theirs = _reference_cache(their_freq, their_factor, SHORT)
    assert np.allclose(ours, theirs, rtol=1e-6, atol=1e-6)

    # Every dynamic case names its seq_len, so the cache length never stands in for it.
    ours = rope_cos_sin_cache(LONG, rotary_dim, base=theta, scaling=scaling, seq_len=seq_len)
    theirs = _reference_cache(their_freq, their_factor, LONG)
    positions = np.arange(LONG, dtype=np.float64)[:, None]
    # 2 float32 ulps of each of their frequencies, turned into a phase error at position p.
    phase_slack = positions * np.tile(their_freq, 2)[None, :] * 2.0**-22 * their_factor
    assert np.all(np.abs(ours - theirs) <= 1e-6 + phase_slack)


def test_dynamic_seq_len_defaults_to_max_position():
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 256}
    longer = rope_cos_sin_cache(1024, 64, scaling=scaling)
    assert np.array_equal(longer, rope_cos_sin_cache(1024, 64, scaling=scaling, seq_len=1024))
    assert not np.array_equal(longer, rope_cos_sin_cache(1024, 64))
    # At or below the trained length dynamic is plain RoPE.
    assert np.array_equal(rope_cos_sin_cache(256, 64, scaling=scaling), rope_cos_sin_cache(256, 64))


def test_default_layout_matches_float64_cache():
    ours = rope_cos_sin_cache(300, 96)
    assert ours.shape == (300, 96) and ours.dtype == np.float32
    assert np.array_equal(ours, cos_sin_cache64(300, 96).astype(np.float32))
    assert np.array_equal(ours[0], np.r_[np.ones(48), np.zeros(48)].astype(np.float32))


def test_yarn_attention_factor_scales_cos_and_sin():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
               "attention_factor": 1.5}
    ours = rope_cos_sin_cache(64, 32, scaling=scaling).astype(np.float64)
    assert np.allclose(ours[:, :16] ** 2 + ours[:, 16:] ** 2, 1.5**2, rtol=1e-6)


@pytest.mark.parametrize("scaling, key", [
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "dynamic", "factor": 2.0}, "original_max_position_embeddings"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 4096}, "factor"),
    ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ({**LLAMA31, "low_freq_factor": None}, "low_freq_factor"),
    ({k: v for k, v in LLAMA31.items() if k != "high_freq_factor"}, "high_freq_factor"),
])
def test_missing_key_names_it(scaling, key):
    rope_type = scaling["rope_type"]
    message = f"scaling['{key}'] is required for rope_type '{rope_type}'"
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        rope_cos_sin_cache(16, 64, scaling=scaling)


@pytest.mark.parametrize("scaling, needle", [
    ({"rope_type": "longrope", "factor": 2.0}, "rope_type"),
    ({"type": "ntk"}, "rope_type"),
    ({"rope_type": "linear", "factor": "two"}, "factor"),
    ({"rope_type": "linear", "factor": 0.0}, "factor"),
    ({"rope_type": "default", "rope_theta": 500000.0}, "rope_theta"),
    ({**LLAMA31, "high_freq_factor": 1.0}, "high_freq_factor"),
])
def test_bad_scaling_names_it(scaling, needle):
    with pytest.raises(ValueError, match=needle):
        rope_cos_sin_cache(16, 64, scaling=scaling)


def test_scaling_must_be_a_mapping():
    with pytest.raises(TypeError, match="scaling"):
        rope_cos_sin_cache(16, 64, scaling=[("rope_type", "linear")])


@pytest.mark.parametrize("args, kwargs, needle", [
    ((16, 63), {}, "rotary_dim"),
    ((16, 0), {}, "rotary_dim"),
    ((16, 64.0), {}, "rotary_dim"),
    ((0, 64), {}, "max_position"),
    ((16.0, 64), {}, "max_position"),
    ((True, 64), {}, "max_position"),
    ((16, 64), {"seq_len": 0}, "seq_len"),
    ((16, 64), {"base": 1.0}, "base"),
    ((16, 2), {"scaling": {"rope_type": "dynamic", "factor": 2.0,
                           "original_max_position_embeddings": 8}}, "rotary_dim"),
])
def test_bad_arguments_name_them(args, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        rope_cos_sin_cache(*args, **kwargs)
