"""Top-k of score rows by radix select, a Pallas kernel (Triton lowering).

XLA's GPU top-k for k = 2048 is a full sort of every row. Here one program owns one row and never
sorts: scores map to order-preserving uint32 keys (invisible slots: key 0, below every float),
and 32 counting passes fix the k-th largest key bit by bit (keep bit b when at least k keys are
>= the prefix with it). Then one pass writes, in slot order, every slot whose key is above that
threshold plus the lowest slots equal to it: exactly the set of one global `lax.top_k` (ties to
the lower slot). Slots left (fewer than k visible keys) are -1. The row is read from HBM/L2 in
tiles of `block_t`, 34 times; no (row, T) buffer besides the scores themselves exists.

Visible: t <= pos[row] and a score > -inf (as the XLA path, which marks -inf picks -1).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (check, check_pow2, check_shape, compiler_params,
                                   pallas_call, pow2_floor)

BITS = 32


@dataclasses.dataclass(frozen=True)
class TopkBlocks:
    block_t: int = 1024  # scores per tile of a row
    num_warps: int = 4
    num_stages: int = 2


def topk_reference(scores, pos, k: int):
    """jnp: one global lax.top_k per row of scores (R,T) with t > pos[row] masked; (R,k) int32
    slots, -1 where no visible key is left. Sorted by score (the kernel's order is by slot)."""
    t = jnp.arange(scores.shape[1])
    masked = jnp.where(t[None, :] <= pos[:, None], scores, -jnp.inf)
    vals, idx = jax.lax.top_k(masked, k)
    return jnp.where(vals > -jnp.inf, idx, -1).astype(jnp.int32)


def _keys(x, visible):
    """float32 -> uint32 with the same order; invisible -> 0 (visible keys are >= 0x00800000)."""
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    u = jnp.where((u >> 31) != 0, ~u, u | jnp.uint32(0x80000000))
    return jnp.where(visible, u, jnp.uint32(0))


def _kernel(s_ref, pos_ref, o_ref, *, k, bt, t_len):
    # s_ref (R,T) f32 · pos_ref (R,) i32 · o_ref (R, k + bt) i32 (columns >= k: scratch for the
    # lanes a masked store leaves out, so no two lanes ever name one address)
    r = pl.program_id(0)
    pos = pos_ref[r]
    n_tiles = pl.cdiv(t_len, bt)
    lane = jnp.arange(bt)

    def tile(j):
        start = jnp.minimum(j * bt, t_len - bt)  # the last tile ends at T; its overlap is masked
        slot = start + lane  # (bt,)
        x = s_ref[r, pl.ds(start, bt)]  # (bt,)
        seen = slot < j * bt
        return slot, _keys(x, (slot <= pos) & ~seen & (x > -jnp.inf))

    def count(pred):
        return jax.lax.fori_loop(
            0, n_tiles, lambda j, c: c + jnp.sum(pred(tile(j)[1]).astype(jnp.int32)), 0)

    def refine(i, thr):  # thr: the top bits of the k-th largest key, fixed so far
        cand = thr | (jnp.uint32(1) << (BITS - 1 - i).astype(jnp.uint32))
        return jnp.where(count(lambda u: u >= cand) >= k, cand, thr)

    thr = jax.lax.fori_loop(0, BITS, refine, jnp.uint32(0))
    need = k - count(lambda u: u > thr)  # ties at thr to take, lowest slots first

    def emit(j, carry):
        n_sel, n_tie = carry
        slot, u = tile(j)
        tie = (u == thr) & (u > 0)
        tie_rank = n_tie + jnp.cumsum(tie.astype(jnp.int32)) - 1
        sel = (u > thr) | (tie & (tie_rank < need))
        at = jnp.where(sel, n_sel + jnp.cumsum(sel.astype(jnp.int32)) - 1, k + lane)
        o_ref[r, at] = jnp.where(sel, slot, -1)
        return n_sel + jnp.sum(sel.astype(jnp.int32)), n_tie + jnp.sum(tie.astype(jnp.int32))

    n_sel, _ = jax.lax.fori_loop(0, n_tiles, emit, (0, 0))

    def fill(j, _):  # -1 in [n_sel, k)
        at = j * bt + lane
        o_ref[r, jnp.where((at >= n_sel) & (at < k), at, k + lane)] = jnp.full((bt,), -1, jnp.int32)
        return 0

    jax.lax.fori_loop(0, pl.cdiv(k, bt), fill, 0)


@functools.partial(jax.jit, static_argnames=("k", "blocks", "interpret"))
def topk(scores, pos, *, k: int, blocks: TopkBlocks = TopkBlocks(), interpret: bool | None = None):
    """The top-min(k, T) visible slots of each row, in slot order, -1 padded.

    scores (..., T) float32, pos (...) int32: a row sees slots t <= pos. -> (..., min(k, T)) int32.
    """
    check(scores.ndim >= 1, "scores must have a key axis")
    lead, t_len = scores.shape[:-1], scores.shape[-1]
    check_shape("scores", scores, (*lead, t_len), (jnp.float32,))
    check_shape("pos", pos, lead, (jnp.int32,))
    check(k >= 1, f"k must be >= 1, got {k}")
    check(t_len >= 1, "scores must have at least one key")
    check_pow2("block_t", blocks.block_t)
    kk = min(k, t_len)
    bt = min(blocks.block_t, pow2_floor(t_len))
    rows = math.prod(lead)
    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    out = pallas_call(
        functools.partial(_kernel, k=kk, bt=bt, t_len=t_len), grid=(rows,),
        in_specs=[anyspec, anyspec], out_specs=anyspec,
        out_shape=jax.ShapeDtypeStruct((rows, kk + bt), jnp.int32),
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret, name="radix_topk")(scores.reshape(rows, t_len), pos.reshape(rows))
    return out[:, :kk].reshape(*lead, kk)
