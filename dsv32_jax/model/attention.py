"""MLA with DeepSeek Sparse Attention: the lightning indexer, top-k selection, and attention over
the selected latent keys only.

The module (`MLA`) computes projections and writes the new keys into the layer-stacked cache; the
math over keys lives in pure functions, so the Pallas kernels (`pallas_kernels/`) can replace them
one for one:
  index_scores  (B,S,n,d) q x (B,T,d) k      -> (B,S,T)    the indexer on one key tile
  index_topk    key tiles of the cache        -> (B,S,k)    top-k per tile, merged; O(S*k) live
  sparse_mla    the k selected cache rows     -> (B,S,H,C)  absorbed MLA, query chunks
  dense_mla     masked MHA over all keys      -> (B,S,H,dv) reference / short sequences
attention_impl="pallas" replaces index_topk by `index_logits` + `topk` and sparse_mla by the
Pallas `sparse_mla` (interpreted off GPU: the same kernels, not a fallback); over the serving
engine's `PagedKVCache` they read the pool through its page table.
While every query sees at most index_topk keys (T <= index_topk, or all positions below it) the
top-k is every visible key: `visible_slots` replaces the scores and the top-k (`MLA.select`).
Every buffer is bounded by `BUDGET` bytes (a key tile of the indexer, a query chunk of the
gathered rows), not by the context length.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

import pallas_kernels as pk
from dsv32_jax.model.cache import KVCache
from dsv32_jax.model.config import BLOCK, Config, cdiv
from dsv32_jax.model.layers import LayerNorm, Linear, RMSNorm
from dsv32_jax.model.quant import HIGHEST, act_quant, einsum, hadamard
from dsv32_jax.model.rope import apply_rope
from pallas_kernels.common import pow2_floor
from sharding.mesh import constrain, local

HEADS = ("batch", "seq", "heads", None)  # logical axes of per-head activations (B, S, H, ...)
QUERY = ("batch", "seq", None, None)  # indexer queries (B, S, n, d); [:3] weights, [:2] positions
SCORES = ("batch", "seq", None)  # (B, S, T) scores, (B, S, k) picks

NEG_INF = -jnp.inf
ATTENTION_IMPLS = ("xla", "xla_dense", "pallas")
BUDGET = 64 << 20  # bytes: the largest float32 working buffer of the indexer / sparse attention
SKIP_SHORT = True  # skip the indexer's scores and top-k while every query sees <= index_topk
# keys (its top-k is then every visible key); tests turn it off to compare with the indexer path


class Indexer(nn.Module):
    """The lightning indexer's projections: FP8-simulated queries/keys and per-head weights."""

    cfg: Config

    def setup(self):
        cfg = self.cfg
        n, d = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear(cfg, cfg.q_lora_rank, n * d, ("index_heads", "q_lora"), cfg.quantized)
        self.wk = Linear(cfg, cfg.dim, d, ("index_dim", "embed"), cfg.quantized)
        self.k_norm = LayerNorm(1e-6, "index_dim")
        self.weights_proj = Linear(cfg, cfg.dim, n, ("index_n", "embed"), f32=True)

    def keys(self, x, cos, sin):
        """x (B,T,D) -> k (B,T,d) (e4m3 when simulating FP8) and k_s (B,T) f32."""
        cfg = self.cfg
        k = self.k_norm(self.wk(x))
        r = cfg.qk_rope_head_dim
        k = jnp.concatenate([apply_rope(k[..., :r], cos, sin, interleaved=False), k[..., r:]], -1)
        return self._quant(hadamard(k))

    def queries(self, x, qr, cos, sin):
        """-> q (B,S,n,d) (e4m3 when simulating), w (B,S,n) f32 with q_s and scales folded in."""
        cfg = self.cfg
        b, s, _ = x.shape
        n, d, r = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        q = self.wq_b(qr).reshape(b, s, n, d)
        q = jnp.concatenate([apply_rope(q[..., :r], cos, sin, interleaved=False), q[..., r:]], -1)
        q, q_s = self._quant(hadamard(q))
        w = self.weights_proj(x.astype(jnp.float32)) * (n**-0.5) * q_s * (d**-0.5)
        return q, w

    def _quant(self, x):
        if self.cfg.fp8_activations:
            xq, s = act_quant(x, self.cfg.scale_fmt)
            return xq, s[..., 0]
        return x, jnp.ones(x.shape[:-1], jnp.float32)


