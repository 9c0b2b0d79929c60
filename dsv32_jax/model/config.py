"""One flat, frozen, hashable config. Defaults are the released DeepSeek-V3.2 (671B) sizes.

Small presets are `dataclasses.replace(Config(), ...)`. A config comes from a Hugging Face
`config.json` (`Config.from_hf`) or from the official reference's model-args JSON
(`Config.from_reference_args`); both are validated, and so is every `replace` (via __post_init__).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from dsv32_jax.files import no_constants, read_regular

BLOCK = 128  # FP8 block size: 128x128 weight blocks, 128-wide activation blocks
DTYPES = ("bfloat16", "float32")
MATMUL_IMPLS = ("xla", "pallas", "native")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (block counts, chunk counts)."""
    return -(-a // b)


class ConfigError(ValueError):
    """An unsupported or inconsistent model config."""


@dataclasses.dataclass(frozen=True)
class Config:
    # sizes (HF config.json names in comments)
    vocab_size: int = 129280
    dim: int = 7168  # hidden_size
    inter_dim: int = 18432  # intermediate_size (dense FFN layers)
    moe_inter_dim: int = 2048  # moe_intermediate_size
    n_layers: int = 61  # num_hidden_layers
    n_dense_layers: int = 3  # first_k_dense_replace
    n_heads: int = 128  # num_attention_heads
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8  # num_experts_per_tok
    n_expert_groups: int = 8  # n_group
    n_limited_groups: int = 4  # topk_group
    route_scale: float = 2.5  # routed_scaling_factor
    # lightning indexer
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # YaRN rotary
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_seq_len: int = 4096  # rope_scaling.original_max_position_embeddings
    max_seq_len: int = 163840  # max_position_embeddings
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    rms_norm_eps: float = 1e-6
    # checkpoint format
    weight_dtype: str = "fp8"  # "fp8": e4m3 weights + 128x128 fp32 scales; "bf16": plain bf16
    scale_fmt: str | None = "ue8m0"  # activation-scale format (None: unrounded fp32 scales)
    n_mtp_layers: int = 1  # num_nextn_predict_layers (stored after the decoder; unused here)
    bos_token_id: int = 0
    eos_token_id: int = 1
    # numerics (runtime choice, not part of the checkpoint)
    dtype: str = "bfloat16"  # activation / compute dtype
    fp8_activations: bool = True  # simulate the deployed FP8 activation quantization
    # expert parallelism (sharded runs only): None = exact, no pick ever dropped; f > 0 = send
    # buffers of f x the mean load per device, overflow dropped and counted (`moe_dropped`)
    ep_capacity_factor: float | None = None
    # the FP8 linears (block-scaled, fp8 weights x fp8 activations): "xla" = quant.blockwise_matmul
    # (the reference); "pallas" = the kernels of pallas_kernels.fp8_linear / grouped_fp8
    # (interpreted off GPU); "native" = on a CPU host, linears of few rows (a decode step) by the
    # C++ kernels of `dsv32_jax.native`, which read the e4m3 (and the head's bf16) weights as
    # stored, elsewhere "xla". Only defined for fp8 weights with fp8_activations (validated),
    # "native" for the bf16 numerics only.
    matmul_impl: str = "xla"

    def __post_init__(self):
        _validate(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def yarn_active(self) -> bool:
        return self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.yarn_active:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    @property
    def quantized(self) -> bool:
        return self.weight_dtype == "fp8"

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides) -> "Config":
        """From a HF `config.json` (path, directory or dict). `overrides` set numerics etc."""
        hf = _read_json(source, "config.json")
        where = _where(source, "config.json")
        arch = hf.get("model_type")
        if arch not in (None, "deepseek_v32"):
            raise ConfigError(f"{where}: model_type {arch!r} is not 'deepseek_v32'")
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ConfigError(f"{where}: scoring_func {hf['scoring_func']!r}: only 'sigmoid' is supported")
        if hf.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ConfigError(f"{where}: topk_method {hf['topk_method']!r}: only 'noaux_tc' is supported")
        if hf.get("moe_layer_freq", 1) != 1:
            raise ConfigError(f"{where}: moe_layer_freq must be 1")
        if hf.get("tie_word_embeddings", False):
            raise ConfigError(f"{where}: tie_word_embeddings=true is not the V3.2 layout")
        weight_dtype, scale_fmt = _quant_from_hf(hf.get("quantization_config"), where)
        rope = _rope_from_hf(hf, where)
        missing = [k for k in _HF_REQUIRED.values() if k not in hf]
        if missing:
            raise ConfigError(f"{where}: missing required field {missing[0]!r}")
        kw = {f: hf[k] for f, k in _HF_REQUIRED.items()}
        kw.update({f: hf.get(k, d) for f, (k, d) in _HF_OPTIONAL.items()})
        kw.update(weight_dtype=weight_dtype, scale_fmt=scale_fmt)
        kw["rope_theta"] = rope.pop("rope_theta")
        if rope["rope_type"] == "yarn":
            kw.update(rope_factor=rope["factor"], original_seq_len=rope["original_max_position_embeddings"],
                      beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1),
                      mscale=rope.get("mscale", 1.0))
            if rope.get("mscale_all_dim", kw["mscale"]) != kw["mscale"]:
                raise ConfigError(f"{where}: {rope['where']} mscale_all_dim={rope['mscale_all_dim']} != "
                                  f"mscale={kw['mscale']} is not supported")
            if _is_number(kw["max_seq_len"]) and kw["max_seq_len"] <= kw["original_seq_len"]:
                raise ConfigError(
                    f"{where}: {rope['where']} asks for YaRN, but max_position_embeddings="
                    f"{kw['max_seq_len']} does not exceed original_max_position_embeddings="
                    f"{kw['original_seq_len']}, so YaRN would be inactive; use rope_type 'default' "
                    "or fix the lengths")
        else:  # no YaRN: make the condition max_seq_len > original_seq_len false
            kw.update(rope_factor=1.0, original_seq_len=kw["max_seq_len"])
        kw.update(overrides)
        return _build(cls, kw, where)

    @classmethod
    def from_reference_args(cls, source: str | os.PathLike | Mapping[str, Any], **overrides) -> "Config":
        """From the official reference's ModelArgs JSON (e.g. `config_671B_v3.2.json`)."""
        a = _read_json(source, "reference_args.json")
        where = _where(source, "reference_args.json")
        if a.get("score_func", "sigmoid") != "sigmoid":
            raise ConfigError(f"{where}: score_func {a['score_func']!r}: only 'sigmoid' is supported")
        # our field names are the reference's, except its "dtype" (the weight format)
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "fp8_activations",
                                                             "ep_capacity_factor", "matmul_impl"}
        kw = {k: v for k, v in a.items() if k in names}
        if "dtype" in a:
            kw["weight_dtype"] = a["dtype"]
        kw.update(overrides)
        return _build(cls, kw, where)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict of this config (numerics fields are not part of it)."""
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "first_k_dense_replace": self.n_dense_layers, "hidden_act": "silu",
            "hidden_size": self.dim, "index_head_dim": self.index_head_dim,
            "index_n_heads": self.index_n_heads, "index_topk": self.index_topk,
            "intermediate_size": self.inter_dim, "kv_lora_rank": self.kv_lora_rank,
            "max_position_embeddings": self.max_seq_len, "moe_intermediate_size": self.moe_inter_dim,
            "moe_layer_freq": 1, "n_group": self.n_expert_groups,
            "n_routed_experts": self.n_routed_experts, "n_shared_experts": self.n_shared_experts,
            "norm_topk_prob": True, "num_attention_heads": self.n_heads,
            "num_experts_per_tok": self.n_activated_experts, "num_hidden_layers": self.n_layers,
            "num_key_value_heads": self.n_heads, "num_nextn_predict_layers": self.n_mtp_layers,
            "q_lora_rank": self.q_lora_rank, "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "routed_scaling_factor": self.route_scale,
            "scoring_func": "sigmoid", "tie_word_embeddings": False,
            "topk_group": self.n_limited_groups, "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16", "v_head_dim": self.v_head_dim, "vocab_size": self.vocab_size,
        }
        if self.yarn_active:
            hf["rope_scaling"] = {
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "factor": self.rope_factor,
                "mscale": self.mscale, "mscale_all_dim": self.mscale,
                "original_max_position_embeddings": self.original_seq_len, "type": "yarn"}
        if self.quantized:
            hf["quantization_config"] = {
                "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [BLOCK, BLOCK]}
            if self.scale_fmt is not None:
                hf["quantization_config"]["scale_fmt"] = self.scale_fmt
        return hf


# Config field -> its config.json key (required, then optional with the default when absent)
_HF_REQUIRED = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace", "n_heads": "num_attention_heads",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group", "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor", "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim", "index_topk": "index_topk",
    "max_seq_len": "max_position_embeddings",
}
_HF_OPTIONAL = {"rms_norm_eps": ("rms_norm_eps", 1e-6),
                "n_mtp_layers": ("num_nextn_predict_layers", 0),
                "bos_token_id": ("bos_token_id", 0), "eos_token_id": ("eos_token_id", 1)}
_HF_ROPE = {"rope_factor": "factor", "original_seq_len": "original_max_position_embeddings",
            "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale"}

# Upper bounds of the integer fields: far above every released model of the family (V3, V3.1,
# V3.2, R1: the defaults above) and the presets, low enough that nothing traced from a config
# overflows int32 or loops for hours (a block loop over hidden_size/128, say).
LIMITS = {
    "vocab_size": 1 << 22, "dim": 1 << 16, "inter_dim": 1 << 18, "moe_inter_dim": 1 << 16,
    "n_layers": 1024, "n_dense_layers": 1024, "n_heads": 1024, "q_lora_rank": 1 << 16,
    "kv_lora_rank": 1 << 16, "qk_nope_head_dim": 1024, "qk_rope_head_dim": 1024,
    "v_head_dim": 1024, "n_routed_experts": 4096, "n_shared_experts": 64,
    "n_activated_experts": 4096, "n_expert_groups": 4096, "n_limited_groups": 4096,
    "index_n_heads": 1024, "index_head_dim": 1024, "index_topk": 1 << 20,
    "original_seq_len": 1 << 24, "max_seq_len": 1 << 24, "beta_fast": 1 << 16,
    "beta_slow": 1 << 16, "n_mtp_layers": 64, "bos_token_id": 1 << 22, "eos_token_id": 1 << 22,
}
_MAY_BE_ZERO = ("bos_token_id", "eos_token_id", "n_mtp_layers", "n_dense_layers")
# float fields that must be finite and > 0 (ep_capacity_factor: also None)
_POSITIVE_FLOATS = ("route_scale", "rope_theta", "rope_factor", "mscale", "rms_norm_eps")


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:40] + f"... ({len(r)} characters)"


def _label(field: str) -> str:
    """A field's name as the user wrote it: `route_scale (routed_scaling_factor)`."""
    hf = (_HF_REQUIRED.get(field) or _HF_OPTIONAL.get(field, (None,))[0]
          or (f"rope_scaling.{_HF_ROPE[field]}" if field in _HF_ROPE else None))
    return field if hf in (None, field) else f"{field} ({hf})"


