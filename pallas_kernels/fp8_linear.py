"""The release's block-scaled FP8 linear as a Pallas kernel (Triton lowering).

    y[m, n] = sum_b (x_q[m, b] . w_q[n, b]) * x_s[m, b] * w_s[n // 128, b]          (float32)

x_q (M, K) e4m3 with 1x128 activation scales x_s (M, K/128) (act_quant, ue8m0 or not), w_q (N, K)
e4m3 with 128x128 block scales w_s (ceil(N/128), K/128): the sum `quant.blockwise_matmul`
computes. One program owns a (block_m, block_n) tile of y and loops over the K/128 blocks: an e4m3
x e4m3 dot of the two 128-wide slices with float32 accumulation, promoted by the row scale of x
and the column scale of w, added to a float32 accumulator in registers. Only FP8 bytes and the
small scale arrays are read: no dequantized weight exists anywhere, and each weight byte is read
once per M tile (decode: M <= block_m, one tile, every byte read once).

Edges: an M or N that is not a multiple of its tile has its last tile shifted back to end at the
edge (the overlap rewrites identical values), so the weight is never padded or copied; a column's
weight scale is gathered per column (a shifted tile can straddle two 128-row scale blocks). M
smaller than the row tile (decode) is padded with zero rows to 16 (Triton's smallest dot).

Why the Triton lowering: it is what the project's other kernels use, it lowers `jnp.dot` of e4m3
operands to Hopper FP8 MMA, and it runs in jax's generic interpreter on CPU. A Mosaic GPU version
(`plgpu.wgmma` on e4m3 SMEM tiles fed by TMA pipelines, warp-specialized, scales applied to the
wgmma accumulator per K block) is the likely faster path for prefill-sized M; it is to be
measured against this one on a GPU, not assumed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (HIGHEST, check, check_pow2, check_shape, compiler_params,
                                   pallas_call)

BLOCK = 128  # the FP8 block: 128x128 weight scales, 1x128 activation scales
MIN_ROWS = 16  # the smallest M of a Triton dot
E4M3 = jnp.float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class GemmBlocks:
    block_m: int = 64  # rows of y per program (a power of two >= 16)
    block_n: int = 128  # columns of y per program (a power of two >= 16)
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False  # weight rows on the MMA's M side (block_scaled_sum)


# M <= 16: many N tiles; the 64 weight rows on the MMA's M side, so the dot is an FP8 wgmma
DECODE = GemmBlocks(block_m=16, block_n=64, num_warps=4, num_stages=4, swap_ab=True)
PREFILL = GemmBlocks(block_m=128, block_n=128, num_warps=8, num_stages=3)


def default_blocks(m: int) -> GemmBlocks:
    return DECODE if m <= DECODE.block_m else PREFILL


def fp8_linear_reference(x_q, x_s, w_q, w_s):
    """jnp: the blockwise sum, per 128-block f32 partial dots (M, K/128, N) at once (the math of
    `quant.blockwise_matmul`, which applies it to memory-bounded groups of K blocks)."""
    m, k = x_q.shape
    n, kb = w_q.shape[0], k // BLOCK
    part = jnp.einsum("mbk,nbk->mbn", x_q.reshape(m, kb, BLOCK), w_q.reshape(n, kb, BLOCK),
                      preferred_element_type=jnp.float32)  # (M, K/128, N)
    ws = jnp.repeat(w_s.astype(jnp.float32), BLOCK, axis=0)[:n].T  # (K/128, N)
    # the blocks summed in order as a float32 contraction: bit-equal to the release's sequential
    # accumulation on CPU (an elementwise sum + reduce is not, and FP8 re-quantization downstream
    # amplifies the last-bit differences: tests/test_bf16_numerics.py)
    return jnp.einsum("mbn,mb,bn->mn", part, x_s.astype(jnp.float32), ws, precision=HIGHEST)


def block_dot(x, w):
    """(r, 128) e4m3 . (c, 128) e4m3 -> (r, c) f32 (the per-block partial product)."""
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def block_scaled_sum(x_at, w_at, kb: int, rows: int, cols: int, swap: bool):
    """In a kernel: sum over the kb K-blocks of dot(x_b, w_b) * xs_b[:, None] * ws_b[None, :],
    (rows, cols) f32. x_at(b) -> (x_b (rows, 128) e4m3, xs_b (rows,) f32); w_at(b) -> (w_b
    (cols, 128) e4m3, ws_b (cols,) f32).

    swap: the weight tile on the MMA's M side (w_b . x_b^T, accumulated transposed): Hopper's
    wgmma needs >= 64 rows there, a decode tile has 16 tokens but 64+ weight rows. The same
    products and the same float32 operations in the same order, so the result is the same."""
    def step(b, acc):
        (xb, xs), (wb, ws) = x_at(b), w_at(b)
        if swap:
            return acc + block_dot(wb, xb) * xs[None, :] * ws[:, None]
        return acc + block_dot(xb, wb) * xs[:, None] * ws[None, :]

    acc = jax.lax.fori_loop(0, kb, step, jnp.zeros((cols, rows) if swap else (rows, cols),
                                                   jnp.float32))
    return acc.T if swap else acc


def _kernel(x_ref, xs_ref, w_ref, wst_ref, o_ref, *, bm, bn, m_len, n_len, kb, swap):
    # x_ref (M, K) e4m3 · xs_ref (M, K/128) f32 · w_ref (N, K) e4m3 · wst_ref (K/128, N/128) f32
    # o_ref (M, N) f32; all whole arrays (ANY): this program reads its tiles itself.
    m0 = jnp.minimum(pl.program_id(0) * bm, m_len - bm)  # the last tiles end at M / N
    n0 = jnp.minimum(pl.program_id(1) * bn, n_len - bn)
    col_blk = (n0 + jnp.arange(bn)) // BLOCK  # (bn,) each column's weight-scale row

    def x_at(b):  # (bm, 128) e4m3, (bm,) f32
        return x_ref[pl.ds(m0, bm), pl.ds(b * BLOCK, BLOCK)], xs_ref[pl.ds(m0, bm), b]

    def w_at(b):  # (bn, 128) e4m3, (bn,) f32
        return w_ref[pl.ds(n0, bn), pl.ds(b * BLOCK, BLOCK)], wst_ref[b, col_blk]

    o_ref[pl.ds(m0, bm), pl.ds(n0, bn)] = block_scaled_sum(x_at, w_at, kb, bm, bn, swap)


def check_fp8_operands(x_q, x_s, w_q, w_s) -> None:
    """The argument checks of the FP8 linear: e4m3 operands, f32 scales of the block shapes."""
    check(x_q.ndim == 2, f"x_q must be (M, K), got shape {tuple(x_q.shape)}")
    m, k = x_q.shape
    check(k % BLOCK == 0 and k > 0, f"K={k} must be a positive multiple of {BLOCK} (activations "
                                    "are quantized in 128-wide blocks)")
    check(x_q.dtype == E4M3, f"x_q must be float8_e4m3fn, got {x_q.dtype}")
    check_shape("x_s", x_s, (m, k // BLOCK), (jnp.float32,))
    check(w_q.dtype == E4M3, f"w_q must be float8_e4m3fn, got {w_q.dtype}")
    check(w_q.ndim >= 2 and w_q.shape[-1] == k,
          f"w_q must be (..., N, K={k}), got shape {tuple(w_q.shape)}")
    n = w_q.shape[-2]
    check_shape("w_s", w_s, (*w_q.shape[:-2], -(-n // BLOCK), k // BLOCK), (jnp.float32,))


def _tile(want: int, size: int, name: str) -> int:
    check_pow2(name, want)
    check(want >= MIN_ROWS, f"{name}={want} must be >= {MIN_ROWS} (Triton's smallest dot)")
    t = want
    while t > MIN_ROWS and t > size:
        t //= 2
    return t


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def fp8_linear(x_q, x_s, w_q, w_s, *, blocks: GemmBlocks | None = None,
               interpret: bool | None = None):
    """y (M, N) float32 = the blockwise FP8 product of x_q (M, K) e4m3 / x_s (M, K/128) f32 and
    w_q (N, K) e4m3 / w_s (ceil(N/128), K/128) f32. blocks: DECODE for M <= 16, else PREFILL.
    interpret: None = by the platform lowered for (interpreted off CUDA)."""
    check_fp8_operands(x_q, x_s, w_q, w_s)
    check(w_q.ndim == 2, f"w_q must be (N, K), got shape {tuple(w_q.shape)}")
    m, k = x_q.shape
    n = w_q.shape[0]
    check(m >= 1 and n >= MIN_ROWS, f"need M >= 1 and N >= {MIN_ROWS}, got M={m} N={n}")
    blocks = blocks or default_blocks(m)
    bm = _tile(blocks.block_m, m, "block_m")
    bn = _tile(blocks.block_n, n, "block_n")
    pad = max(0, bm - m)  # decode: fewer rows than the smallest tile
    if pad:
        x_q = jnp.pad(x_q, ((0, pad), (0, 0)))
        x_s = jnp.pad(x_s, ((0, pad), (0, 0)))
    mp = m + pad
    kernel = functools.partial(_kernel, bm=bm, bn=bn, m_len=mp, n_len=n, kb=k // BLOCK,
                               swap=blocks.swap_ab)
    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    y = pallas_call(
        kernel, grid=(pl.cdiv(mp, bm), pl.cdiv(n, bn)),
        in_specs=[anyspec] * 4, out_specs=anyspec,
        out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret, name="fp8_linear")(x_q, x_s, w_q, w_s.T)
    return y[:m] if pad else y