def index_scores(q: jax.Array, w: jax.Array, k: jax.Array, k_s: jax.Array) -> jax.Array:
    """score[b,s,t] = k_s[b,t] * sum_h w[b,s,h] * relu(q[b,s,h] . k[b,t]), float32.

    q: (B,S,n,d), w: (B,S,n), k: (B,T,d), k_s: (B,T) -> (B,S,T). No causal mask. The q.k products
    take the stored operands as they are (e4m3 with FP8 simulation), accumulated in float32.
    Lowered for the CPU the dots are laid out key-major, (B,S,T,n): head-major, XLA:CPU copies
    each key tile transposed first (most of a long-context decode step). The same products; the
    float32 sums may round differently (another summation order).
    """
    def head_major(q, w, k):
        dots = einsum("bshd,btd->bsht", q, k, q.dtype, jnp.float32)
        return jnp.einsum("bsht,bsh->bst", jax.nn.relu(dots), w, precision=HIGHEST)

    def key_major(q, w, k):
        dots = einsum("bshd,btd->bsth", q, k, q.dtype, jnp.float32)
        return jnp.einsum("bsth,bsh->bst", jax.nn.relu(dots), w, precision=HIGHEST)

    scores = jax.lax.platform_dependent(q, w, k, cpu=key_major, default=head_major)
    return scores * k_s[:, None, :]


KEY_TILE_MAX = 16384  # keys per indexer tile at most (decode: 8 tiles at 128K)