def _quant_from_hf(q, where: str) -> tuple[str, str | None]:
    """(weight_dtype, scale_fmt) from `quantization_config` (absent or null: bf16 weights)."""
    if q is None:
        return "bf16", None
    if not isinstance(q, Mapping):
        raise ConfigError(f"{where}: quantization_config must be an object or null, got {q!r}")
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{where}: quantization_config {q}: only fp8 e4m3 is supported")
    wbs = q.get("weight_block_size", [BLOCK, BLOCK])
    if not isinstance(wbs, (list, tuple)) or list(wbs) != [BLOCK, BLOCK]:
        raise ConfigError(f"{where}: quantization_config.weight_block_size {wbs!r} must be [128, 128]")
    fmt = q.get("scale_fmt")
    if fmt not in (None, "ue8m0"):
        raise ConfigError(f"{where}: quantization_config.scale_fmt {fmt!r} must be 'ue8m0' or absent")
    return "fp8", fmt


def _build(cls, kw: dict, where: str) -> "Config":
    """cls(**kw) with types checked, every error naming the file."""
    kw = _checked_types(kw, where)
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim")
_YARN_REQUIRED = ("factor", "original_max_position_embeddings")
_ROPE_TOP_LEVEL = ("rope_theta", "rope_scaling", "rope_parameters", "rope_interleave")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    """A real number float() keeps finite (not NaN/Inf, not an int past float's range)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return abs(v) < 2**1000
    return isinstance(v, float) and math.isfinite(v)


def _rope_block(block, where: str, label: str, theta_allowed: bool) -> dict:
    """One rotary layout normalized: {"rope_type": "default"|"yarn", "rope_theta"?: float, yarn
    keys...}. `label` is where it came from ("rope_scaling" or "rope_parameters")."""
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: {label} must be an object, got {block!r}")
    types = {k: block[k] for k in ("rope_type", "type") if k in block}
    for k, v in types.items():
        if not isinstance(v, str):
            raise ConfigError(f"{where}: {label}.{k} must be a string, got {_show(v)}")
    if len(set(types.values())) > 1:
        raise ConfigError(f"{where}: {label} has contradictory 'type' and 'rope_type': {types}")
    # the legacy rope_scaling of DeepSeek configs is YaRN when no type is given
    rtype = next(iter(types.values())) if types else ("yarn" if label == "rope_scaling" else "default")
    if rtype not in ("default", "yarn"):
        raise ConfigError(f"{where}: {label} rope type {rtype!r} is not supported (only 'yarn', as "
                          "released, and 'default': plain rotary)")
    allowed = {"rope_type", "type"} | ({"rope_theta"} if theta_allowed else set())
    if rtype == "yarn":
        allowed |= set(_YARN_KEYS)
    for k in block:
        if k not in allowed:
            why = (f"has no meaning for rope type {rtype!r}" if k in _YARN_KEYS
                   else "is not a rotary setting this model knows")
            raise ConfigError(f"{where}: {label} key {k!r} {why} (allowed: {sorted(allowed)})")
    out = {"rope_type": rtype}
    for k in allowed - {"rope_type", "type"}:
        if k in block:
            v = block[k]
            if not _is_finite(v):
                raise ConfigError(f"{where}: {label}.{k} must be a finite number, got {_show(v)}")
            out[k] = v
    if rtype == "yarn":
        for k in _YARN_REQUIRED:
            if k not in out:
                raise ConfigError(f"{where}: {label} (YaRN) is missing required key {k!r}")
    return out


def _rope_from_hf(hf: Mapping[str, Any], where: str) -> dict:
    """The rotary settings of a HF config in either layout: the legacy top-level `rope_theta` plus
    `rope_scaling` (null: no scaling), or transformers 5's `rope_parameters` (rope_theta, rope_type
    and the YaRN keys in one object). Both may be present but must agree; unknown rope types and
    unknown rotary keys are errors, never ignored. Returns the normalized dict (with "where", the
    layout the values came from, for messages)."""
    for k in hf:
        if k.startswith("rope_") and k not in _ROPE_TOP_LEVEL:
            raise ConfigError(f"{where}: unknown rotary setting {k!r} (known: {list(_ROPE_TOP_LEVEL)})")
    if "rope_interleave" in hf and hf["rope_interleave"] is not True:
        raise ConfigError(f"{where}: rope_interleave={hf['rope_interleave']!r}: only the released "
                          "interleaved rotary layout (true) is supported")
    layouts = []
    if hf.get("rope_scaling") is not None:
        layouts.append(("rope_scaling", _rope_block(hf["rope_scaling"], where, "rope_scaling",
                                                   theta_allowed=False)))
    if "rope_theta" in hf:
        theta = hf["rope_theta"]
        if not _is_finite(theta):
            raise ConfigError(f"{where}: rope_theta must be a finite number, got {_show(theta)}")
        layouts.append(("rope_theta", {"rope_theta": theta}))
    if hf.get("rope_parameters") is not None:
        layouts.append(("rope_parameters", _rope_block(hf["rope_parameters"], where, "rope_parameters",
                                                      theta_allowed=True)))
    elif hf.get("rope_scaling") is None:  # the legacy layout without rope_scaling: plain rotary
        layouts.append(("rope_scaling", {"rope_type": "default"}))
    merged: dict = {}
    source: dict = {}
    for label, block in layouts:
        for k, v in block.items():
            if k in merged and merged[k] != v:
                raise ConfigError(f"{where}: contradictory rotary settings: {k}={merged[k]!r} from "
                                  f"{source[k]} but {v!r} from {label}")
            merged.setdefault(k, v)
            source.setdefault(k, label)
    if "rope_theta" not in merged:
        raise ConfigError(f"{where}: missing required field 'rope_theta' (top-level, or inside "
                          "rope_parameters)")
    merged.setdefault("rope_type", "default")
    if merged["rope_type"] == "yarn":
        merged["where"] = source.get("factor", "rope_scaling")
    merged["rope_theta"] = float(merged["rope_theta"])
    return merged


def _read_json(source, filename: str) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    try:
        obj = json.loads(read_regular(path).decode("utf-8"), parse_constant=no_constants)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:  # a FIFO or device (would block or never end), permissions, ...
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, NaN
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: holds a JSON {type(obj).__name__}, expected an object")
    return obj


def _where(source, filename: str) -> str:
    if isinstance(source, Mapping):
        return filename
    path = os.fspath(source)
    return os.path.join(path, filename) if os.path.isdir(path) else path


def _checked_types(kw: dict, where: str) -> dict:
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    out = {}
    for k, v in kw.items():
        if k not in types:
            raise ConfigError(f"{where}: unknown config field {k!r}")
        t = types[k]
        if t == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                else:
                    raise ConfigError(f"{where}: {_label(k)} must be an integer, got {_show(v)}")
        elif t == "float":
            if not _is_finite(v):
                raise ConfigError(f"{where}: {_label(k)} must be a finite number, got {_show(v)}")
            v = float(v)
        out[k] = v
    return out


def _validate(c: Config) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        if f.type == "int":
            low = 0 if f.name in _MAY_BE_ZERO else 1
            need(isinstance(v, int) and not isinstance(v, bool) and low <= v <= LIMITS[f.name],
                 f"{_label(f.name)} must be an integer in [{low}, {LIMITS[f.name]}], got {_show(v)}")
    for name in _POSITIVE_FLOATS:
        v = getattr(c, name)
        need(_is_finite(v) and v > 0, f"{_label(name)} must be a finite number > 0, got {_show(v)}")
    for name in ("bos_token_id", "eos_token_id"):
        need(getattr(c, name) < c.vocab_size,
             f"{name}={getattr(c, name)} is outside the vocabulary [0, vocab_size={c.vocab_size})")
    need(c.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {c.dtype!r}")
    need(isinstance(c.fp8_activations, bool), f"fp8_activations must be a bool, got {c.fp8_activations!r}")
    need(c.ep_capacity_factor is None or (_is_finite(c.ep_capacity_factor) and c.ep_capacity_factor > 0),
         f"ep_capacity_factor must be None (exact) or a number > 0, got {c.ep_capacity_factor!r}")
    need(c.matmul_impl in MATMUL_IMPLS,
         f"matmul_impl must be one of {MATMUL_IMPLS}, got {c.matmul_impl!r}")
    need(c.matmul_impl == "xla" or (c.weight_dtype == "fp8" and c.fp8_activations),
         f"matmul_impl={c.matmul_impl!r} runs the FP8 block-scaled kernels: it needs FP8 weights "
         f"and fp8_activations=True (got weight_dtype={c.weight_dtype!r}, fp8_activations="
         f"{c.fp8_activations}); use matmul_impl='xla'")
    need(c.matmul_impl != "native" or c.dtype == "bfloat16",
         "matmul_impl='native' takes the bf16 numerics' FP8 linears (one float32 product of the "
         f"dequantized operands); dtype={c.dtype!r} keeps the release's blockwise order: use 'xla'")
    need(c.weight_dtype in ("fp8", "bf16"), f"weight_dtype must be 'fp8' or 'bf16', got {c.weight_dtype!r}")
    need(c.scale_fmt in (None, "ue8m0"), f"scale_fmt must be None or 'ue8m0', got {c.scale_fmt!r}")
    need(0 <= c.n_dense_layers <= c.n_layers,
         f"first_k_dense_replace={c.n_dense_layers} must be within [0, num_hidden_layers={c.n_layers}]")
    need(c.n_routed_experts % c.n_expert_groups == 0,
         f"n_routed_experts={c.n_routed_experts} is not divisible by n_group={c.n_expert_groups}")
    per_group = c.n_routed_experts // c.n_expert_groups
    need(c.n_expert_groups == 1 or per_group >= 2,
         f"group-limited routing scores a group by its top-2 experts: n_routed_experts/n_group="
         f"{per_group} must be >= 2")
    need(c.n_limited_groups <= c.n_expert_groups,
         f"topk_group={c.n_limited_groups} exceeds n_group={c.n_expert_groups}")
    need(c.n_activated_experts <= c.n_limited_groups * per_group,
         f"num_experts_per_tok={c.n_activated_experts} exceeds the experts in the kept groups "
         f"(topk_group*experts_per_group={c.n_limited_groups * per_group})")
    need(c.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={c.qk_rope_head_dim} must be even")
    hd = c.index_head_dim
    need(hd & (hd - 1) == 0, f"index_head_dim={hd} must be a power of two (Hadamard rotation)")
    need(c.qk_rope_head_dim <= hd, f"qk_rope_head_dim={c.qk_rope_head_dim} exceeds index_head_dim={hd}")
    need(c.beta_fast > c.beta_slow, f"beta_fast={c.beta_fast} must exceed beta_slow={c.beta_slow}")
    if c.fp8_activations:
        need(hd == BLOCK, f"index_head_dim={hd}: the FP8 indexer quantizes one 128-wide block per head; "
                          "it must be 128 (or set fp8_activations=False)")
        need(c.kv_lora_rank % BLOCK == 0,
             f"kv_lora_rank={c.kv_lora_rank} must be a multiple of 128 for the FP8 latent cache")
    if c.quantized and c.fp8_activations:
        for name, k in (("hidden_size", c.dim), ("q_lora_rank", c.q_lora_rank),
                        ("kv_lora_rank", c.kv_lora_rank), ("num_attention_heads*v_head_dim",
                                                            c.n_heads * c.v_head_dim),
                        ("intermediate_size", c.inter_dim), ("moe_intermediate_size", c.moe_inter_dim)):
            need(k % BLOCK == 0, f"{name}={k} is the input width of an FP8 linear layer and must be a "
                                 "multiple of 128 (activations are quantized in 128-wide blocks)")


def preset(name: str, **overrides) -> Config:
    """Small configs for tests and the demo (`tiny` mirrors the shared fixtures' shapes)."""
    presets = {
        "671b": {},
        "tiny": dict(vocab_size=2048, dim=256, inter_dim=512, moe_inter_dim=128, n_layers=3,
                     n_dense_layers=1, n_heads=4, q_lora_rank=256, kv_lora_rank=128,
                     qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=8,
                     n_activated_experts=2, n_expert_groups=4, n_limited_groups=2, index_n_heads=16,
                     index_topk=16, rope_factor=4.0, original_seq_len=32, max_seq_len=128),
        "small": dict(vocab_size=4096, dim=512, inter_dim=1024, moe_inter_dim=256, n_layers=4,
                      n_dense_layers=1, n_heads=8, q_lora_rank=256, kv_lora_rank=128,
                      qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
                      n_activated_experts=4, n_expert_groups=4, n_limited_groups=2, index_n_heads=8,
                      index_topk=64, rope_factor=4.0, original_seq_len=1024, max_seq_len=8192),
    }
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(presets)}")
    return dataclasses.replace(Config(), **{**presets[name], **overrides})
