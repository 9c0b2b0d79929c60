"""Basic layers: FP8 block-scaled / plain Linear, RMSNorm with fused residual, LayerNorm, Embed.

Params are stored in the checkpoint's dtypes (e4m3 + float32 scales, bf16 otherwise) and every
param carries logical axis names (see `sharding.rules`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsv32_jax.model.config import BLOCK, Config, cdiv
from dsv32_jax.model.quant import (FP32_BY_SPEC, FP8, HIGHEST, act_f32, act_quant,
                                   blockwise_matmul, dequant, dequant_matmul, einsum, to_f32)
from dsv32_jax import native
from pallas_kernels.common import from_bits
from pallas_kernels.fp8_linear import fp8_linear as pallas_fp8_linear

Axes = tuple[str, ...]


def param(module: nn.Module, name: str, shape, dtype, axes: Axes, init):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def normal_init(stddev: float):
    def init(key, shape, dtype):
        return (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return init


def fp8_init(key, shape, dtype):
    """Random e4m3 weights ~N(0, 1); the matching scale init sets the real magnitude."""
    return jnp.clip(jax.random.normal(key, shape, jnp.float32), -8, 8).astype(dtype)


def const_init(value: float):
    def init(key, shape, dtype):
        return jnp.full(shape, value, dtype)
    return init


def pick_sum(rows: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_k weights[n, k] * rows[n, k] in float32: rows (N, k, D), weights (N, k) -> (N, D).
    The routed picks' combine (float32 by the spec)."""
    return jnp.einsum("nkd,nk->nd", rows.astype(jnp.float32), weights.astype(jnp.float32),
                      precision=HIGHEST)


class Linear(nn.Module):
    """y = x @ W^T with W (out, in). FP8 W (`quantized`) keeps e4m3 weight + 128x128 `scale`, or
    (a CPU host's float32 storage, `checkpoint.storage`) the float32 W * scale and no `scale`.

    With cfg.fp8_activations the input is quantized per 128-block and the product is the
    blockwise sum of the release (`fp8_linear`); otherwise W is dequantized to the compute dtype.
    `f32=True` computes in float32 whatever the compute dtype (router, indexer weights, head).
    """

    cfg: Config
    in_features: int
    features: int
    axes: Axes  # logical names of (out, in)
    quantized: bool = False
    f32: bool = False

    def setup(self):
        n, k = self.features, self.in_features
        if self.quantized and self.dequantized():  # the host's float32 W * scale (out, in)
            self.weight = param(self, "weight", (n, k), jnp.float32, self.axes, fp8_init)
            self.scale = None
        elif self.quantized:  # (out, in) e4m3
            self.weight = param(self, "weight", (n, k), FP8, self.axes, fp8_init)
            self.scale = param(self, "scale", (cdiv(n, BLOCK), cdiv(k, BLOCK)), jnp.float32,
                               self.axes, const_init(k**-0.5))  # (out/128, in/128) f32
        else:
            self.weight = param(self, "weight", (n, k), jnp.bfloat16, self.axes, normal_init(k**-0.5))

    def dequantized(self) -> bool:
        """Whether the FP8 weight is stored dequantized (`checkpoint.storage`): a weight, no scale."""
        return self.has_variable("params", "weight") and not self.has_variable("params", "scale")

    @property
    def dtype(self):
        return jnp.float32 if self.f32 else jnp.dtype(self.cfg.dtype)

    def dense_weight(self) -> jax.Array:
        """W (out, in) in the compute dtype (dequantized if FP8; lowered for the CPU, its e4m3
        values widened by `quant.to_f32`, the same values, where XLA:CPU's convert is software)."""
        if self.quantized and self.scale is not None:
            def cpu(w, s):
                return dequant(to_f32(from_bits(w)), s, self.dtype)

            def default(w, s):
                return dequant(from_bits(w), s, self.dtype)

            return jax.lax.platform_dependent(self.weight, self.scale, cpu=cpu, default=default)
        return self.weight.astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quantized and self.cfg.fp8_activations:
            return fp8_linear(x, self.weight, self.scale, self.cfg.scale_fmt, self.dtype,
                              self.cfg.matmul_impl)
        if self.f32 and not self.quantized:  # bf16 weight used in float32, widened in chunks
            return f32_matmul(x, self.weight, self.cfg.matmul_impl == "native")
        return matmul(x, self.dense_weight(), self.dtype)