def key_tile_size(batch: int, queries: int, heads: int, length: int, budget: int = BUDGET) -> int:
    """Keys per indexer tile: the (B, S, n, tile) float32 dots fit in `budget`; a power of two,
    at most KEY_TILE_MAX and the context length, so no buffer grows with the context."""
    per_key = batch * queries * heads * 4
    return max(1, min(pow2_floor(budget // per_key), KEY_TILE_MAX, length))


def index_topk(q: jax.Array, w: jax.Array, q_pos: jax.Array,
               keys: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]], length: int,
               topk: int, tile: int, collect: bool = False):
    """Top-min(topk, T) causal key slots per query, over key tiles of the cache.

    q (B,S,n,d), w (B,S,n); q_pos (B,S) position of each query (slot t holds position t);
    keys(start, size) -> (k (B,size,d), k_s (B,size)) reads one tile. Each tile is scored and
    merged into the running top-k (ties go to the lower slot, as in one global top-k), so the live
    buffers are (B,S,n,tile) dots and (B,S,k+tile) candidates, whatever T.
    Returns idx (B,S,k) int32 (-1: no visible key left to pick) and, with `collect`, the raw
    scores (B,S,T) before the causal mask (else None).
    """
    b, s = q_pos.shape
    kk = min(topk, length)
    n_tiles = cdiv(length, tile)

    def tile_scores(i):
        start = jnp.minimum(i * tile, length - tile)  # the last tile ends at T (overlap masked)
        k, k_s = keys(start, tile)
        raw = constrain(index_scores(q, w, k, k_s), SCORES)  # (B,S,tile)
        slot = start + jnp.arange(tile)
        seen = slot < i * tile  # keys an earlier tile already offered
        visible = (slot[None, None, :] <= q_pos[..., None]) & ~seen
        return raw, jnp.where(visible, raw, NEG_INF), jnp.broadcast_to(slot, raw.shape)

    def step(carry, i):
        vals, idx = carry
        raw, masked, slot = tile_scores(i)
        vals, pick = jax.lax.top_k(jnp.concatenate([vals, masked], -1), kk)
        idx = jnp.take_along_axis(jnp.concatenate([idx, slot], -1), pick, -1)
        return (vals, idx), (raw if collect else None)

    init = (jnp.full((b, s, kk), NEG_INF, jnp.float32), jnp.full((b, s, kk), -1, jnp.int32))
    (vals, idx), raw = jax.lax.scan(step, init, jnp.arange(n_tiles))
    idx = jnp.where(vals > NEG_INF, idx, -1)
    if not collect:
        return idx, None
    scores = jnp.moveaxis(raw, 0, 2).reshape(b, s, n_tiles * tile)
    tail = length - (n_tiles - 1) * tile  # keys only the (shifted) last tile offered
    scores = jnp.concatenate([scores[..., :(n_tiles - 1) * tile], raw[-1][..., tile - tail:]], -1)
    return idx, scores


def visible_slots(q_pos: jax.Array, k: int) -> jax.Array:
    """q_pos (B,S) -> (B,S,k) int32: slots 0..k-1, -1 past each query's position. With at most
    k visible keys per query this is the set the indexer's top-k picks (in slot order)."""
    slot = jnp.arange(k, dtype=jnp.int32)
    return jnp.where(slot <= q_pos[..., None], slot, -1)


def query_chunk_size(batch: int, picks: int, width: int, heads: int, budget: int = BUDGET) -> int:
    """Queries per sparse-attention chunk: the gathered (B, chunk, k, width) rows and the
    (B, chunk, H, k) scores, in float32, fit in `budget`; a power of two."""
    per_query = batch * picks * (width + heads) * 4
    return pow2_floor(budget // per_query)


def sparse_mla(q_c, q_pe, idx, rows: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
               scale: float, dtype) -> jax.Array:
    """Absorbed MLA over the selected keys only.

    q_c: (B,S,H,C) query mapped into latent space, q_pe: (B,S,H,R), idx: (B,S,k) selected slots
    (negative: invalid, contributes nothing); rows(idx) -> the gathered latent (B,S,k,C) and
    k_pe (B,S,k,R) in `dtype`. -> (B,S,H,C) attention-weighted latent, in `dtype`.
    """
    c_sel, pe_sel = rows(idx)
    scores = (einsum("bshc,bskc->bshk", q_c, c_sel, dtype, jnp.float32)
              + einsum("bshr,bskr->bshk", q_pe, pe_sel, dtype, jnp.float32)) * scale
    scores = jnp.where((idx >= 0)[:, :, None, :], scores, NEG_INF)
    p = jax.nn.softmax(scores, axis=-1)
    return einsum("bshk,bskc->bshc", p, c_sel, dtype)


def dense_mla(q_nope, q_pe, k_nope, k_pe, v, mask, scale: float, dtype) -> jax.Array:
    """Unabsorbed MLA (multi-head over all keys) with a boolean mask (B,S,T).

    q_nope: (B,S,H,dn), q_pe: (B,S,H,R), k_nope: (B,T,H,dn), k_pe: (B,T,R), v: (B,T,H,dv)
    -> (B,S,H,dv) in `dtype`.
    """
    scores = (einsum("bshd,bthd->bsht", q_nope, k_nope, dtype, jnp.float32)
              + einsum("bshr,btr->bsht", q_pe, k_pe, dtype, jnp.float32))
    scores = jnp.where(mask[:, :, None, :], scores * scale, NEG_INF)
    p = jax.nn.softmax(scores, axis=-1)
    return einsum("bsht,bthd->bshd", p, v, dtype)


def over_query_chunks(fn, q_chunk: int, per_query: tuple):
    """fn(*per_query_slices) over chunks of the S axis (axis 1) with lax.map.

    Pads S up to a multiple of q_chunk (pad rows are computed and dropped). Returns fn's
    outputs concatenated back along axis 1.
    """
    s = per_query[0].shape[1]
    if s <= q_chunk:
        return fn(*per_query)
    n = cdiv(s, q_chunk)
    pad = n * q_chunk - s

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        a = a.reshape(a.shape[0], n, q_chunk, *a.shape[2:])
        return jnp.moveaxis(a, 1, 0)

    outs = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in per_query))

    def merge(a):
        a = jnp.moveaxis(a, 0, 1)
        return a.reshape(a.shape[0], n * q_chunk, *a.shape[3:])[:, :s]

    return jax.tree.map(merge, outs)


