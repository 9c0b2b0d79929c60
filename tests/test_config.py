"""Config: released defaults, HF / reference-args parsing, validation errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import CASES, fixture_dir
from dsv32_jax.model.config import Config, ConfigError, preset


def test_defaults_are_the_released_sizes():
    c = Config()
    assert (c.dim, c.n_layers, c.n_dense_layers, c.n_heads, c.n_routed_experts) == (7168, 61, 3, 128, 256)
    assert (c.kv_lora_rank, c.q_lora_rank, c.index_topk, c.vocab_size) == (512, 1536, 2048, 129280)
    assert c.dtype == "bfloat16" and c.fp8_activations and c.weight_dtype == "fp8"
    hash(c)  # frozen and hashable (a static jit argument)
    # softmax scale: 192^-0.5 * (0.1 ln 40 + 1)^2
    assert c.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 2.302585 * 1.6021 + 1) ** 2, rel=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_hf_and_reference_args_agree(case):
    d = fixture_dir(case)
    a = Config.from_hf(d / "hf")
    b = Config.from_reference_args(d / "reference_args.json")
    assert a == b
    assert Config.from_hf(a.to_hf()) == a


def test_hf_round_trip_of_presets():
    for name in ("tiny", "small", "671b"):
        c = preset(name)
        assert Config.from_hf(c.to_hf()) == c


def test_overrides_and_replace_are_validated():
    c = Config.from_hf(Config().to_hf(), dtype="float32", fp8_activations=False)
    assert c.dtype == "float32" and not c.fp8_activations
    with pytest.raises(ConfigError, match="dtype"):
        dataclasses.replace(c, dtype="float16")


@pytest.mark.parametrize("change,match", [
    (dict(n_routed_experts=10), "not divisible by n_group"),
    (dict(index_head_dim=96), "power of two"),
    (dict(n_limited_groups=9), "topk_group"),
    (dict(n_expert_groups=256), "top-2"),
    (dict(kv_lora_rank=100), "kv_lora_rank"),
    (dict(q_lora_rank=1000), "q_lora_rank=1000 is the input width of an FP8 linear"),
    (dict(n_activated_experts=200), "num_experts_per_tok"),
    (dict(n_dense_layers=62), "first_k_dense_replace"),
    (dict(qk_rope_head_dim=63), "even"),
])
def test_inconsistent_configs_raise(change, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(Config(), **change)


def test_fp8_block_rules_only_where_fp8_needs_them():
    # a bf16 checkpoint without FP8 simulation may use widths that are not multiples of 128
    c = dataclasses.replace(Config(), weight_dtype="bf16", scale_fmt=None, fp8_activations=False,
                            q_lora_rank=1000, kv_lora_rank=500, index_head_dim=64)
    assert c.q_lora_rank == 1000


def test_bad_hf_files(tmp_path):
    hf = Config().to_hf()
    for key, value, match in [("hidden_size", None, "missing required field 'hidden_size'"),
                              ("n_group", 3, "not divisible"),
                              ("num_hidden_layers", "61", "must be an integer"),
                              ("scoring_func", "softmax", "sigmoid"),
                              ("model_type", "llama", "deepseek_v32")]:
        bad = dict(hf)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        path = tmp_path / "config.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match):
            Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_hf(tmp_path)
    bad = dict(hf, quantization_config={**hf["quantization_config"], "weight_block_size": [64, 64]})
    with pytest.raises(ConfigError, match="weight_block_size"):
        Config.from_hf(bad)
