"""Numerics of the release: act_quant, 128x128 weight dequant, block-scaled matmul, Hadamard, and
the one dot helper (`einsum`) whose operand types follow the platform being lowered for.

All functions are pure jnp; scales are float32 and multiply (the HF name is `weight_scale_inv`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.model.config import BLOCK, cdiv
from pallas_kernels.fp8_linear import fp8_linear_reference

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
HIGHEST = jax.lax.Precision.HIGHEST
# The named scope of the dots the release computes in float32 whatever the activations (router,
# lm_head, indexer weights_proj): a compiled bf16 program has no other float32 dot.
FP32_BY_SPEC = "fp32_by_spec"


MATMUL = "...k,nk->...n"  # x (..., K) @ w (N, K)^T: every linear layer's product
# Up to this many rows, `einsum` on the CPU takes a MATMUL one row at a time (`rows_dot`).
GEMV_ROWS = 4


def precision(dtype) -> jax.lax.Precision | None:
    """float32 operands at full float32 precision (no TF32 / bf16 passes); others as they are."""
    return HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype, out_dtype=None) -> jax.Array:
    """Two-operand einsum with operands in `dtype`, float32 accumulation, result in `out_dtype`
    (default `dtype`).

    bf16 operands stay bf16 on an accelerator (its bf16 tensor cores); XLA:CPU lacks some
    bf16 x bf16 -> f32 dots, so there they are widened to float32 per op (the same math: bf16
    products are exact in float32). The choice is `jax.lax.platform_dependent`, made for the
    platform the program is lowered for, so an H100 program compiled on a CPU host holds the bf16
    dots. e4m3 operands are widened on the CPU too (`to_f32`). float32 operands use full float32
    precision."""
    dtype = jnp.dtype(dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    by_rows = spec == MATMUL and 1 < math.prod(a.shape[:-1]) <= GEMV_ROWS

    def dot(x, y):
        return jnp.einsum(spec, x, y, precision=precision(x.dtype), preferred_element_type=jnp.float32)

    def cpu(x, y):
        x, y = to_f32(x), to_f32(y)
        return rows_dot(dot, x, y) if by_rows else dot(x, y)

    if dtype in (jnp.bfloat16, FP8) or by_rows:
        y = jax.lax.platform_dependent(a, b, cpu=cpu, default=dot)
    else:
        y = dot(a, b)
    return y.astype(dtype if out_dtype is None else out_dtype)


def to_f32(x: jax.Array) -> jax.Array:
    """x as float32, the same values; e4m3 through `e4m3_to_f32`."""
    return e4m3_to_f32(x) if x.dtype == FP8 else x.astype(jnp.float32)


@jax.custom_jvp
def e4m3_to_f32(x: jax.Array) -> jax.Array:
    """e4m3 x as float32 by integer ops on its bits: XLA:CPU converts e4m3 in software, value by
    value, at several times the cost (an indexer key tile per layer per step). Normal values
    (exponent field E > 0): the 7 low bits moved up to float32's exponent/mantissa fields give
    the value times 2**-120; subnormal (E = 0): mantissa * 2**-9; 0x7F: NaN. Differentiates as
    a convert."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.int32)
    mag = b & 0x7F
    normal = jax.lax.bitcast_convert_type(mag << 20, jnp.float32) * jnp.float32(2.0**120)
    v = jnp.where(mag >= 8, normal, (b & 7).astype(jnp.float32) * jnp.float32(2.0**-9))
    v = jnp.where(mag == 0x7F, jnp.nan, v)
    return jnp.where(b >= 0x80, -v, v)


e4m3_to_f32.defjvp(lambda x, t: (e4m3_to_f32(x[0]), t[0].astype(jnp.float32)))


def rows_dot(dot, x: jax.Array, w: jax.Array) -> jax.Array:
    """dot(x, w) of the MATMUL spec, x (..., K) taken one row at a time: XLA:CPU's matrix-vector
    product (a decode step's one-row dot) costs a fraction of its matrix-matrix product at 2 to
    GEMV_ROWS rows (a speculative verify, a short chunk), and each row gets the bits its one-row
    product gives."""
    rows = x.reshape(-1, x.shape[-1])
    return jnp.stack([dot(r, w) for r in rows]).reshape(*x.shape[:-1], w.shape[0])


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


