"""Random, well-conditioned checkpoints in the released HF layout, for any config.

FP8 e4m3 weights + 128x128 `weight_scale_inv` (or bf16), sharded safetensors + index, the MTP
layer included. Each tensor is generated from (seed, tensor name) when its turn comes, so writing
a multi-GB checkpoint holds one tensor in memory at a time. Residual-branch outputs (o_proj,
down_proj) are scaled down so every layer writes a small update, like a trained model.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib

import ml_dtypes
import numpy as np

from dsv32_jax.model.config import Config
from dsv32_jax.model.quant import weight_quant
from dsv32_jax.checkpoint.safetensors import LazyTensor, fsync_dir, fsync_file, write_safetensors
from dsv32_jax.text.tokenizer import build_synthetic_tokenizer
from dsv32_jax.checkpoint.weights import abstract_params, flatten, hf_names, mtp_tensor_specs
from dsv32_jax.dirlock import hold


def tensor_specs(cfg: Config, include_mtp: bool = True) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{HF tensor name: (shape, dtype)} of a checkpoint for `cfg` (the MTP layer optionally)."""
    specs = {}
    for path, spec in flatten(abstract_params(cfg)).items():
        names = hf_names(cfg, path)
        for name in names.reshape(-1):
            specs[str(name)] = (tuple(spec.shape[names.ndim:]), np.dtype(spec.dtype))
    if include_mtp:
        specs.update(mtp_tensor_specs(cfg))
    return specs


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _stddev(name: str, fan_in: int) -> float:
    residual_out = ("o_proj" in name) or ("down_proj" in name)
    return (0.25 if residual_out else 1.0) / np.sqrt(fan_in)


def _make(seed: int, name: str, shape, dtype) -> np.ndarray:
    """Deterministic values for one non-FP8 tensor."""
    base, _, leaf = name.rpartition(".")
    rng = _rng(seed, name)
    if "norm" in base.rsplit(".", 1)[-1]:  # RMSNorm / LayerNorm params
        v = 0.1 * rng.standard_normal(shape) + (0.0 if leaf == "bias" else 1.0)
    elif leaf == "e_score_correction_bias":
        v = 0.01 * rng.standard_normal(shape)
    elif base.endswith("embed_tokens"):
        v = rng.standard_normal(shape, np.float32)
    else:
        v = rng.standard_normal(shape, np.float32) * _stddev(base, shape[-1])
    return v.astype(dtype)


def _fp8_pair(seed: int, base: str, shape) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 weight, fp32 block scales) of FP8 linear `base`; both come from one generator."""
    rng = _rng(seed, base)
    w = rng.standard_normal(shape, np.float32) * _stddev(base, shape[1])
    return weight_quant(w)


def _producer(seed: int, name: str, shape, dtype, specs):
    fp8 = np.dtype(ml_dtypes.float8_e4m3fn)
    if name.endswith(".weight_scale_inv"):
        base = name.removesuffix(".weight_scale_inv")
        w_shape = specs[base + ".weight"][0]
        return lambda: _fp8_pair(seed, base, w_shape)[1]
    if dtype == fp8:
        base = name.removesuffix(".weight")
        return lambda: _fp8_pair(seed, base, shape)[0]
    return lambda: _make(seed, name, shape, dtype)


_MARKER = ".dsv32_synthetic_partial"  # marks a `.partial` directory this writer created


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(cfg: Config, directory: str | os.PathLike, seed: int = 0, n_shards: int = 2,
                     include_mtp: bool = True, include_tokenizer: bool = True) -> str:
    """Write a random checkpoint for `cfg` into `directory` (created; must not exist or be empty),
    with a small tokenizer of our own (`tokenizer.build_synthetic_tokenizer`) unless disabled.

    Written to `directory.partial` (marked as ours; a leftover `.partial` is removed only if it
    carries that mark, else FileExistsError), every file fsynced, then renamed onto `directory`.
    One process at a time: `dsv32_jax.dirlock` (another one gets dirlock.Busy). Returns the
    directory path.
    """
    out = os.fspath(directory)
    with hold(out, "write_checkpoint"):
        return _write(cfg, out, seed, n_shards, include_mtp, include_tokenizer)


def _write(cfg: Config, out: str, seed: int, n_shards: int, include_mtp: bool,
           include_tokenizer: bool) -> str:
    if os.path.islink(out) or (os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out))):
        raise FileExistsError(f"{out}: exists and is not an empty directory")
    tmp = out + ".partial"
    if os.path.lexists(tmp):
        if os.path.islink(tmp) or not os.path.isfile(os.path.join(tmp, _MARKER)):
            raise FileExistsError(f"{tmp}: exists and was not left by write_checkpoint (no {_MARKER}); "
                                  "not deleting it")
        shutil.rmtree(tmp)  # an interrupted earlier write_checkpoint
    os.makedirs(tmp)
    open(os.path.join(tmp, _MARKER), "w").close()
    specs = tensor_specs(cfg, include_mtp)
    names = sorted(specs)
    sizes = [int(np.prod(specs[n][0])) * specs[n][1].itemsize for n in names]
    total = sum(sizes)
    shards: list[list[str]] = [[] for _ in range(max(1, n_shards))]
    acc = 0
    for name, size in zip(names, sizes):  # contiguous, roughly equal-size shards
        shards[min(len(shards) - 1, acc * len(shards) // max(total, 1))].append(name)
        acc += size
    shards = [s for s in shards if s]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: LazyTensor(specs[n][0], specs[n][1], _producer(seed, n, *specs[n], specs))
                   for n in shard}
        write_safetensors(os.path.join(tmp, fname), tensors, {"format": "pt"})  # fsynced
        weight_map.update({n: fname for n in shard})
    _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), cfg.to_hf())
    if include_tokenizer:
        build_synthetic_tokenizer(cfg.vocab_size, tmp)
        for name in os.listdir(tmp):  # its files were written by the tokenizer module
            if name.startswith("tokenizer") and os.path.isfile(os.path.join(tmp, name)):
                fsync_file(os.path.join(tmp, name))
    os.remove(os.path.join(tmp, _MARKER))
    fsync_dir(tmp)
    os.replace(tmp, out)  # onto nothing or an empty directory
    fsync_dir(os.path.dirname(os.path.abspath(out)))
    return out
