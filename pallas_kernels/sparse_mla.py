"""Sparse MLA (absorbed form) over the selected rows of the latent cache, a Pallas kernel (Triton
lowering).

    o[b,s,h] = sum_j softmax_j(scale * (q_c[b,s,h] . c[t_j] + q_pe[b,s,h] . k_pe[t_j])) c[t_j]

for the selected slots t_j = idx[b,s,j]; an invalid slot (< 0, or >= length[b]) contributes
nothing. c is read as stored: e4m3 (dequantized in registers by its f32 scale per 128-wide block,
then cast to the compute dtype, as `act_dequant`) or already the compute dtype (scales 1).

One program: one query, `block_h` heads, one of `n_split` contiguous parts of the k selected
slots, one of `c_split` parts of the output's C columns. It gathers `block_k` rows at a time (row
gathers: c (block_k, C) as bytes, its scales, k_pe), shared by all block_h heads, scores them on
all of C + R, with an online softmax; it writes its part's output (block_h, C / c_split) f32 and
log-sum-exp (block_h,) (the c_split programs of a part compute the same scores and write the
same log-sum-exp). Why c_split: with 64 heads on the MMA's M side (Hopper's wgmma needs 64 rows)
the (64, C) float32 accumulator of the whole C does not fit beside the queries in 255 registers
and spilled; with C/2 per program it fits, for twice the score dots and the rows read twice
(the second read from L2). The parts are combined by their log-sum-exp (`combine`): the
decode split ("split-kv") that gives B*H/block_h*n_split programs when B*S is small. Prefill is the
same kernel over B*S queries, usually with n_split = 1.

Over a paged pool (`pages`: the serving engine's cache, see `common.PAGE`) c, c_scale and k_pe
are the pool's rows (N, ...) and the selected slots are logical: each goes through the page table
to its pool row before the gather (one more index lookup, no copy). Slots >= P x PAGE are invalid.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (FLOATS, HIGHEST, cache_arg, check, check_pow2, check_shape,
                                   compiler_params, from_bits, pallas_call, lead, page_rows,
                                   pow2_floor, unpage, value_dtype)

QBLOCK = 128  # the latent's quantization block (one f32 scale per 128 values)


@dataclasses.dataclass(frozen=True)
class SparseMLABlocks:
    block_h: int = 16  # heads per program (the dots' rows)
    block_k: int = 32  # gathered rows per step
    n_split: int = 1  # parts of the top-k per query, combined by log-sum-exp
    c_split: int = 1  # parts of the output's C columns (each program: all scores, 1/c_split of o)
    num_warps: int = 4
    num_stages: int = 2


# 64 heads: the MMA's M side of Hopper's wgmma; half of C's output per program keeps the
# accumulators in registers (no spills, benchmarks/deviceless.py)
DECODE = SparseMLABlocks(block_h=64, block_k=32, n_split=8, c_split=2, num_warps=8)
PREFILL = SparseMLABlocks(block_h=64, block_k=32, n_split=1, c_split=2, num_warps=8)


def sparse_mla_reference(q_c, q_pe, idx, c, c_scale, k_pe, scale: float, length=None,
                         pages=None):
    """jnp: the same math on gathered rows (c, k_pe as values), f32 softmax; -> (B,S,H,C) in
    q_c's dtype. With pages (B,P): c, c_scale, k_pe (N, ...) a pool, read through the table."""
    if pages is not None:
        c, c_scale, k_pe = (unpage(x, pages) for x in (c, c_scale, k_pe))
    bsz, t_len = c.shape[0], c.shape[1]
    dtype = q_c.dtype
    length = jnp.full((bsz,), t_len, jnp.int32) if length is None else length
    valid = (idx >= 0) & (idx < length[:, None, None])  # (B,S,k)
    slot = jnp.where(valid, idx, 0)
    b = jnp.arange(bsz)[:, None, None]
    cs = c[b, slot].astype(jnp.float32)  # (B,S,k,C)
    cs = (cs.reshape(*cs.shape[:-1], -1, QBLOCK) * c_scale[b, slot][..., None]).reshape(cs.shape)
    cs = cs.astype(dtype).astype(jnp.float32)
    pe = k_pe[b, slot].astype(jnp.float32)  # (B,S,k,R)
    scores = (jnp.einsum("bshc,bskc->bshk", q_c.astype(jnp.float32), cs, precision=HIGHEST)
              + jnp.einsum("bshr,bskr->bshk", q_pe.astype(jnp.float32), pe, precision=HIGHEST))
    scores = jnp.where(valid[:, :, None, :], scores * scale, -jnp.inf)
    m = jnp.max(scores, -1, keepdims=True)
    p = jnp.exp(scores - jnp.where(m == -jnp.inf, 0.0, m))
    l = jnp.sum(p, -1, keepdims=True)
    p = (p / jnp.where(l == 0, 1.0, l)).astype(dtype).astype(jnp.float32)
    return jnp.einsum("bshk,bskc->bshc", p, cs, precision=HIGHEST).astype(dtype)