def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x (..., K) @ w (N, K)^T in `dtype`, float32 accumulation.

    A float32 w in a bf16 product is a widened bf16 weight (`checkpoint.storage`): it holds bf16
    values, so x is rounded to bf16 and the dot taken in float32, the products `einsum` forms on
    the CPU for bf16 operands (exact in float32), with no per-step narrowing of w."""
    if jnp.dtype(dtype) == jnp.bfloat16 and w.dtype == jnp.float32:
        return einsum("...k,nk->...n", x.astype(dtype), w, jnp.float32, dtype)
    return einsum("...k,nk->...n", x, w, dtype)


def fp8_linear(x: jax.Array, w: jax.Array, s: jax.Array | None, scale_fmt, dtype,
               impl: str = "xla", index: tuple = ()) -> jax.Array:
    """act_quant(x) (..., K) times FP8 w (N, K) with block scales s (N/128, K/128), blockwise:
    `quant.blockwise_matmul` (impl "xla") or the Pallas kernel `pallas_kernels.fp8_linear`.

    Lowered for the CPU with a bf16 result, impl "xla" is `quant.dequant_matmul`, w dequantized in
    the step a block of rows at a time (`jax.lax.platform_dependent`): the same sum in another
    float32 order, rounded to bf16 after. A float32 result keeps the blockwise order everywhere (an e4m3 re-quantization
    downstream would carry its last-bit differences: tests/test_parity.py's float32 checks).
    s None: w is stored dequantized in float32 (`checkpoint.storage`, a bf16 result only) and goes
    to `quant.dequant_matmul`. w may be given as its e4m3 bits (uint8: the storage of impl
    "native", which XLA:CPU slices without widening). Impl "native" (bf16 results): lowered for
    the CPU, up to `native.GEMV_ROWS` rows go to the C++ kernel (`native.gemv`: the dequantized
    activations times the stored e4m3 weight and its scales, float32 sums in another order), more
    rows and other platforms as "xla". index: w and s are stacks (L..., N, K) / (L..., N/128,
    K/128) and the weight is w[index] (the routed experts' [layer, e]), which the native kernel
    reads in place and the others slice out."""
    n, k = w.shape[-2], x.shape[-1]
    lead = x.shape[:-1]
    if impl not in ("xla", "pallas", "native"):
        raise ValueError(f"fp8_linear: unknown impl {impl!r} (xla, pallas, native)")
    if s is None and impl != "xla":
        raise ValueError(f"fp8_linear: impl {impl!r} reads e4m3 weights and their scales, not a "
                         "dequantized float32 weight")
    if index and impl != "native":
        w, s, index = w[index], (None if s is None else s[index]), ()
    xq, xs = act_quant(x.reshape(-1, k), scale_fmt)
    if s is None:
        y = dequant_matmul(xq, xs, w)
    elif impl == "pallas":
        y = pallas_fp8_linear(xq, xs, from_bits(w), s)
    elif jnp.dtype(dtype) == jnp.float32:  # the release's order: see the docstring
        y = blockwise_matmul(xq, xs, from_bits(w), s)
    else:
        def cpu(xq, xs, w, s, *index):
            if impl == "native" and xq.shape[0] <= native.GEMV_ROWS:
                return native.gemv(act_f32(xq, xs), w, s, index)
            return dequant_matmul(xq, xs, from_bits(w[index]), s[index])

        def default(xq, xs, w, s, *index):
            return blockwise_matmul(xq, xs, from_bits(w[index]), s[index])

        y = jax.lax.platform_dependent(xq, xs, w, s, *index, cpu=cpu, default=default)
    return y.reshape(*lead, n).astype(dtype)


# Weight rows widened to float32 at once by f32_matmul (the head: 2048 x 7168 f32 = 56 MiB).
WIDEN_ROWS = 2048


def f32_matmul(h: jax.Array, w: jax.Array, native_rows: bool = False) -> jax.Array:
    """float32 h (..., D) @ w (V, D)^T for a bf16 w used in float32 (the head, the indexer's
    weights_proj): w is widened WIDEN_ROWS rows at a time, so no float32 copy of a whole
    (129280, 7168) head exists; a w stored widened (`checkpoint.storage`) is one dot.
    native_rows (matmul_impl "native"): lowered for the CPU, up to `native.GEMV_ROWS` rows of h
    times a bf16 w go to the C++ kernel (`native.gemv`, w read as stored)."""
    v, d = w.shape
    lead = h.shape[:-1]
    x = h.reshape(-1, d).astype(jnp.float32)
    with jax.named_scope(FP32_BY_SPEC):
        if native_rows and w.dtype == jnp.bfloat16 and x.shape[0] <= native.GEMV_ROWS:
            return jax.lax.platform_dependent(
                x, w, cpu=native.gemv,
                default=lambda x, w: f32_matmul(x, w)).reshape(*lead, v)
        if v <= WIDEN_ROWS or w.dtype == jnp.float32:
            return matmul(x, w, jnp.float32).reshape(*lead, v)
        n = cdiv(v, WIDEN_ROWS)

        def chunk(i, out):  # the last chunk is shifted back to end at V (overlap recomputed)
            start = jnp.minimum(i * WIDEN_ROWS, v - WIDEN_ROWS)
            wc = jax.lax.dynamic_slice_in_dim(w, start, WIDEN_ROWS, 0)
            return jax.lax.dynamic_update_slice_in_dim(out, matmul(x, wc, jnp.float32), start, 1)

        out = jax.lax.fori_loop(0, n, chunk, jnp.zeros((x.shape[0], v), jnp.float32))
        return out.reshape(*lead, v)


class RMSNorm(nn.Module):
    """w * h / sqrt(mean(h^2) + eps) in float32, h = x (+ residual, fused; returned in x.dtype)."""

    eps: float
    axis: str

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array | None = None):
        w = param(self, "weight", (x.shape[-1],), jnp.bfloat16, (self.axis,), const_init(1.0))
        h = x.astype(jnp.float32)
        if residual is not None:
            h = h + residual.astype(jnp.float32)
        y = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        y = (w.astype(jnp.float32) * y).astype(x.dtype)
        return y if residual is None else (y, h.astype(x.dtype))


class LayerNorm(nn.Module):
    """Standard LayerNorm (weight and bias) in float32, output in x.dtype."""

    eps: float
    axis: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        w = param(self, "weight", (d,), jnp.bfloat16, (self.axis,), const_init(1.0))
        b = param(self, "bias", (d,), jnp.bfloat16, (self.axis,), const_init(0.0))
        h = x.astype(jnp.float32)
        mu = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
        y = (h - mu) * jax.lax.rsqrt(var + self.eps) * w.astype(jnp.float32) + b.astype(jnp.float32)
        return y.astype(x.dtype)


class Embed(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        w = param(self, "weight", (cfg.vocab_size, cfg.dim), jnp.bfloat16, ("vocab", "embed"),
                  normal_init(1.0))
        return jnp.take(w, tokens, axis=0).astype(cfg.dtype)