class MLA(nn.Module):
    """Multi-head latent attention with DSA. x (B,S,D) at positions (B,S) -> (B,S,D).

    The new keys are written into `cache` (a layer-stacked `KVCache`) at [layer, b, positions];
    the queries attend to every slot t <= their position: prefill chunks and decode steps alike.
    Returns (out, cache). Sows `index_scores` (B,S,T) and `topk` (B,S,k) into 'intermediates'
    when that collection is mutable (by-products of the same computation).
    """

    cfg: Config
    impl: str = "xla"

    def setup(self):
        cfg, q8 = self.cfg, self.cfg.quantized
        h = cfg.n_heads
        self.wq_a = Linear(cfg, cfg.dim, cfg.q_lora_rank, ("q_lora", "embed"), q8)
        self.q_norm = RMSNorm(cfg.rms_norm_eps, "q_lora")
        self.wq_b = Linear(cfg, cfg.q_lora_rank, h * cfg.qk_head_dim, ("q_heads", "q_lora"), q8)
        self.wkv_a = Linear(cfg, cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                            ("kv_lora_rope", "embed"), q8)
        self.kv_norm = RMSNorm(cfg.rms_norm_eps, "kv_lora")
        self.wkv_b = Linear(cfg, cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                            ("kv_heads", "kv_lora"), q8)
        self.wo = Linear(cfg, h * cfg.v_head_dim, cfg.dim, ("embed", "o_heads"), q8)
        self.indexer = Indexer(cfg)

    def project(self, x: jax.Array, cos, sin):
        """x (B,S,D) -> the query latent qr (B,S,q_lora), q_nope (B,S,H,dn), q_pe (B,S,H,R)
        rotated, the key latent c (B,S,C) and k_pe (B,S,R) rotated (before any FP8 cache
        quantization). Shared by inference and the training forward (`train.model.TrainMLA`)."""
        cfg = self.cfg
        b, s, _ = x.shape
        dn, r, c_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        with jax.named_scope("q"):
            qr = self.q_norm(self.wq_a(x))  # (B,S,q_lora)
            q = constrain(self.wq_b(qr).reshape(b, s, cfg.n_heads, dn + r), HEADS)
            q_nope, q_pe = q[..., :dn], apply_rope(q[..., dn:], cos, sin, interleaved=True)
        with jax.named_scope("kv"):
            kv = self.wkv_a(x)  # (B,S,C+R)
            c = self.kv_norm(kv[..., :c_dim])  # (B,S,C)
            k_pe = apply_rope(kv[..., c_dim:], cos, sin, interleaved=True)  # (B,S,R)
        return qr, q_nope, q_pe, c, k_pe

    def select(self, iq, iw, positions, cache: KVCache, layer, collect: bool):
        """The key slots each query attends to -> idx (B,S,min(index_topk,T)) and, with
        `collect`, the raw indexer scores (B,S,T) (else None).

        While every query sees at most index_topk keys its top-k is every visible key, so the
        scores and the top-k are skipped (`SKIP_SHORT`): decided in Python when T <= index_topk,
        else by a `lax.cond` on the largest position of each device's own sequences, inside
        `local` (the cond's operands keep their layouts; no collective decides it). Collecting
        still computes the scores, but the idx is the one production attends to."""
        topk = self.cfg.index_topk
        if not SKIP_SHORT:
            return self.indexer_topk(iq, iw, positions, cache, layer, collect)
        k = min(topk, cache.length)
        if cache.length <= topk:  # static: no runtime cost
            every = constrain(visible_slots(positions, k), SCORES)  # (B,S,k)
            if not collect:
                return every, None
            return every, self.indexer_topk(iq, iw, positions, cache, layer, True)[1]
        if collect:
            idx, scores = self.indexer_topk(iq, iw, positions, cache, layer, True)
            return jnp.where(jnp.max(positions) < topk, visible_slots(positions, k), idx), scores

        def pick(iq, iw, positions, cache, layer):  # one device's sequences
            return jax.lax.cond(
                jnp.max(positions) < topk, lambda: visible_slots(positions, k),
                lambda: self.indexer_topk(iq, iw, positions, cache, layer, False)[0])

        return local(pick, (QUERY, QUERY[:3], QUERY[:2], cache.axes(), ()), SCORES)(
            iq, iw, positions, cache, layer), None

    def indexer_topk(self, iq, iw, positions, cache: KVCache, layer, collect: bool):
        """The indexer's top-min(index_topk, T) slots per query (B,S,k) over the whole cache,
        and with `collect` the raw scores (B,S,T) (else None)."""
        cfg = self.cfg
        b, s = positions.shape
        if self.impl == "pallas":  # raw scores when collecting (top-k masks causally itself)
            # each device's own sequences (sharding.mesh.local); reads the stacked cache (or the
            # paged pool through its table) in place
            table, table_axes = cache.table()
            scores = local(lambda q, w, k, ks, p, i, *pages: pk.index_logits(
                q, w, k, ks, p, i, *pages, causal=not collect),
                (QUERY, QUERY[:3], cache.AXES["ik"], cache.AXES["ik_scale"], QUERY[:2], (),
                 *table_axes), SCORES)(iq, iw, cache.ik, cache.ik_scale, positions, layer, *table)
            idx = local(lambda sc, p: pk.topk(sc, p, k=cfg.index_topk), (SCORES, QUERY[:2]),
                        SCORES)(scores, positions)
            return idx, (scores if collect else None)
        tile = key_tile_size(b, s, cfg.index_n_heads, cache.length)
        return index_topk(iq, iw, positions, lambda i, n: cache.key_tile(layer, i, n),
                          cache.length, cfg.index_topk, tile, collect)

    def __call__(self, x: jax.Array, positions: jax.Array, cos, sin, cache: KVCache,
                 layer: jax.Array):
        cfg = self.cfg
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl {self.impl!r} is not one of {ATTENTION_IMPLS}")
        b, s, _ = x.shape
        h, dn, r, dv, c_dim = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                               cfg.v_head_dim, cfg.kv_lora_rank)
        dtype = jnp.dtype(cfg.dtype)
        collect = self.is_mutable_collection("intermediates")
        qr, q_nope, q_pe, c, k_pe = self.project(x, cos, sin)
        with jax.named_scope("kv"):
            if cfg.fp8_activations:  # the FP8 latent cache
                c_q, c_s = act_quant(c, cfg.scale_fmt)
            else:
                c_q, c_s = c, jnp.ones((b, s, cdiv(c_dim, BLOCK)), jnp.float32)
        with jax.named_scope("indexer"):
            iq, iw = self.indexer.queries(x, qr, cos, sin)  # (B,S,n,d), (B,S,n)
            iq, iw = constrain(iq, QUERY), constrain(iw, QUERY[:3])
            ik, iks = self.indexer.keys(x, cos, sin)  # (B,S,d), (B,S)
        cache = cache.write(layer, positions, c=c_q, c_scale=c_s, k_pe=k_pe, ik=ik, ik_scale=iks)
        t = cache.length
        with jax.named_scope("index_topk"):
            idx, scores = self.select(iq, iw, positions, cache, layer, collect)
        if collect:
            self.sow("intermediates", "index_scores", scores)
            self.sow("intermediates", "topk", idx)  # the idx attention uses, skip or not

        wkv_b = self.wkv_b.dense_weight().reshape(h, dn + dv, c_dim)
        if self.impl == "xla":
            with jax.named_scope("sparse_attention"):
                q_c = constrain(einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :dn], dtype), HEADS)
                chunk = query_chunk_size(b, idx.shape[-1], c_dim + r, h)
                attend = lambda q_c, q_pe, idx: sparse_mla(  # noqa: E731
                    q_c, q_pe, idx, lambda i: cache.gather(layer, i, dtype), cfg.softmax_scale,
                    dtype)
                o_c = over_query_chunks(attend, chunk, (q_c, q_pe, idx))
                o = einsum("bshc,hdc->bshd", o_c, wkv_b[:, dn:], dtype)
        elif self.impl == "pallas":
            with jax.named_scope("sparse_attention"):
                q_c = einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :dn], dtype)
                table, table_axes = cache.table()
                o_c = local(lambda qc, qpe, i, c, cs, kpe, l, *pages: pk.sparse_mla(
                    qc, qpe, i, c, cs, kpe, None, l, *pages, scale=cfg.softmax_scale),
                    (HEADS, HEADS, SCORES, cache.AXES["c"], cache.AXES["c_scale"],
                     cache.AXES["k_pe"], (), *table_axes), HEADS)(
                    q_c, q_pe.astype(dtype), idx, cache.c, cache.c_scale, cache.k_pe, layer, *table)
                o = einsum("bshc,hdc->bshd", o_c, wkv_b[:, dn:], dtype)
        else:
            with jax.named_scope("dense_attention"):
                c_all, pe_all = cache.layer_latent(layer, dtype)
                kvb = self.wkv_b(c_all).reshape(b, t, h, dn + dv)
                rows = jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None]
                slot = jnp.where(idx >= 0, idx, t)  # invalid picks fall out of range: dropped
                picked = jnp.zeros((b, s, t), bool).at[(*rows, slot)].set(True, mode="drop")
                o = dense_mla(q_nope, q_pe, kvb[..., :dn], pe_all, kvb[..., dn:], picked,
                              cfg.softmax_scale, dtype)
        return self.wo(constrain(o, HEADS).reshape(b, s, h * dv)), cache
