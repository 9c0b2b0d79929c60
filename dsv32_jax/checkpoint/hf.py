"""Loading the released Hugging Face layout (config.json + index + safetensors shards) into the
stacked param tree, tensor by tensor from memory maps.

Every param is built with `jax.make_array_from_callback`: the callback reads only the slice a
device asks for, from memory-mapped shards, so host memory holds at most one device's slice of one
param at a time (for a single device: the largest stacked param).
"""

from __future__ import annotations

import os

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from dsv32_jax.model.config import Config
from dsv32_jax.checkpoint.finite import first_nonfinite, what_is_wrong
from dsv32_jax.checkpoint.safetensors import ShardedCheckpoint
from dsv32_jax.checkpoint.weights import (ParamSpec, abstract_params, flatten, hf_names, is_mtp_tensor,
                                          layer_index, mtp_tensor_specs, unflatten)


class CheckpointError(ValueError):
    """A checkpoint that does not match the config/model: names the tensor and what was expected."""


_BF16, _F16, _F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)
SCALE_SUFFIX = ".weight_scale_inv"


def accepted_dtypes(spec_dtype, name: str) -> tuple[np.dtype, ...]:
    """Stored dtypes accepted for a tensor whose param has dtype `spec_dtype` (the first is the
    param's own). Non-FP8 float params (norms, embeddings, bf16 weights, the router bias) are also
    accepted in float32/float16/bfloat16 and cast to the param dtype on load; FP8 weights and their
    float32 `weight_scale_inv` scales must be stored exactly as the model expects."""
    spec = np.dtype(spec_dtype)
    if name.endswith(SCALE_SUFFIX) or spec not in (_BF16, _F32):
        return (spec,)
    return (spec,) + tuple(d for d in (_BF16, _F32, _F16) if d != spec)


def _dtype_error(file: str, name: str, stored, spec_dtype, what: str = "tensor") -> str:
    ok = accepted_dtypes(spec_dtype, name)
    alts = f" (or {'/'.join(d.name for d in ok[1:])}, cast on load)" if len(ok) > 1 else ""
    return (f"{file}: {what} {name!r} has dtype {np.dtype(stored).name}, expected "
            f"{np.dtype(spec_dtype).name}{alts}")


