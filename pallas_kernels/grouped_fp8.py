"""The routed experts' FP8 projection as one grouped Pallas kernel (Triton lowering).

    out[w, i] = sum_b (x_q[start[w] + i, b] . W[layer, e, :, b]) * x_s[.., b] * W_s[layer, e, n/128, b]
                for i < rows[w] (e = expert[w]); 0 for rows[w] <= i < block_rows

The rows come sorted by expert and cut into windows of one expert (`moe.routed_rows`' layout): a
window table (expert, first row, rows) of W windows. One program per (window, N tile): it reads
its expert's FP8 weight tile straight from the layer-stacked (L, E, N, K) weights at [layer, e]
(index arithmetic on the scalar table, the stack is never sliced or copied), loops over the K/128
blocks with the same per-block f32 dot and scale promotion as `fp8_linear`, and writes the
window's own (block_rows, block_n) output block, so windows never race for a row. A window with
no rows (the table's unused tail) loads nothing and writes zeros.

Decode (one token, 8 picks): 8 windows of one row each (padded to 16 rows, Triton's smallest
dot), each expert's weights read once. Prefill: windows of up to 64-128 rows of a busy expert,
every N tile of the expert read once per window.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (check, check_pow2, check_shape, compiler_params,
                                   pallas_call, layer_arg, lead)
from pallas_kernels.fp8_linear import (BLOCK, MIN_ROWS, block_scaled_sum, check_fp8_operands,
                                       fp8_linear_reference)


@dataclasses.dataclass(frozen=True)
class GroupedBlocks:
    block_n: int = 128  # output columns per program
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False  # weight rows on the MMA's M side (fp8_linear.block_scaled_sum)


# windows of <= 16 rows: the 64 weight rows on the MMA's M side, an FP8 wgmma
DECODE = GroupedBlocks(block_n=64, num_warps=4, num_stages=4, swap_ab=True)
PREFILL = GroupedBlocks(block_n=128, num_warps=8, num_stages=3)


def grouped_fp8_reference(x_q, x_s, w_q, w_s, expert, start, rows, layer=None, *,
                          block_rows: int):
    """jnp: every window's rows through its expert, blockwise (fp8_linear_reference)."""
    if w_q.ndim == 4:
        w_q, w_s = w_q[layer], w_s[layer]
    r = x_q.shape[0]
    xq = jnp.pad(x_q, ((0, block_rows), (0, 0)))
    xs = jnp.pad(x_s, ((0, block_rows), (0, 0)))
    i = jnp.arange(block_rows)

    def one(e, s0, n):
        idx = jnp.minimum(s0, r) + i
        y = fp8_linear_reference(xq[idx], xs[idx], w_q[e], w_s[e])
        return jnp.where((i < n)[:, None], y, 0.0)

    return jax.vmap(one)(expert, start, rows)


def _kernel(layer_ref, expert_ref, start_ref, rows_ref, x_ref, xs_ref, w_ref, ws_ref, o_ref, *,
            br, bn, r_pad, n_len, kb, swap):
    # table refs (W,) i32 · layer_ref (1,) i32 · x_ref (R + br, K) e4m3 · xs_ref (R + br, K/128) f32
    # w_ref ([L,]E,N,K) e4m3 · ws_ref ([L,]E,N/128,K/128) f32 · o_ref (W, br, N) f32 (all ANY)
    w, j = pl.program_id(0), pl.program_id(1)
    e, n_rows = expert_ref[w], jnp.minimum(rows_ref[w], br)
    s0 = jnp.minimum(start_ref[w], r_pad - br)
    wl, sl = lead(w_ref, 3, layer_ref[0], e), lead(ws_ref, 3, layer_ref[0], e)
    n0 = jnp.minimum(j * bn, n_len - bn)  # the last tile ends at N
    col_blk = (n0 + jnp.arange(bn)) // BLOCK  # (bn,)

    def x_at(b):  # (br, 128) e4m3, (br,) f32
        return x_ref[pl.ds(s0, br), pl.ds(b * BLOCK, BLOCK)], xs_ref[pl.ds(s0, br), b]

    def w_at(b):  # (bn, 128) e4m3, (bn,) f32
        return w_ref[(*wl, pl.ds(n0, bn), pl.ds(b * BLOCK, BLOCK))], ws_ref[(*sl, col_blk, b)]

    def compute():
        acc = block_scaled_sum(x_at, w_at, kb, br, bn, swap)
        return jnp.where((jnp.arange(br) < n_rows)[:, None], acc, 0.0)

    out = jax.lax.cond(n_rows > 0, compute, lambda: jnp.zeros((br, bn), jnp.float32))
    o_ref[w, :, pl.ds(n0, bn)] = out


@functools.partial(jax.jit, static_argnames=("block_rows", "blocks", "interpret"))
def grouped_fp8_matmul(x_q, x_s, w_q, w_s, expert, start, rows, layer=None, *, block_rows: int,
                       blocks: GroupedBlocks | None = None, interpret: bool | None = None):
    """(W, block_rows, N) float32: window w's rows x_q[start[w] : start[w] + rows[w]] (e4m3,
    with 1x128 scales x_s) through expert expert[w]'s FP8 weight (blockwise), zero rows after.

    x_q (R, K) e4m3, x_s (R, K/128) f32; w_q (E, N, K) e4m3 / w_s (E, ceil(N/128), K/128) f32,
    or layer-stacked (L, E, N, K) / (L, E, ...) with `layer` (a scalar) naming the layer, read in
    place. expert / start / rows (W,) int32: the window table (rows[w] <= block_rows; rows 0:
    unused window; start[w] + rows[w] <= R). block_rows: a power of two >= 16. blocks: DECODE for
    block_rows <= 16, else PREFILL. interpret: None = by the platform lowered for (interpreted off CUDA).
    """
    check_fp8_operands(x_q, x_s, w_q, w_s)
    w_shape, layer_a = layer_arg(w_q, layer, 3, "w_q")
    n_len = w_shape[1]
    check(expert.ndim == 1, f"expert must be (W,), got shape {tuple(expert.shape)}")
    n_win = expert.shape[0]
    for name, t in (("expert", expert), ("start", start), ("rows", rows)):
        check_shape(name, t, (n_win,), (jnp.int32,))
    check_pow2("block_rows", block_rows)
    check(block_rows >= MIN_ROWS, f"block_rows={block_rows} must be >= {MIN_ROWS} (Triton's "
                                  "smallest dot)")
    check(n_len >= MIN_ROWS, f"N={n_len} must be >= {MIN_ROWS}")
    blocks = blocks or (DECODE if block_rows <= 16 else PREFILL)
    check_pow2("block_n", blocks.block_n)
    bn = blocks.block_n
    while bn > MIN_ROWS and bn > n_len:
        bn //= 2
    r, k = x_q.shape
    x_q = jnp.pad(x_q, ((0, block_rows), (0, 0)))  # every window's block_rows stay in bounds
    x_s = jnp.pad(x_s, ((0, block_rows), (0, 0)))
    kernel = functools.partial(_kernel, br=block_rows, bn=bn, r_pad=r + block_rows, n_len=n_len,
                               kb=k // BLOCK, swap=blocks.swap_ab)
    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    return pallas_call(
        kernel, grid=(n_win, pl.cdiv(n_len, bn)),
        in_specs=[anyspec] * 8, out_specs=anyspec,
        out_shape=jax.ShapeDtypeStruct((n_win, block_rows, n_len), jnp.float32),
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret, name="grouped_fp8_matmul")(
            layer_a, expert, start, rows, x_q, x_s, w_q, w_s)
