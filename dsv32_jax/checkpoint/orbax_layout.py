"""The converted checkpoint layout (written by `convert`, read by `load_model`).

A converted directory holds::

    config.json      the model config (bf16 output: without quantization_config)
    manifest.json    what was converted, from what, with which options (see `convert`)
    params/          an Orbax PyTree checkpoint of the param tree (`weights.abstract_params`)
    mtp/             optional: the multi-token-prediction layer, another Orbax PyTree checkpoint
    tokenizer files  copied from the source

Each Orbax checkpoint uses Orbax's non-OCDBT layout with zarr v2 arrays: one array directory per
leaf, named by the '.'-joined tree path, plus Orbax's `_METADATA` (tree structure) and
`_CHECKPOINT_METADATA`. The converter creates the arrays with tensorstore and fills them chunk by
chunk (a chunk is a few stacked experts / layers, or a row block of one big tensor), so it never
holds a whole stacked param; restoring goes through `orbax.checkpoint`, which reads each device's
shard of each leaf straight into an array with the requested sharding. Chunks are stored
uncompressed; dtypes are stored natively (float8_e4m3fn, bfloat16, float32), so the round trip is
bit-exact.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dsv32_jax.files import read_regular
from dsv32_jax.model.config import Config
from dsv32_jax.checkpoint.finite import first_nonfinite, what_is_wrong
from dsv32_jax.checkpoint.weights import Path, abstract_params, flatten, hf_names, unflatten

PARAMS_DIR = "params"
MTP_DIR = "mtp"
MANIFEST = "manifest.json"
FORMAT = "dsv32-jax-orbax"
FORMAT_VERSION = 1
_PYTREE_METADATA = "_METADATA"
_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
_DICT_KEY = 2  # Orbax's key_type for dict keys


class OrbaxCheckpointError(ValueError):
    """A converted checkpoint that is incomplete or does not match the model config."""


# ---- layout -----------------------------------------------------------------------------------
def array_name(path: Path) -> str:
    """The leaf's array directory name: Orbax names a leaf by its '.'-joined key path."""
    for k in path:
        if not k or "." in k or "/" in k:
            raise ValueError(f"param path {path!r}: keys must be non-empty and contain no '.' or '/'")
    return ".".join(path)


def array_spec(ckpt_dir: str | os.PathLike, path: Path) -> dict:
    return {"driver": "zarr",
            "kvstore": {"driver": "file", "path": os.path.join(os.fspath(ckpt_dir), array_name(path))}}


def write_context(fsync: bool = False):
    """A tensorstore context for writing arrays. fsync=False skips the fsync after every chunk (the
    converter syncs once at the end and checks chunks by CRC when it resumes)."""
    import tensorstore as ts

    return ts.Context({"file_io_sync": bool(fsync)})


def create_array(ckpt_dir: str | os.PathLike, path: Path, shape, dtype, chunks, *,
                 open_existing: bool = False, context=None):
    """A writable tensorstore zarr array for leaf `path` (uncompressed, C order).

    open_existing: reopen an array a previous (interrupted) run created, if its metadata is the same;
    otherwise any existing array at that place is replaced. context: a tensorstore Context (e.g.
    `write_context()`), shared by the arrays of one writer."""
    import tensorstore as ts

    spec = array_spec(ckpt_dir, path)
    spec.update(metadata={"shape": [int(d) for d in shape], "chunks": [int(c) for c in chunks],
                          "compressor": None, "dimension_separator": ".", "order": "C"},
                store_data_equal_to_fill_value=True)
    kw = dict(open=True, create=True) if open_existing else dict(create=True, delete_existing=True)
    if context is not None:
        kw["context"] = context
    return ts.open(spec, dtype=ts.dtype(np.dtype(dtype)), **kw).result()


def open_array(ckpt_dir: str | os.PathLike, path: Path):
    """Open a stored leaf read-only (metadata is read; data is read on demand)."""
    import tensorstore as ts

    try:
        return ts.open(array_spec(ckpt_dir, path), open=True, read=True).result()
    except ValueError as e:
        raise OrbaxCheckpointError(f"{ckpt_dir}: cannot open array {array_name(path)!r} for param "
                                   f"{'/'.join(path)}: {e}") from None