def is_hf_dir(path: str | os.PathLike) -> bool:
    p = os.fspath(path)
    return os.path.isfile(os.path.join(p, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(p))


def check(ckpt: ShardedCheckpoint, cfg: Config, specs: dict | None = None) -> dict:
    """Validate names, shapes and dtypes of every tensor against the abstract params.

    Returns {param path: HF names array}. Raises CheckpointError on missing, mis-shaped,
    wrongly-typed or unexpected tensors. The tensors of the MTP layer that are present are checked
    too (names, shapes, dtypes: they are skipped, not trusted); it may be absent or partial.
    """
    tree = specs if specs is not None else abstract_params(cfg)
    where = ckpt.directory
    sources, expected = {}, set()
    for path, spec in flatten(tree).items():
        names = hf_names(cfg, path)
        sources[path] = names
        per_tensor = tuple(spec.shape[names.ndim:])
        for name in names.reshape(-1):
            expected.add(name)
            if name not in ckpt:
                raise CheckpointError(f"{where}: missing tensor {name!r} (for param "
                                      f"{'/'.join(path)}, expected shape {per_tensor})")
            _check_tensor(ckpt, name, per_tensor, spec.dtype)
    extra = sorted(n for n in ckpt.keys() if n not in expected and not is_mtp_tensor(cfg, n))
    mtp = sorted(n for n in ckpt.keys() if is_mtp_tensor(cfg, n))
    for i in sorted({layer_index(n) for n in mtp}):  # an MTP layer has eh_proj; a decoder layer does not
        if f"model.layers.{i}.eh_proj.weight" not in ckpt:
            raise CheckpointError(f"{where}: model.layers.{i} has no eh_proj, so it is a decoder "
                                  f"layer, but config.json says num_hidden_layers={cfg.n_layers}")
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckpointError(f"{where}: unexpected tensors not used by the model: {extra[:5]}{more}")
    mtp_specs = mtp_tensor_specs(cfg) if mtp else {}
    for name in mtp:
        if name not in mtp_specs:
            raise CheckpointError(f"{ckpt.file_of(name)}: MTP tensor {name!r} is not part of the MTP "
                                  "layer (a MoE block plus enorm, hnorm, eh_proj, shared_head, "
                                  "embed_tokens)")
        _check_tensor(ckpt, name, *mtp_specs[name], what="MTP tensor")
    return sources


def _check_tensor(ckpt: ShardedCheckpoint, name: str, shape: tuple, spec_dtype, what: str = "tensor"):
    """The stored shape must be `shape` and the dtype one `accepted_dtypes` allows."""
    stored, dtype = tuple(ckpt.shape(name)), ckpt.dtype(name)
    if stored != shape:
        raise CheckpointError(f"{ckpt.file_of(name)}: {what} {name!r} has shape {stored}, expected "
                              f"{shape} from config")
    if np.dtype(dtype) not in accepted_dtypes(spec_dtype, name):
        raise CheckpointError(_dtype_error(ckpt.file_of(name), name, dtype, spec_dtype, what))


def _reader(ckpt: ShardedCheckpoint, names: np.ndarray, spec: ParamSpec):
    """Callback for make_array_from_callback: reads just the requested slice, in the param's dtype
    (a tensor stored in another accepted float dtype is cast as it is copied out of the memory map,
    so no widened copy of it is made)."""
    lead = names.ndim

    def read(index):
        index = tuple(index) + (slice(None),) * (len(spec.shape) - len(index))
        sub, tail = names[index[:lead]], index[lead:]
        if lead == 0:
            src = ckpt.get(str(sub))[tail]
            out = np.empty(src.shape, spec.dtype)
            out[...] = src
            return out
        first = ckpt.get(sub.reshape(-1)[0])[tail]
        out = np.empty(sub.shape + first.shape, spec.dtype)
        for pos in np.ndindex(sub.shape):
            out[pos] = ckpt.get(sub[pos])[tail]
        return out

    return read


def load_params(directory: str | os.PathLike, cfg: Config, shardings=None,
                progress: bool = False) -> dict:
    """Params from a HF checkpoint dir. `shardings`: a tree of jax.sharding.Sharding like the
    params (default: everything on the first device). `progress`: a tqdm bar in bytes. Every
    float param is then checked for NaN/Inf on the devices (`finite.first_nonfinite`): a
    CheckpointError names the first tensor holding one."""
    specs = flatten(abstract_params(cfg))
    with ShardedCheckpoint(directory) as ckpt:
        sources = check(ckpt, cfg, unflatten(specs))
        return _load(ckpt, specs, sources, shardings, progress)


def load_mtp_params(directory: str | os.PathLike, cfg: Config, shardings=None,
                    progress: bool = False) -> dict:
    """The multi-token-prediction params (`abstract_params(cfg, mtp=True)["mtp"]`: the MTP
    layers stacked) from a HF checkpoint dir, as `load_params` loads the model's. A checkpoint
    without the MTP layer: a CheckpointError saying so (the model itself loads without it)."""
    if not cfg.n_mtp_layers:
        raise CheckpointError(f"{os.fspath(directory)}: no multi-token-prediction layer (config.json "
                              "has num_nextn_predict_layers=0)")
    specs = flatten(abstract_params(cfg, mtp=True)["mtp"])
    with ShardedCheckpoint(directory) as ckpt:
        check(ckpt, cfg)  # the model's tensors, and the MTP tensors that are present
        return _load(ckpt, specs, mtp_sources(ckpt, cfg, specs), shardings, progress)


def has_mtp_layer(ckpt: ShardedCheckpoint, cfg: Config) -> bool:
    """Whether the checkpoint holds tensors of the (first) multi-token-prediction layer."""
    first = f"model.layers.{cfg.n_layers}."
    return bool(cfg.n_mtp_layers) and any(k.startswith(first) for k in ckpt.keys())


def mtp_sources(ckpt: ShardedCheckpoint, cfg: Config, specs: dict) -> dict:
    """{path: HF names (n_mtp_layers, ...)} of the MTP params `specs` (the flattened
    `abstract_params(cfg, mtp=True)["mtp"]`). A CheckpointError when the checkpoint has no MTP
    layer, or lacks one of its tensors."""
    where = ckpt.directory
    if not has_mtp_layer(ckpt, cfg):
        raise CheckpointError(f"{where}: this checkpoint has no multi-token-prediction layer "
                              f"(model.layers.{cfg.n_layers}.*, num_nextn_predict_layers="
                              f"{cfg.n_mtp_layers})")
    sources = {p: hf_names(cfg, ("mtp", *p)) for p in specs}
    for p, names in sources.items():
        for name in names.reshape(-1):
            if name not in ckpt:
                raise CheckpointError(f"{where}: missing MTP tensor {name!r} (expected shape "
                                      f"{tuple(specs[p].shape[names.ndim:])})")
    return sources


def _load(ckpt: ShardedCheckpoint, specs: dict, sources: dict, shardings, progress: bool) -> dict:
    """The params `specs` ({path: ParamSpec}) read from `sources` ({path: HF names}) of a checked
    checkpoint, placed by `shardings`, checked for NaN/Inf."""
    flat_shard = flatten(shardings) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = {}
    with tqdm(total=sum(s.nbytes for s in specs.values()), unit="B", unit_scale=True,
              desc="loading", disable=not progress, leave=False) as bar:
        for path, spec in specs.items():
            sharding = flat_shard.get(path, default)
            out[path] = jax.make_array_from_callback(spec.shape, sharding,
                                                     _reader(ckpt, sources[path], spec))
            bar.update(spec.nbytes)
    bad = first_nonfinite(unflatten(out), {p: sources[p].ndim for p in out})
    if bad is not None:
        path, index = bad
        name = str(sources[path][index])
        raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name!r} "
                              f"{what_is_wrong(specs[path].dtype)}")
    return unflatten(out)