def expand_scale(scale, out_features: int, in_features: int, xp=jnp):
    """(..., ceil(out/128), ceil(in/128)) block scales -> (..., out, in), partial edge blocks cut."""
    s = xp.repeat(xp.repeat(scale, BLOCK, axis=-2), BLOCK, axis=-1)
    return s[..., :out_features, :in_features]


def dequant(weight, scale, dtype, xp=jnp):
    """FP8 weight (..., out, in) with 128x128 block scales -> `dtype` (..., out, in) (product
    taken in float32).

    The one dequantization routine of the project: `xp=numpy` (host, the converter) gives the
    same bits as the default jax.numpy."""
    out_f, in_f = weight.shape[-2:]
    w = weight.astype(xp.float32) * expand_scale(scale.astype(xp.float32), out_f, in_f, xp)
    return w.astype(dtype)


def weight_quant(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dequant's inverse, on the host: float32 (out, in) -> e4m3 (out, in) and float32 128x128
    block scales (ceil(out/128), ceil(in/128)) with amax/448 per block (synthetic checkpoints)."""
    n, k = w.shape
    nb, kb = cdiv(n, BLOCK), cdiv(k, BLOCK)
    padded = np.zeros((nb * BLOCK, kb * BLOCK), np.float32)
    padded[:n, :k] = w
    blocks = padded.reshape(nb, BLOCK, kb, BLOCK)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / FP8_MAX
    q = np.clip(blocks / scale[:, None, :, None], -FP8_MAX, FP8_MAX)
    q = q.reshape(nb * BLOCK, kb * BLOCK)[:n, :k].astype(FP8)
    return q, scale.astype(np.float32)


# Largest f32 partial-product buffer `blockwise_matmul` builds at once.
PARTIALS_BYTES = 64 << 20


def blockwise_matmul(x_q: jax.Array, x_s: jax.Array, w_q: jax.Array, w_s: jax.Array,
                     budget: int = PARTIALS_BYTES) -> jax.Array:
    """The release's FP8 linear: y = sum_b (x_q[:, b] . w_q[:, b]) * x_s[:, b] * w_s[n/128, b].

    x_q: (M, K) e4m3, x_s: (M, K/128) f32; w_q: (N, K) e4m3, w_s: (N/128, K/128) f32 -> (M, N) f32.
    w_q may be held in float32 (the same values: the host's storage for float32 FP8 linears,
    `checkpoint.storage`).
    The per-block products are dots of e4m3 operands with float32 accumulation (exact products;
    on an accelerator XLA feeds them to its FP8/bf16 GEMMs, on the CPU it widens per op): the sum
    `pallas_kernels.fp8_linear_reference` states, applied to groups of g K-blocks at once, g the
    largest divisor of K/128 whose (M, g, N) f32 partials fit in `budget`, so no buffer is larger
    than that whatever M (decode: one step; prefill: a loop).
    """
    m, k = x_q.shape
    n, nb = w_q.shape[0], k // BLOCK
    g = max([d for d in range(1, nb + 1) if nb % d == 0 and m * d * n * 4 <= budget] or [1])

    def group(i):  # K-blocks [i*g, (i+1)*g) -> (M, N) f32
        xb = jax.lax.dynamic_slice_in_dim(x_q, i * g * BLOCK, g * BLOCK, 1)  # (M, g*128)
        xs = jax.lax.dynamic_slice_in_dim(x_s, i * g, g, 1)  # (M, g)
        ws = jax.lax.dynamic_slice_in_dim(w_s, i * g, g, 1)  # (N/128, g)
        wb = jax.lax.dynamic_slice_in_dim(w_q, i * g * BLOCK, g * BLOCK, 1)  # (N, g*128)
        return fp8_linear_reference(xb, xs, wb, ws)

    if g == nb:
        return group(0)
    return jax.lax.fori_loop(0, nb // g, lambda i, acc: acc + group(i),
                             jnp.zeros((m, n), jnp.float32))


# FP8 weight rows `dequant_matmul` dequantizes at once (18432 x 7168 at the released widths: the
# whole weight 528 MB in float32, 2048 rows 151 MB); a multiple of BLOCK.
DEQUANT_ROWS = 2048


def act_f32(x_q: jax.Array, x_s: jax.Array) -> jax.Array:
    """act_quant's x_q (M, K) e4m3 times its scales x_s (M, K/128) -> (M, K) float32 (`to_f32`:
    XLA:CPU's e4m3 convert is software)."""
    m, k = x_q.shape
    return (to_f32(x_q).reshape(m, k // BLOCK, BLOCK) * x_s[..., None]).reshape(m, k)


def dequant_matmul(x_q: jax.Array, x_s: jax.Array, w: jax.Array,
                   w_s: jax.Array | None = None) -> jax.Array:
    """The FP8 linear on the CPU: act_quant's x_q (M, K) e4m3 with scales x_s (M, K/128) times the
    dequantized weight -> (M, N) f32, one float32 product (x_q * x_s) . w over all of K.

    w: (N, K) float32 already dequantized (`dequant`; the host's storage, `checkpoint.storage`),
    or e4m3 with its block scales w_s (N/128, K/128), dequantized here. Over DEQUANT_ROWS rows, w
    is taken DEQUANT_ROWS rows at a time, each block of rows one product (no float32 copy of a
    whole e4m3 weight), either way: XLA:CPU's sums depend on a product's shape, and so both give
    the same bits (a stored weight's blocks are copied out first).
    The same real sum as `blockwise_matmul` in another float32 order (its K/128 per-block dots
    and their scaled sum cost XLA:CPU ~1.6x one matrix-vector product); x_q * x_s is exact with
    ue8m0 (power-of-two) scales."""
    m = x_q.shape[0]
    x = act_f32(x_q, x_s)  # (M, K) f32

    def product(w, s):  # rows (R, K) of the weight (+ their block scales) -> (M, R) f32
        return einsum(MATMUL, x, w if s is None else dequant(to_f32(w), s, jnp.float32),
                      jnp.float32)

    n, r = w.shape[0], DEQUANT_ROWS
    if n <= r:
        return product(w, w_s)

    def rows(i, out):  # rows [i*r, (i+1)*r)
        wr = jax.lax.dynamic_slice_in_dim(w, i * r, r, 0)  # (r, K)
        sr = None if w_s is None else jax.lax.dynamic_slice_in_dim(
            w_s, i * (r // BLOCK), r // BLOCK, 0)  # (r/128, K/128)
        return jax.lax.dynamic_update_slice_in_dim(out, product(wr, sr), i * r, 1)

    full = n // r * r
    out = jax.lax.fori_loop(0, n // r, rows, jnp.zeros((m, full), jnp.float32))  # (M, full)
    if full == n:
        return out
    tail = product(w[full:], None if w_s is None else w_s[full // BLOCK:])  # (M, N - full)
    return jnp.concatenate([out, tail], axis=1)


def sylvester(n: int) -> np.ndarray:
    """Sylvester-ordered Hadamard matrix H_n of +-1 entries (n a power of two), float32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_matrix(n: int) -> np.ndarray:
    """The orthonormal Hadamard matrix H_n / sqrt(n), float32."""
    return (sylvester(n) / math.sqrt(n)).astype(np.float32)


def hadamard(x: jax.Array) -> jax.Array:
    """x @ H/sqrt(n) over the last axis (an orthonormal rotation), in x's dtype.

    The +-1 matrix is exact in every dtype, so the dot takes x as it is (bf16 on the tensor cores
    in the deployment numerics) with float32 accumulation, and 1/sqrt(n) is applied in float32."""
    n = x.shape[-1]
    y = einsum("...i,ij->...j", x, jnp.asarray(sylvester(n)), x.dtype, jnp.float32)
    return (y * jnp.float32(n**-0.5)).astype(x.dtype)
