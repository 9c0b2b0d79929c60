"""Config: released defaults, HF / reference-args parsing, validation errors."""

from __future__ import annotations

import dataclasses
import json
import math

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


# ---- rotary settings: legacy rope_scaling/rope_theta and transformers 5's rope_parameters ---------
def _transformers5_layout(hf: dict) -> dict:
    """`hf` rewritten the way transformers 5 writes config.json: rotary settings only as
    rope_parameters (rope_type + rope_theta + the YaRN keys), no rope_theta/rope_scaling."""
    out = dict(hf)
    rs = out.pop("rope_scaling", None)
    params = {"rope_type": "yarn" if rs else "default", "rope_theta": out.pop("rope_theta")}
    if rs:
        params.update({k: v for k, v in rs.items() if k != "type"})
    out["rope_parameters"] = params
    return out


def _yarn_scale(cfg: Config) -> float:
    # the reference's softmax scale: qk_head_dim**-0.5 * (0.1 * mscale * ln(factor) + 1)**2
    return (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * (0.1 * math.log(40.0) + 1.0) ** 2


def test_transformers5_rope_parameters_keep_yarn():
    hf = _transformers5_layout(Config().to_hf())
    assert "rope_theta" not in hf and "rope_scaling" not in hf
    assert hf["rope_parameters"]["rope_type"] == "yarn"
    c = Config.from_hf(hf)
    assert c == Config()  # the released sizes, YaRN included
    assert c.yarn_active and c.rope_factor == 40.0 and c.original_seq_len == 4096
    # 192**-0.5 = 0.0722 without YaRN; with factor 40 the scale grows by (0.1 ln 40 + 1)^2 = 1.874
    assert c.softmax_scale == pytest.approx(_yarn_scale(c), rel=1e-12)
    assert c.softmax_scale == pytest.approx(0.13523, abs=1e-5)
    no_yarn = dataclasses.replace(c, rope_factor=1.0, original_seq_len=c.max_seq_len)
    assert no_yarn.softmax_scale == pytest.approx(192 ** -0.5) and no_yarn.softmax_scale < 0.073
    # adding only a top-level rope_theta (as a naive fix would) still reads YaRN from rope_parameters
    assert Config.from_hf({**hf, "rope_theta": 10000.0}).softmax_scale == c.softmax_scale


def test_both_rotary_layouts_must_agree():
    legacy = Config().to_hf()
    new = _transformers5_layout(legacy)
    both = {**legacy, "rope_parameters": new["rope_parameters"]}
    assert Config.from_hf(both) == Config()
    for key, value, match in [
        ("rope_theta", 50000.0, r"rope_theta=10000\.0 from rope_theta but 50000\.0 from rope_parameters"),
        ("factor", 20.0, "factor=40.0 from rope_scaling but 20.0 from rope_parameters"),
        ("original_max_position_embeddings", 8192, "original_max_position_embeddings"),
        ("rope_type", "default", "rope_type='yarn' from rope_scaling but 'default'"),
    ]:
        params = dict(new["rope_parameters"], **{key: value})
        if value == "default":
            params = {"rope_type": "default", "rope_theta": 10000.0}
        with pytest.raises(ConfigError, match=match):
            Config.from_hf({**legacy, "rope_parameters": params})


def test_default_rope_type_is_plain_rotary():
    hf = preset("tiny").to_hf()
    hf.pop("rope_scaling")
    plain = Config.from_hf(hf)  # the legacy layout without rope_scaling
    assert not plain.yarn_active and plain.softmax_scale == pytest.approx(128 ** -0.5)
    new = _transformers5_layout(hf)
    assert new["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert Config.from_hf(new) == plain
    assert Config.from_hf({**hf, "rope_scaling": {"type": "default"}}) == plain
    # rope_theta is still required, from one layout or the other
    del new["rope_parameters"]["rope_theta"]
    with pytest.raises(ConfigError, match="missing required field 'rope_theta'"):
        Config.from_hf(new)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"rope_type": "linear", "factor": 2.0}, "rope type 'linear' is not supported"),
        ({"rope_type": "llama3"}, "'llama3' is not supported"),
        ({"truncate": False}, "key 'truncate' is not a rotary setting"),
        ({"attention_factor": 1.0}, "key 'attention_factor'"),
        ({"factor": "40"}, r"rope_parameters\.factor must be a finite number"),
        ({"rope_type": "yarn", "type": "default"}, "contradictory 'type' and 'rope_type'"),
        ({"original_max_position_embeddings": None}, "original_max_position_embeddings must be a finite number"),
        ({"mscale_all_dim": 0.707}, "mscale_all_dim=0.707 != mscale=1.0"),
    ],
)
def test_rope_parameters_errors(params, match):
    hf = _transformers5_layout(Config().to_hf())
    hf["rope_parameters"] = {**hf["rope_parameters"], **params}
    with pytest.raises(ConfigError, match=match) as e:
        Config.from_hf(hf)
    assert "config.json" in str(e.value)


def test_rotary_keys_are_never_ignored():
    hf = _transformers5_layout(preset("tiny").to_hf())
    plain = {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="'factor' has no meaning for rope type 'default'"):
        Config.from_hf({**hf, "rope_parameters": {**plain, "factor": 4.0}})
    with pytest.raises(ConfigError, match="missing required key 'factor'"):
        Config.from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4,
                                                  "original_max_position_embeddings": 32}})
    with pytest.raises(ConfigError, match="key 'rope_theta' is not a rotary setting"):
        Config.from_hf({**preset("tiny").to_hf(), "rope_scaling": {
            **preset("tiny").to_hf()["rope_scaling"], "rope_theta": 1e4}})
    with pytest.raises(ConfigError, match="unknown rotary setting 'rope_scaling_factor'"):
        Config.from_hf({**hf, "rope_scaling_factor": 2.0})
    with pytest.raises(ConfigError, match="rope_interleave=False"):
        Config.from_hf({**hf, "rope_interleave": False})
    assert Config.from_hf({**hf, "rope_interleave": True}) == preset("tiny")
    # YaRN asked for where it could never act (max_position_embeddings <= the original length)
    short = {**hf, "max_position_embeddings": 32}
    with pytest.raises(ConfigError, match="YaRN would be inactive"):
        Config.from_hf(short)
