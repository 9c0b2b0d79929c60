"""The one abstract description of the weights: shape, dtype and logical axes of every param,
derived from the Flax modules, and its mapping to tensor names of the released HF layout.

It drives random init, sharding specs (`sharding.rules`), checkpoint loading and its checks, and
(later) Orbax restore targets and the converter.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dsv32_jax.model.config import Config
from dsv32_jax.model.moe import EXPERTS
from dsv32_jax.model.mtp import init_args, mtp_stack
from dsv32_jax.model.transformer import Transformer, merge_experts

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: Any
    names: tuple[str, ...]  # logical axis names, one per dim

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def abstract_params(cfg: Config, mtp: bool = False) -> dict:
    """Nested dict of ParamSpec, mirroring the model's `params` collection. No memory is used.
    mtp: with the multi-token-prediction layers too, under "mtp" (`model.mtp`; absent when the
    config has none)."""
    tree = jax.tree.map(lambda spec: spec, _abstract(cfg))  # the caller's own dicts
    if mtp and cfg.n_mtp_layers:
        tree["mtp"] = jax.tree.map(lambda spec: spec, _abstract_mtp(cfg))
    return tree


def _specs(boxed: dict) -> dict:
    return jax.tree.map(lambda b: ParamSpec(tuple(b.value.shape), b.value.dtype, tuple(b.names)),
                        boxed, is_leaf=_is_box)


@functools.lru_cache(maxsize=16)
def _abstract(cfg: Config) -> dict:
    # tracing the model's init takes ~1 s (more at 61 layers); loading, planning, converting and
    # checking a checkpoint all ask for the same config's specs
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return _specs(merge_experts(jax.eval_shape(Transformer(cfg).init, rngs(0), tokens)))


@functools.lru_cache(maxsize=16)
def _abstract_mtp(cfg: Config) -> dict:
    return _specs(merge_experts(jax.eval_shape(lambda r: mtp_stack(cfg).init(r, *init_args(cfg)),
                                               rngs(0))))


def init_params(cfg: Config, seed: int = 0, mtp: bool = False) -> dict:
    """Random params (plain arrays) with the real layout; for tests and benchmarks. mtp: with
    the MTP layers under "mtp" (as `abstract_params`)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = nn.unbox(merge_experts(_init(cfg)(rngs(seed), tokens)))
    if mtp and cfg.n_mtp_layers:
        params["mtp"] = init_mtp_params(cfg, seed)
    return params


def init_mtp_params(cfg: Config, seed: int = 0) -> dict:
    """Random params of the MTP layers alone (the "mtp" tree of `init_params(mtp=True)`)."""
    return nn.unbox(merge_experts(_init_mtp(cfg)(rngs(seed + 1))))


@functools.lru_cache(maxsize=8)
def _init(cfg: Config):
    return jax.jit(Transformer(cfg).init)  # compiled once per config, whatever the seed


@functools.lru_cache(maxsize=8)
def _init_mtp(cfg: Config):
    return jax.jit(lambda r: mtp_stack(cfg).init(r, *init_args(cfg)))


def rngs(seed: int) -> dict:
    """The init rng streams of a seed: "params", and EXPERTS for the routed-expert stack (which
    the layer scan broadcasts, so it draws from a stream the scan does not split)."""
    key = jax.random.key(seed)
    return {"params": key, EXPERTS: jax.random.fold_in(key, 1)}