def write_tree_metadata(ckpt_dir: str | os.PathLike, chunks: Mapping[Path, tuple[int, ...]],
                        custom: dict | None = None) -> None:
    """Orbax's PyTree metadata for the leaves `chunks` maps (path -> chunk shape; all jax.Array).

    The same JSON Orbax's PyTreeCheckpointHandler writes for a non-OCDBT, zarr v2 save of nested
    dicts (a layout every orbax-checkpoint release reads; `tests/test_convert.py` compares it with
    what the installed Orbax writes). `write_shape` is the shape the writer wrote at a time.
    """
    tree = {}
    for path, ch in chunks.items():
        array_name(path)
        tree[str(tuple(path))] = {
            "key_metadata": [{"key": k, "key_type": _DICT_KEY} for k in path],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                               "write_shape": [int(c) for c in ch]}}
    meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
    now = time.time_ns()
    step = {"init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
            "custom_metadata": dict(custom or {})}
    for name, obj in ((_PYTREE_METADATA, meta), (_CHECKPOINT_METADATA, step)):
        with open(os.path.join(ckpt_dir, name), "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())


def stored_leaves(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Leaf paths listed in an Orbax checkpoint's `_METADATA`."""
    p = os.path.join(ckpt_dir, _PYTREE_METADATA)
    try:
        meta = json.loads(read_regular(p))
        return [tuple(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()]
    except FileNotFoundError:
        raise OrbaxCheckpointError(f"{ckpt_dir}: no {_PYTREE_METADATA} (not a complete Orbax "
                                   "checkpoint)") from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise OrbaxCheckpointError(f"{p}: not valid Orbax PyTree metadata ({e!r})") from None


# ---- the converted directory ------------------------------------------------------------------
def is_orbax_dir(path: str | os.PathLike) -> bool:
    """A directory `convert` produced (manifest.json, config.json and params/_METADATA)."""
    p = os.fspath(path)
    return (os.path.isfile(os.path.join(p, MANIFEST)) and os.path.isfile(os.path.join(p, "config.json"))
            and os.path.isfile(os.path.join(p, PARAMS_DIR, _PYTREE_METADATA)))


def read_manifest(path: str | os.PathLike) -> dict:
    p = os.path.join(os.fspath(path), MANIFEST)
    try:
        m = json.loads(read_regular(p))
    except (OSError, ValueError, RecursionError) as e:
        raise OrbaxCheckpointError(f"{p}: cannot read the manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise OrbaxCheckpointError(f"{p}: not a {FORMAT} manifest")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise OrbaxCheckpointError(f"{p}: format_version {m['format_version']} is newer than this "
                                   f"dsv32_jax reads ({FORMAT_VERSION}); upgrade dsv32_jax")
    return m


def load_config(path: str | os.PathLike, **overrides) -> Config:
    """The Config of a converted directory. For bf16 output the activation-scale format of the FP8
    source (recorded in the manifest) is kept, so FP8 activation simulation (indexer, latent cache)
    is unchanged."""
    m = read_manifest(path)
    kw = {}
    if "activation_scale_fmt" in m:
        kw["scale_fmt"] = m["activation_scale_fmt"]
    kw.update(overrides)
    return Config.from_hf(os.fspath(path), **kw)


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _check_stored(ckpt_dir: str, specs: Mapping[Path, Any]) -> None:
    """Stored leaves, shapes and dtypes must equal the expected ones (Orbax would pad/truncate)."""
    stored = set(stored_leaves(ckpt_dir))
    missing = sorted(set(specs) - stored)
    extra = sorted(stored - set(specs))
    if missing or extra:
        show = lambda ps: [".".join(p) for p in ps[:5]] + (["..."] if len(ps) > 5 else [])  # noqa: E731
        raise OrbaxCheckpointError(
            f"{ckpt_dir}: stored params do not match the config: missing {show(missing)}, "
            f"unexpected {show(extra)} (converted with another config or --weights mode?)")
    for path, spec in specs.items():
        arr = open_array(ckpt_dir, path)
        shape, dtype = tuple(arr.shape), np.dtype(arr.dtype.numpy_dtype)
        if shape != tuple(spec.shape) or dtype != np.dtype(spec.dtype):
            raise OrbaxCheckpointError(
                f"{ckpt_dir}: param {'/'.join(path)} is stored as {dtype.name}{list(shape)}, the config "
                f"expects {np.dtype(spec.dtype).name}{list(spec.shape)}")


def restore_tree(ckpt_dir: str | os.PathLike, specs: Mapping[Path, Any], shardings=None,
                 restore_concurrent_gb: int | None = None, progress: bool = False) -> dict:
    """Restore an Orbax PyTree checkpoint with orbax-checkpoint into arrays placed as requested.

    specs: {path: object with .shape/.dtype}. shardings: a nested dict like the tree, or a flat
    {path: Sharding}; missing entries (or None) mean the first device. Each leaf is read shard by
    shard into its sharding's devices; no full host copy of the tree is built first.
    progress: show a tqdm bar in bytes on stderr. The tree is then restored in groups of leaves
    (each big leaf alone, small ones together; Orbax partial restores), updating the bar after
    each group; the arrays are the same as from the one-call restore.
    """
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    _check_stored(ckpt_dir, specs)
    flat_sh = {}
    if shardings is not None:
        flat_sh = dict(shardings) if all(isinstance(k, tuple) for k in shardings) else flatten(shardings)
    default = _default_sharding()
    flat_target = {p: jax.ShapeDtypeStruct(tuple(s.shape), np.dtype(s.dtype),
                                           sharding=flat_sh.get(p) or default)
                   for p, s in specs.items()}
    if not progress:
        handler = (ocp.StandardCheckpointHandler(restore_concurrent_gb=restore_concurrent_gb)
                   if restore_concurrent_gb else ocp.StandardCheckpointHandler())
        ckptr = ocp.Checkpointer(handler)
        try:
            return ckptr.restore(ckpt_dir, args=ocp.args.StandardRestore(unflatten(flat_target)))
        finally:
            ckptr.close()
    from tqdm import tqdm

    handler = (ocp.PyTreeCheckpointHandler(restore_concurrent_gb=restore_concurrent_gb)
               if restore_concurrent_gb else ocp.PyTreeCheckpointHandler())
    ckptr = ocp.Checkpointer(handler)
    out = {}
    nbytes = {p: math.prod(t.shape) * t.dtype.itemsize for p, t in flat_target.items()}
    try:
        with tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"restoring {os.path.basename(ckpt_dir)}", leave=False,
                  dynamic_ncols=True) as bar:
            for group in _restore_groups(nbytes):
                sub = unflatten({p: flat_target[p] for p in group})
                args = ocp.args.PyTreeRestore(
                    item=sub, restore_args=ocp.checkpoint_utils.construct_restore_args(sub),
                    partial_restore=True)
                got = flatten(ckptr.restore(ckpt_dir, args=args))
                if set(got) != set(group):  # an internal invariant: exactly the requested leaves
                    raise OrbaxCheckpointError(f"{ckpt_dir}: a partial restore of {len(group)} leaves "
                                               f"returned {len(got)}")
                out.update(got)
                bar.set_postfix_str(".".join(group[-1]), refresh=False)
                bar.update(sum(nbytes[p] for p in group))
    finally:
        ckptr.close()
    return unflatten({p: out[p] for p in flat_target})


def _restore_groups(nbytes: Mapping[Path, int], parts: int = 64) -> list[list[Path]]:
    """Leaves in tree order, cut into groups of at least 1/`parts` of the total bytes (a big leaf
    alone), so the progress bar moves about `parts` times."""
    target = max(1, sum(nbytes.values()) // parts)
    groups, cur, size = [], [], 0
    for p in sorted(nbytes):
        cur.append(p)
        size += nbytes[p]
        if size >= target:
            groups.append(cur)
            cur, size = [], 0
    if cur:
        groups.append(cur)
    return groups


def restore_params(path: str | os.PathLike, cfg: Config, shardings=None, **kw) -> dict:
    """The model params of a converted directory, as `abstract_params(cfg)` describes them;
    checked for NaN/Inf on the devices (OrbaxCheckpointError naming the first tensor with one)."""
    specs = flatten(abstract_params(cfg))
    params = restore_tree(os.path.join(os.fspath(path), PARAMS_DIR), specs, shardings, **kw)
    names = {p: hf_names(cfg, p) for p in specs}
    bad = first_nonfinite(params, {p: n.ndim for p, n in names.items()})
    if bad is not None:
        p, index = bad
        at = f" [{', '.join(map(str, index))}]" if index else ""
        raise OrbaxCheckpointError(
            f"{os.path.join(os.fspath(path), PARAMS_DIR)}: param {'/'.join(p)}{at} (converted from "
            f"{str(names[p][index])!r}) {what_is_wrong(specs[p].dtype)}")
    return params


def restore_mtp(path: str | os.PathLike, shardings=None, **kw) -> dict:
    """The multi-token-prediction params of a directory converted with --include-mtp, as
    `abstract_params(cfg, mtp=True)["mtp"]` describes them for its config (`load_config`).

    Tree: `block` (a MoE decoder block's params, like `moe_layers`, stacked over MTP layers) and
    the MTP-only modules under their HF names (`enorm`, `hnorm`, `eh_proj`, `shared_head`,
    `embed_tokens`), each with a leading MTP-layer axis; FP8 `weight_scale_inv` is `scale`."""
    m = read_manifest(path)
    if not m.get("mtp"):
        raise OrbaxCheckpointError(f"{path}: converted without the MTP layer (use --include-mtp)")
    specs = flatten(abstract_params(load_config(path), mtp=True)["mtp"])
    return restore_tree(os.path.join(os.fspath(path), MTP_DIR), specs, shardings, **kw)
