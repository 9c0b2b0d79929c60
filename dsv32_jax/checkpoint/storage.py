"""Storage widths of loaded params: the checkpoint's narrow dtypes, or float32 copies on a CPU host.

XLA:CPU has no e4m3 or bf16 dot: it widens a narrow weight to float32 (in software for e4m3, then
a transposed copy for the blockwise FP8 dots) inside every step that reads it, so a decode step
spends most of its time re-widening the same weights. On a CPU host the loader can instead keep a
float32 copy of each narrow weight, made once: a bf16 weight widened (its values are float32
values; the model rounds where the narrow one would be), an FP8 weight dequantized, its e4m3
values times its block scales in float32 (`quant.dequant`), (..., N, K), its scales dropped. Every
product computes the same numbers as with the narrow weights: the FP8 linears of the bf16
numerics are, on the CPU, one float32 product of the dequantized weight whatever the storage
(`layers.fp8_linear`, `quant.dequant_matmul`), and a dequantized weight in the compute dtype is
the same either way (`layers.Linear.dense_weight`). FP8 linears with float32 results keep the
release's blockwise order, which needs the e4m3 values and their scales: for such a config
(`dequantize_for`) the FP8 weights are kept as their e4m3 values in float32, with their scales.
The cost is memory: 4x for e4m3 weights, 2x for bf16 ones (and while loading, the narrow and the
float32 params both).

    "auto"   float32 when every param lives on CPU devices (the placement `load_model` chose),
             else narrow: accelerators keep the checkpoint's widths and their programs are unchanged
    "narrow" the checkpoint's dtypes (a CPU host with a checkpoint too large for 4x)
    "f32"    float32 wherever the params are

The Pallas FP8 kernels (`Config.matmul_impl="pallas"`) read e4m3 bytes: with them "auto" is narrow
and "f32" an error. So do the native CPU kernels (`matmul_impl="native"`, `dsv32_jax.native`): with
them "auto" is "bits", the checkpoint's dtypes with each FP8 weight as its e4m3 bits (uint8, the
same bytes), which XLA:CPU slices out of a layer stack as bytes (an e4m3 stack it widens to fp16
whole first), and "f32" an error.

The token-embedding tables are read by rows, not by a dot, and stay narrow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv32_jax.model.quant import FP8, dequant

STORAGES = ("auto", "narrow", "f32")
NARROW = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.bfloat16))
GATHERED = ("embed", "embed_tokens")  # Embed modules: tables read by rows


def on_cpu(params) -> bool:
    """Whether every param array lives on CPU devices only."""
    return all(d.platform == "cpu" for a in jax.tree_util.tree_leaves(params)
               for d in a.sharding.device_set)


def check(storage: str, pallas: bool = False, native: bool = False) -> None:
    """A ValueError for an unknown storage name, or float32 weights for FP8 kernels."""
    if storage not in STORAGES:
        raise ValueError(f"weight storage must be one of {STORAGES}, got {storage!r}")
    for impl, on in (("pallas", pallas), ("native", native)):
        if storage == "f32" and on:
            raise ValueError(f"weight storage 'f32' with matmul_impl={impl!r}: its FP8 kernels "
                             "read e4m3 weights (use 'narrow' or 'auto')")


def widths(storage: str, params, pallas: bool = False, native: bool = False) -> str:
    """The storage `storage` ("auto" resolved by where the params are and the kernels):
    "narrow", "f32" or "bits" (native)."""
    check(storage, pallas, native)
    if storage == "auto" and native:
        return "bits"
    if storage == "auto":
        return "f32" if on_cpu(params) and not pallas else "narrow"
    return storage


def as_bits(params: dict) -> dict:
    """params with every FP8 leaf as its bits (uint8, the same bytes, on its own sharding)."""
    def leaf(a):
        if jnp.dtype(a.dtype) != FP8:
            return a
        return jax.jit(lambda w: jax.lax.bitcast_convert_type(w, jnp.uint8),
                       out_shardings=a.sharding)(a)

    return jax.tree_util.tree_map(leaf, params)


def scale_name(weight: str) -> str:
    """The block scales' name beside an FP8 weight: `weight` -> `scale`, `w1_weight` -> `w1_scale`."""
    return weight.removesuffix("weight") + "scale"


def widen(params: dict, dequantize: bool = True) -> dict:
    """params with every bf16 leaf but the embedding tables as float32 (the same values) and every
    FP8 weight dequantized to float32, the scales beside it dropped, each on its own sharding,
    one leaf at a time. dequantize=False: the FP8 weights' e4m3 values as float32, scales kept."""
    def tree(t: dict, path: tuple) -> dict:
        out = {}
        for k, a in t.items():
            if isinstance(a, dict):
                out[k] = tree(a, (*path, k))
            elif dequantize and jnp.dtype(a.dtype) == FP8:
                out[k] = jax.jit(lambda w, s: dequant(w, s, jnp.float32),
                                 out_shardings=a.sharding)(a, t[scale_name(k)])
            elif dequantize and any(jnp.dtype(t[w].dtype) == FP8 for w in t
                                    if w != k and scale_name(w) == k):
                continue  # applied to its weight
            elif jnp.dtype(a.dtype) in NARROW and not any(g in path for g in GATHERED):
                out[k] = a.astype(jnp.float32)
            else:
                out[k] = a
        return out

    return tree(params, ())


def dequantize_for(cfg) -> bool:
    """Whether the float32 storage may hold cfg's FP8 weights dequantized: not when its FP8
    linears give float32 results (dtype float32 with fp8_activations; `layers.fp8_linear` keeps
    the blockwise order there, which reads the e4m3 values and their scales)."""
    return not (cfg.fp8_activations and jnp.dtype(cfg.dtype) == jnp.float32)


def store(params: dict, storage: str = "auto", pallas: bool = False,
          dequantize: bool = True, native: bool = False) -> dict:
    """params in the storage `storage` (see the module docstring); dequantize: `widen`'s
    (`dequantize_for` the config)."""
    kind = widths(storage, params, pallas, native)
    if kind == "f32":
        return widen(params, dequantize)
    return as_bits(params) if kind == "bits" else params
