"""FP8 numerics of the release: act_quant, 128x128 weight dequant, block-scaled matmul, Hadamard.

All functions are pure jnp; scales are float32 and multiply (the HF name is `weight_scale_inv`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.model.config import BLOCK

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
HIGHEST = jax.lax.Precision.HIGHEST


def pow2_ceil(s: jax.Array) -> jax.Array:
    """2**ceil(log2(s)) for positive normal float32 s, exactly (exponent bits, no log2 rounding)."""
    bits = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(exponent << 23, jnp.float32)


def act_quant(x: jax.Array, scale_fmt: str | None, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """Per-token, per-`block` quantization of the last axis to e4m3.

    x: (..., K) with K % block == 0 -> (x_q: (..., K) float8_e4m3fn, s: (..., K // block) float32),
    x ~= x_q * s. amax is floored at 1e-4; with scale_fmt="ue8m0" s is rounded up to a power of two.
    """
    *lead, k = x.shape
    if k % block:
        raise ValueError(f"act_quant: last axis {k} is not a multiple of the block size {block}")
    xb = x.astype(jnp.float32).reshape(*lead, k // block, block)
    amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1), AMAX_FLOOR)
    s = amax * jnp.float32(1.0 / FP8_MAX)
    if scale_fmt == "ue8m0":
        s = pow2_ceil(s)
    elif scale_fmt is not None:
        raise ValueError(f"act_quant: unknown scale_fmt {scale_fmt!r}")
    xq = jnp.clip(xb / s[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
    return xq.reshape(x.shape), s


def act_dequant(x_q: jax.Array, s: jax.Array, dtype) -> jax.Array:
    """act_quant's inverse: x_q (..., K) e4m3 times its per-128-block scales s (..., K/128)."""
    *lead, k = x_q.shape
    y = x_q.astype(jnp.float32).reshape(*lead, k // BLOCK, BLOCK) * s[..., None]
    return y.reshape(x_q.shape).astype(dtype)


def quant_dequant(x: jax.Array, scale_fmt: str | None) -> jax.Array:
    """x through act_quant and back, in x's dtype (the FP8 latent-cache simulation)."""
    return act_dequant(*act_quant(x, scale_fmt), x.dtype)


def expand_scale(scale: jax.Array, out_features: int, in_features: int) -> jax.Array:
    """(..., ceil(out/128), ceil(in/128)) block scales -> (..., out, in), partial edge blocks cut."""
    s = jnp.repeat(jnp.repeat(scale, BLOCK, axis=-2), BLOCK, axis=-1)
    return s[..., :out_features, :in_features]


def dequant(weight: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """FP8 weight (..., out, in) with 128x128 block scales -> `dtype` (product taken in float32)."""
    out_f, in_f = weight.shape[-2:]
    w = weight.astype(jnp.float32) * expand_scale(scale.astype(jnp.float32), out_f, in_f)
    return w.astype(dtype)


def block_scaled_matmul(x_q, x_s, w_q, w_s, dot=None) -> jax.Array:
    """y = sum_b (x_q[:, b] . w_q[:, b]) * x_s[:, b] * w_s[., b], accumulated in float32.

    x_q: (M, K) fp8, x_s: (M, K/128) f32; w_q: (N, K) fp8 (or (E, N, K) with a grouped `dot`);
    w_s: (N/128, K/128) block scales, or (M, N/128, K/128) gathered per row for grouped experts.
    `dot(xb, wb) -> (M, N)` multiplies one 128-wide K block (default: a dense matmul). Scanned
    over K blocks, so the extra memory is O(M*N).
    """
    m, k = x_q.shape
    n, nb = w_q.shape[-2], k // BLOCK
    xb = x_q.reshape(m, nb, BLOCK).transpose(1, 0, 2)  # (nb, M, 128)
    wb = jnp.moveaxis(w_q.reshape(*w_q.shape[:-1], nb, BLOCK), -2, 0)  # (nb, [E,] N, 128)
    if dot is None:
        def dot(a, b):
            return jnp.einsum("mk,nk->mn", a.astype(jnp.float32), b.astype(jnp.float32),
                              precision=HIGHEST)

    def step(acc, blk):
        a, b, sa, sb = blk  # sb: (N/128,) or (M, N/128)
        sb = jnp.repeat(sb, BLOCK, axis=-1)[..., :n]
        return acc + dot(a, b) * sa[:, None] * sb, None

    blocks = (xb, wb, x_s.T, jnp.moveaxis(w_s, -1, 0))
    acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32), blocks)
    return acc


def hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester-ordered Hadamard matrix H_n / sqrt(n) (n a power of two), float32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / math.sqrt(n)).astype(np.float32)


def hadamard(x: jax.Array) -> jax.Array:
    """x @ H/sqrt(n) over the last axis (an orthonormal rotation), computed in float32."""
    h = jnp.asarray(hadamard_matrix(x.shape[-1]))
    return jnp.einsum("...i,ij->...j", x.astype(jnp.float32), h, precision=HIGHEST).astype(x.dtype)
