"""Storage widths of loaded params: the checkpoint's narrow dtypes, or float32 copies on a CPU host.

XLA:CPU has no e4m3 or bf16 dot: it widens a narrow weight to float32 (in software for e4m3, then
a transposed copy for the blockwise FP8 dots) inside every step that reads it, so a decode step
spends most of its time re-widening the same weights. On a CPU host the loader can instead keep a
float32 copy of each narrow weight, made once: e4m3 and bf16 values are exactly float32 values, so
every dot computes the same numbers (the model code takes either: an FP8 weight is its e4m3 values
times its block scales whatever the dtype holding them; a widened bf16 weight is rounded where the
narrow one would be). The cost is memory: 4x for e4m3 weights, 2x for bf16 ones (and while loading,
the narrow and the float32 params both). An FP8 weight not placed on a mesh is also stored
`quant.blocked`, (..., K/128, N, 128), the layout of its per-block dots, so no step makes a
transposed copy of it (placed on a mesh it keeps its (..., N, K) shape, which its sharding names).

    "auto"   float32 when every param lives on CPU devices (the placement `load_model` chose),
             else narrow: accelerators keep the checkpoint's widths and their programs are unchanged
    "narrow" the checkpoint's dtypes (a CPU host with a checkpoint too large for 4x)
    "f32"    float32 wherever the params are

The Pallas FP8 kernels (`Config.matmul_impl="pallas"`) read e4m3 bytes: with them "auto" is narrow
and "f32" an error.

The token-embedding tables are read by rows, not by a dot, and stay narrow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv32_jax.model.config import BLOCK
from dsv32_jax.model.quant import FP8, blocked

STORAGES = ("auto", "narrow", "f32")
NARROW = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.bfloat16))
GATHERED = ("embed", "embed_tokens")  # Embed modules: tables read by rows


def on_cpu(params) -> bool:
    """Whether every param array lives on CPU devices only."""
    return all(d.platform == "cpu" for a in jax.tree_util.tree_leaves(params)
               for d in a.sharding.device_set)


def check(storage: str, pallas: bool = False) -> None:
    """A ValueError for an unknown storage name, or float32 weights for the Pallas FP8 kernels."""
    if storage not in STORAGES:
        raise ValueError(f"weight storage must be one of {STORAGES}, got {storage!r}")
    if storage == "f32" and pallas:
        raise ValueError("weight storage 'f32' with matmul_impl='pallas': the Pallas FP8 kernels "
                         "read e4m3 weights (use 'narrow' or 'auto')")


def widths(storage: str, params, pallas: bool = False) -> str:
    """The storage `storage` ("auto" resolved by where the params are): "narrow" or "f32"."""
    check(storage, pallas)
    if storage == "auto":
        return "f32" if on_cpu(params) and not pallas else "narrow"
    return storage


def widen(params: dict) -> dict:
    """params with every e4m3 / bf16 leaf but the embedding tables as float32 (the same values),
    each on its own sharding, one leaf at a time; e4m3 ones not on a mesh `quant.blocked`."""
    def leaf(path, a):
        keys = [getattr(k, "key", None) for k in path]
        if jnp.dtype(a.dtype) not in NARROW or any(k in GATHERED for k in keys):
            return a
        wide = a.astype(jnp.float32)
        single = isinstance(a.sharding, jax.sharding.SingleDeviceSharding)
        if a.dtype == FP8 and a.shape[-1] % BLOCK == 0 and single:
            return jax.jit(blocked)(wide)
        return wide

    return jax.tree_util.tree_map_with_path(leaf, params)


def store(params: dict, storage: str = "auto", pallas: bool = False) -> dict:
    """params in the storage `storage` (see the module docstring)."""
    return widen(params) if widths(storage, params, pallas) == "f32" else params
