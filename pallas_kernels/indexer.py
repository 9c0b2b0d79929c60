"""The lightning indexer's logits as a Pallas kernel (Triton lowering).

    score[b,s,t] = k_s[b,t] * sum_h w[b,s,h] * relu(q[b,s,h] . k[b,t])     (float32)

One program scores `block_q` queries of one sequence against one tile of `block_t` keys: a single
(block_q*n, d) x (d, block_t) dot (e4m3 x e4m3 with FP8 simulation, else the compute dtype, f32
accumulation), relu, the weighted head sum in registers; only the (block_q, block_t) scores are
written, never a per-head buffer. With `causal`, t > pos[b,s] scores -inf and a tile that starts
after every query's position is not computed at all (prefill: about half the tiles).

Decode (a few queries per sequence, memory-bound: every key is read once per sequence) and prefill
(query blocks x key tiles) are the same kernel with different `IndexerBlocks` (`DECODE`,
`PREFILL`). Keys are read from the (B, T, d) arrays in place; the last key tile is shifted to end
at T (its overlap with the tile before rewrites identical values), so T needs no padding.

Over a paged pool (`pages`: the serving engine's cache, see `common.PAGE`) the keys are the pool's
rows (N, d) and T = P x PAGE logical slots: a tile's slots go through the page table, one lookup
per slot (a tile may span pages), and its rows are gathered in place. The scores are over logical
slots, as without pages, so `topk` takes them unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (FLOATS, HIGHEST, cache_arg, check, check_pow2, check_shape,
                                   compiler_params, from_bits, pallas_call, lead, page_rows,
                                   pow2_floor, unpage, value_dtype)


@dataclasses.dataclass(frozen=True)
class IndexerBlocks:
    block_q: int = 1  # queries per program (their n heads form the dot's rows)
    block_t: int = 128  # keys per tile
    num_warps: int = 4
    num_stages: int = 2


DECODE = IndexerBlocks(block_q=1, block_t=256, num_warps=4)
PREFILL = IndexerBlocks(block_q=2, block_t=128, num_warps=8)


def index_logits_reference(q, w, k, k_s, pos=None, pages=None):
    """jnp: q (B,S,n,d), w (B,S,n) f32, k (B,T,d) (values), k_s (B,T) f32, pos (B,S) or None
    -> (B,S,T). With pages (B,P): k (N,d), k_s (N,) a pool, read through the table (T = P x
    PAGE)."""
    if pages is not None:
        k, k_s = unpage(k, pages), unpage(k_s, pages)
    dots = jnp.einsum("bshd,btd->bsht", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=HIGHEST)
    score = jnp.einsum("bsht,bsh->bst", jax.nn.relu(dots), w, precision=HIGHEST) * k_s[:, None]
    if pos is None:
        return score
    t = jnp.arange(k.shape[1])
    return jnp.where(t[None, None, :] <= pos[..., None], score, -jnp.inf)


def _kernel(layer_ref, q_ref, w_ref, k_ref, ks_ref, pos_ref, *refs, bq, bt, s_len, t_len,
            causal):
    # layer_ref (1,) i32 · q_ref (B,S,n,d) · w_ref (B,S,n) f32 · pos_ref (B,S) i32
    # k_ref ([L,]B,T,d) values or bits · ks_ref ([L,]B,T) f32 · o_ref (B,S,T) f32
    # paged: k_ref ([L,]N,d) · ks_ref ([L,]N) · refs[0] the page table (B,P) i32
    # all whole arrays (ANY): this program reads its blocks itself.
    *pages_ref, o_ref = refs
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = jnp.minimum(i * bq + jnp.arange(bq), s_len - 1)  # (bq,) past S: repeat the last query
    start = jnp.minimum(j * bt, t_len - bt)  # the last tile ends at T
    slot = start + jnp.arange(bt)  # (bt,)
    pos = pos_ref[b, rows]  # (bq,)

    def compute():
        qb = q_ref[b, rows]  # (bq, n, d)
        n, d = qb.shape[1], qb.shape[2]
        if pages_ref:  # the tile's pool rows, (bt,)
            at, kl, ksl = (page_rows(pages_ref[0], b, slot), lead(k_ref, 2, layer_ref[0]),
                           lead(ks_ref, 1, layer_ref[0]))
        else:
            at, kl, ksl = (pl.ds(start, bt), lead(k_ref, 3, layer_ref[0], b),
                           lead(ks_ref, 2, layer_ref[0], b))
        kb = from_bits(k_ref[(*kl, at, slice(None))])  # (bt, d)
        dots = jax.lax.dot_general(qb.reshape(bq * n, d), kb, (((1,), (1,)), ((), ())),
                                   precision=HIGHEST, preferred_element_type=jnp.float32)
        wb = w_ref[b, rows]  # (bq, n)
        score = jnp.sum(jnp.maximum(dots.reshape(bq, n, bt), 0.0) * wb[:, :, None], axis=1)
        score = score * ks_ref[(*ksl, at)][None, :]  # (bq, bt)
        if causal:
            score = jnp.where(slot[None, :] <= pos[:, None], score, -jnp.inf)
        return score

    if causal:  # a tile wholly after every query: -inf, no loads, no dot
        score = jax.lax.cond(start <= jnp.max(pos), compute,
                             lambda: jnp.full((bq, bt), -jnp.inf, jnp.float32))
    else:
        score = compute()
    o_ref[b, rows, pl.ds(start, bt)] = score


@functools.partial(jax.jit, static_argnames=("causal", "blocks", "interpret"))
def index_logits(q, w, k, k_s, pos, layer=None, pages=None, *, causal: bool = True,
                 blocks: IndexerBlocks | None = None, interpret: bool | None = None):
    """Indexer scores (B,S,T) float32; -inf where t > pos when `causal`.

    q (B,S,n,d) e4m3 or a float dtype, w (B,S,n) f32 (q's scales folded in), k (B,T,d) in q's
    dtype or as its bits (uint8 for e4m3), k_s (B,T) f32, pos (B,S) int32 (slot t holds position
    t). k and k_s may be layer-stacked ((L,B,T,d), (L,B,T)) with `layer` (a scalar) naming the
    one to read: the cache is read in place, never sliced. pages (B,P) int32: k (N,d) and k_s
    (N,) (or (L,N,d), (L,N)) are a paged pool, T = P x PAGE logical slots, slot t of sequence b
    in row pages[b, t // PAGE] * PAGE + t % PAGE. blocks: DECODE for S <= 2, else PREFILL, unless
    given. interpret: None = by the platform lowered for (interpreted off CUDA).
    """
    check(q.ndim == 4, f"q must be (B,S,n,d), got shape {tuple(q.shape)}")
    bsz, s_len, n, d = q.shape
    check(q.dtype in tuple(jnp.dtype(f) for f in FLOATS), f"q dtype {q.dtype} is not a float type")
    check_shape("w", w, (bsz, s_len, n), (jnp.float32,))
    t_len, rows, stack, layer_a = cache_arg(k, layer, pages, bsz, d, "k", "d")
    check(value_dtype(k) == q.dtype, f"k holds {value_dtype(k)} values but q is {q.dtype}")
    check_shape("k_s", k_s, (*stack, *rows), (jnp.float32,))
    check_shape("pos", pos, (bsz, s_len), (jnp.int32,))
    check(t_len >= 1 and s_len >= 1, "need at least one query and one key")
    check_pow2("index heads n", n)
    check_pow2("index head dim d", d)
    blocks = blocks or (DECODE if s_len <= 2 else PREFILL)
    check_pow2("block_q", blocks.block_q)
    check_pow2("block_t", blocks.block_t)
    bq = min(blocks.block_q, pow2_floor(s_len))
    bt = min(blocks.block_t, pow2_floor(t_len))
    kernel = functools.partial(_kernel, bq=bq, bt=bt, s_len=s_len, t_len=t_len, causal=causal)
    table = () if pages is None else (pages,)
    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    return pallas_call(
        kernel, grid=(bsz, pl.cdiv(s_len, bq), pl.cdiv(t_len, bt)),
        in_specs=[anyspec] * (6 + len(table)), out_specs=anyspec,
        out_shape=jax.ShapeDtypeStruct((bsz, s_len, t_len), jnp.float32),
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret, name="index_logits")(layer_a, q, w, k, k_s, pos, *table)