def flatten(tree: dict) -> dict[Path, Any]:
    """Nested dict -> {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update({(k, *p): leaf for p, leaf in flatten(v).items()})
        else:
            out[(k,)] = v
    return out


def unflatten(flat: dict[Path, Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


# ---- HF tensor names ---------------------------------------------------------------------------
_GLOBAL = {("embed", "weight"): "model.embed_tokens.weight", ("norm", "weight"): "model.norm.weight",
           ("head", "weight"): "lm_head.weight"}
_MODULES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn.wq_a": "self_attn.q_a_proj", "attn.q_norm": "self_attn.q_a_layernorm",
    "attn.wq_b": "self_attn.q_b_proj", "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
    "attn.kv_norm": "self_attn.kv_a_layernorm", "attn.wkv_b": "self_attn.kv_b_proj",
    "attn.wo": "self_attn.o_proj", "attn.indexer.wq_b": "self_attn.indexer.wq_b",
    "attn.indexer.wk": "self_attn.indexer.wk", "attn.indexer.k_norm": "self_attn.indexer.k_norm",
    "attn.indexer.weights_proj": "self_attn.indexer.weights_proj",
    "ffn.w1": "mlp.gate_proj", "ffn.w2": "mlp.down_proj", "ffn.w3": "mlp.up_proj",
    "ffn.shared.w1": "mlp.shared_experts.gate_proj", "ffn.shared.w2": "mlp.shared_experts.down_proj",
    "ffn.shared.w3": "mlp.shared_experts.up_proj",
}
_LEAVES = {"weight": "weight", "scale": "weight_scale_inv", "bias": "bias"}
_MOE = {"gate_weight": "mlp.gate.weight", "gate_bias": "mlp.gate.e_score_correction_bias"}
_EXPERT_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def hf_names(cfg: Config, path: Path) -> np.ndarray:
    """The HF tensor name(s) a param is stacked from, as an array shaped like its stacked dims:
    () for global params, (L,) for per-layer params, (L, E) for routed-expert params."""
    if path in _GLOBAL:
        return np.array(_GLOBAL[path], dtype=object)
    group, *rest = path
    if group == "dense_layers":
        layers = range(cfg.n_dense_layers)
    elif group == "moe_layers":
        layers = range(cfg.n_dense_layers, cfg.n_layers)
    elif group == "mtp":
        layers = range(cfg.n_layers, cfg.n_layers + cfg.n_mtp_layers)
        if rest[0] != "block":  # enorm, hnorm, eh_proj, shared_head.{norm, head}, embed_tokens
            if len(rest) < 2 or rest[-1] not in _LEAVES:
                raise KeyError(f"param {'/'.join(path)} has no HF tensor")
            suffix = ".".join(rest[:-1]) + "." + _LEAVES[rest[-1]]
            return np.array([f"model.layers.{i}.{suffix}" for i in layers], dtype=object)
        rest = rest[1:]  # the block: named like a MoE layer's tensors
    else:
        raise KeyError(f"param {'/'.join(path)} has no HF tensor")
    if rest[:2] == ["ffn", "experts"]:
        proj, leaf = rest[2].split("_")
        return np.array([[f"model.layers.{i}.mlp.experts.{e}.{_EXPERT_PROJ[proj]}.{_LEAVES[leaf]}"
                          for e in range(cfg.n_routed_experts)] for i in layers], dtype=object)
    if len(rest) == 2 and rest[0] == "ffn" and rest[1] in _MOE:
        suffix = _MOE[rest[1]]
    else:
        module = ".".join(rest[:-1])
        if module not in _MODULES or rest[-1] not in _LEAVES:
            raise KeyError(f"param {'/'.join(path)} has no HF tensor")
        suffix = f"{_MODULES[module]}.{_LEAVES[rest[-1]]}"
    return np.array([f"model.layers.{i}.{suffix}" for i in layers], dtype=object)


def layer_index(name: str) -> int | None:
    """i for a tensor `model.layers.{i}.…`, else None."""
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None


def is_mtp_tensor(cfg: Config, name: str) -> bool:
    """Tensors of the multi-token-prediction layer(s): layers n_layers .. n_layers+n_mtp-1."""
    i = layer_index(name)
    return i is not None and cfg.n_layers <= i < cfg.n_layers + cfg.n_mtp_layers


def mtp_tensor_specs(cfg: Config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{HF name: (shape, param dtype)} of the multi-token-prediction layer(s) (layers n_layers ..
    n_layers+n_mtp-1) as released: a MoE decoder block, its tensors named like a MoE layer's,
    plus enorm, hnorm, eh_proj (FP8 with its scales in an FP8 checkpoint), shared_head.norm,
    shared_head.head and embed_tokens: the "mtp" params of `abstract_params(cfg, mtp=True)`."""
    out = {}
    for path, spec in flatten(abstract_params(cfg, mtp=True).get("mtp", {})).items():
        names = hf_names(cfg, ("mtp", *path))
        for name in names.reshape(-1):
            out[str(name)] = (tuple(spec.shape[names.ndim:]), np.dtype(spec.dtype))
    return out


def layer_params(cfg: Config, params: dict, layer: int) -> tuple[bool, dict]:
    """(is_moe, the Block params of decoder layer `layer`) sliced out of the stacked tree."""
    if not 0 <= layer < cfg.n_layers:
        raise IndexError(f"layer {layer} is out of range [0, {cfg.n_layers})")
    moe = layer >= cfg.n_dense_layers
    group, i = ("moe_layers", layer - cfg.n_dense_layers) if moe else ("dense_layers", layer)
    return moe, jax.tree.map(lambda a: a[i], params[group])