def _kernel(layer_ref, qc_ref, qpe_ref, idx_ref, len_ref, c_ref, cs_ref, pe_ref, *refs, bh, bk,
            part, k, s_len, t_len, scale, dtype, n_o):
    # layer_ref (1,) i32 · qc_ref (B,S,H,C) · qpe_ref (B,S,H,R) · idx_ref (B,S,k) i32
    # len_ref (B,) i32 · c_ref ([L,]B,T,C) e4m3 / its uint8 bits / dtype
    # cs_ref ([L,]B,T,C/128) f32 · pe_ref ([L,]B,T,R) dtype / uint16 bf16 bits
    # paged: c_ref, cs_ref, pe_ref ([L,]N,...) · refs[0] the page table (B,P) i32
    # o_ref (B,S,n_split,H,C) f32 · lse_ref (B,S,n_split,H) f32; whole arrays (ANY)
    *pages_ref, o_ref, lse_ref = refs
    q, hb, sp, co = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    b, s = q // s_len, q % s_len
    # c, c_scale and k_pe share the leading axes
    cl = lead(c_ref, 2, layer_ref[0]) if pages_ref else lead(c_ref, 3, layer_ref[0], b)
    heads = pl.ds(hb * bh, bh)
    n_c = qc_ref.shape[3] // QBLOCK
    qc = [qc_ref[b, s, heads, pl.ds(j * QBLOCK, QBLOCK)] for j in range(n_c)]  # n_c x (bh, 128)
    qpe = qpe_ref[b, s, heads, :]  # (bh, R)
    length = jnp.minimum(len_ref[b], t_len)
    lo = sp * part  # this program's slots of idx: [lo, min(lo + part, k))
    hi = jnp.minimum(lo + part, k)

    def step(i, carry):
        m, l, acc = carry  # (bh,), (bh,), n_c x (bh, 128), f32
        at = lo + i * bk + jnp.arange(bk)  # (bk,)
        t = idx_ref[b, s, jnp.minimum(at, k - 1)]  # (bk,)
        valid = (at < hi) & (t >= 0) & (t < length)
        t = jnp.where(valid, t, 0)
        if pages_ref:  # logical slots -> pool rows
            t = page_rows(pages_ref[0], b, t)
        def rows_at(j):  # (bk, 128): the 128-wide latent block j of the rows, dequantized
            return (from_bits(c_ref[(*cl, t, pl.ds(j * QBLOCK, QBLOCK))]).astype(jnp.float32)
                    * cs_ref[(*cl, t, j)][:, None]).astype(dtype)

        pe = from_bits(pe_ref[(*cl, t, slice(None))]).astype(dtype)  # (bk, R)
        dot_t = lambda a, r: jax.lax.dot_general(  # noqa: E731  (bh, x) . (bk, x) -> (bh, bk)
            a, r, (((1,), (1,)), ((), ())), precision=HIGHEST, preferred_element_type=jnp.float32)
        sc = dot_t(qpe, pe)
        for j in range(n_c):
            sc = sc + dot_t(qc[j], rows_at(j))
        sc = jnp.where(valid[None, :], sc * scale, -jnp.inf)  # (bh, bk)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        base = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing valid yet: keep exp finite
        alpha = jnp.exp(m - base)
        p = jnp.exp(sc - base[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        pd = p.astype(dtype)
        acc = [a * alpha[:, None] + jnp.dot(pd, rows_at(co * n_o + j), precision=HIGHEST,
                                            preferred_element_type=jnp.float32)
               for j, a in enumerate(acc)]
        return m_new, l, acc

    init = (jnp.full((bh,), -jnp.inf, jnp.float32), jnp.zeros((bh,), jnp.float32),
            [jnp.zeros((bh, QBLOCK), jnp.float32) for _ in range(n_o)])
    m, l, acc = jax.lax.fori_loop(0, pl.cdiv(part, bk), step, init)
    inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
    for j in range(n_o):
        o_ref[b, s, sp, heads, pl.ds((co * n_o + j) * QBLOCK, QBLOCK)] = acc[j] * inv[:, None]
    lse_ref[b, s, sp, heads] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def combine(o, lse, dtype):
    """Partial outputs (B,S,P,H,C) f32 and their log-sum-exp (B,S,P,H) -> (B,S,H,C) in dtype.
    A query with no valid slot at all gets 0."""
    m = jnp.max(lse, axis=2, keepdims=True)
    wgt = jnp.exp(lse - jnp.where(m == -jnp.inf, 0.0, m))  # (B,S,P,H)
    tot = jnp.sum(wgt, axis=2, keepdims=True)
    wgt = wgt / jnp.where(tot == 0, 1.0, tot)
    return jnp.sum(o * wgt[..., None], axis=2).astype(dtype)


@functools.partial(jax.jit, static_argnames=("scale", "blocks", "interpret"))
def sparse_mla(q_c, q_pe, idx, c, c_scale, k_pe, length=None, layer=None, pages=None, *,
               scale: float, blocks: SparseMLABlocks | None = None,
               interpret: bool | None = None):
    """Absorbed sparse MLA -> (B,S,H,C) in q_c's dtype.

    q_c (B,S,H,C) and q_pe (B,S,H,R) in the compute dtype; idx (B,S,k) int32 slots; the cache of
    one layer: c (B,T,C) e4m3 (or its uint8 bits) or the compute dtype, c_scale (B,T,C/128) f32,
    k_pe (B,T,R) the compute dtype (bf16 also as uint16 bits); or all three layer-stacked
    ((L,B,T,...)) with `layer` naming the one to read in place. pages (B,P) int32: c, c_scale,
    k_pe are a paged pool ((N, ...) or (L,N,...)), T = P x PAGE logical slots, slot t of
    sequence b in row pages[b, t // PAGE] * PAGE + t % PAGE. length (B,) int32: slots >=
    length[b] (or >= T) are invalid (default T). blocks: DECODE for S <= 2, else PREFILL, unless
    given.
    """
    check(q_c.ndim == 4, f"q_c must be (B,S,H,C), got shape {tuple(q_c.shape)}")
    bsz, s_len, h, c_dim = q_c.shape
    dtype = q_c.dtype
    check(dtype in tuple(jnp.dtype(f) for f in FLOATS[:3]), f"q_c dtype {dtype} is not a "
          "compute dtype (float32, bfloat16, float16)")
    check(q_pe.ndim == 4, f"q_pe must be (B,S,H,R), got shape {tuple(q_pe.shape)}")
    r = q_pe.shape[3]
    check_shape("q_pe", q_pe, (bsz, s_len, h, r), (dtype,))
    check(idx.ndim == 3, f"idx must be (B,S,k), got shape {tuple(idx.shape)}")
    k = idx.shape[2]
    check_shape("idx", idx, (bsz, s_len, k), (jnp.int32,))
    t_len, rows, stack, layer_a = cache_arg(c, layer, pages, bsz, c_dim, "c", "C")
    check(value_dtype(c) in (dtype, jnp.dtype(jnp.float8_e4m3fn)),
          f"c must hold e4m3 or {dtype} values, got {c.dtype}")
    check(c_dim % QBLOCK == 0, f"the latent width C must be a multiple of {QBLOCK}, got {c_dim}")
    check_shape("c_scale", c_scale, (*stack, *rows, c_dim // QBLOCK), (jnp.float32,))
    check_shape("k_pe", k_pe, (*stack, *rows, r))
    check(value_dtype(k_pe) == dtype, f"k_pe must hold {dtype} values, got {k_pe.dtype}")
    length = jnp.full((bsz,), t_len, jnp.int32) if length is None else length
    check_shape("length", length, (bsz,), (jnp.int32,))
    check(k >= 1 and s_len >= 1, "need at least one query and one selected slot")
    check_pow2("rope width R", r)
    blocks = blocks or (DECODE if s_len <= 2 else PREFILL)
    for name in ("block_h", "block_k"):
        check_pow2(name, getattr(blocks, name))
    check(blocks.n_split >= 1, f"n_split must be >= 1, got {blocks.n_split}")
    bh = min(blocks.block_h, pow2_floor(h))
    check(h % bh == 0, f"heads H={h} must be a multiple of block_h={bh}")
    bk = blocks.block_k
    n_split = min(blocks.n_split, pl.cdiv(k, bk))  # no empty parts
    part = pl.cdiv(pl.cdiv(k, n_split), bk) * bk  # slots per part, whole steps
    n_split = pl.cdiv(k, part)
    check(blocks.c_split >= 1, f"c_split must be >= 1, got {blocks.c_split}")
    n_c = c_dim // QBLOCK
    c_split = math.gcd(blocks.c_split, n_c)  # parts of whole 128-wide blocks
    kernel = functools.partial(_kernel, bh=bh, bk=bk, part=part, k=k, s_len=s_len, t_len=t_len,
                               scale=float(scale), dtype=dtype, n_o=n_c // c_split)
    table = () if pages is None else (pages,)
    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    o, lse = pallas_call(
        kernel, grid=(bsz * s_len, h // bh, n_split, c_split),
        in_specs=[anyspec] * (8 + len(table)), out_specs=[anyspec, anyspec],
        out_shape=[jax.ShapeDtypeStruct((bsz, s_len, n_split, h, c_dim), jnp.float32),
                   jax.ShapeDtypeStruct((bsz, s_len, n_split, h), jnp.float32)],
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret, name="sparse_mla")(layer_a, q_c, q_pe, idx, length, c, c_scale, k_pe,
                                                *table)
    return combine(o, lse, dtype)
