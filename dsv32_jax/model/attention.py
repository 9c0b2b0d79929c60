"""MLA with DeepSeek Sparse Attention: the lightning indexer, top-k selection, and attention over
the selected latent keys only.

The module (`MLA`) computes projections; the math over keys lives in pure functions so the
Pallas kernels (`pallas_kernels/`) can replace them one for one:
  index_scores   (B,S,n,d) q x (B,T,d) k      -> (B,S,T)   O(S*T*n*d), the indexer
  select_topk    (B,S,T) scores              -> (B,S,k)   positions + validity
  sparse_mla     gathers k latent keys/query -> O(S*k*H*(C+R))   (absorbed MLA)
  dense_mla      masked MHA over all keys    -> O(S*T*H*d)        (reference / short sequences)
Queries are processed in chunks of `q_chunk`, so no buffer grows as S*T*H.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsv32_jax.model.cache import KVCache
from dsv32_jax.model.config import BLOCK, Config
from dsv32_jax.model.layers import LayerNorm, Linear, RMSNorm, einsum
from dsv32_jax.model.quant import act_dequant, act_quant, hadamard
from dsv32_jax.model.rope import apply_rope

NEG_INF = -jnp.inf
ATTENTION_IMPLS = ("xla", "xla_dense")


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

    q: (B,S,n,d), w: (B,S,n), k: (B,T,d), k_s: (B,T) -> (B,S,T). No causal mask.
    """
    dots = jnp.einsum("bshd,btd->bsht", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bsht,bsh->bst", jax.nn.relu(dots), w,
                      precision=jax.lax.Precision.HIGHEST) * k_s[:, None, :]


def select_topk(scores: jax.Array, q_pos: jax.Array, topk: int) -> tuple[jax.Array, jax.Array]:
    """Top-min(topk, T) causal key positions per query.

    scores: (B,S,T) f32; q_pos: (B,S) int position of each query (key t sits at position t).
    -> idx (B,S,k) int32, valid (B,S,k) bool (False for picks past the query's position, which
    happen only when fewer than k keys are visible).
    """
    t = scores.shape[-1]
    causal = jnp.arange(t)[None, None, :] <= q_pos[..., None]
    _, idx = jax.lax.top_k(jnp.where(causal, scores, NEG_INF), min(topk, t))
    return idx, idx <= q_pos[..., None]


def _gather_keys(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (B,T,F), idx (B,S,k) -> (B,S,k,F)."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def sparse_mla(q_c, q_pe, c, k_pe, idx, valid, scale: float, dtype) -> jax.Array:
    """Absorbed MLA over the selected keys only.

    q_c: (B,S,H,C) query mapped into latent space, q_pe: (B,S,H,R), c: (B,T,C) latent cache,
    k_pe: (B,T,R), idx/valid: (B,S,k) -> (B,S,H,C) attention-weighted latent, in `dtype`.
    """
    c_sel, pe_sel = _gather_keys(c, idx), _gather_keys(k_pe, idx)  # (B,S,k,C), (B,S,k,R)
    hp = jax.lax.Precision.HIGHEST
    scores = (jnp.einsum("bshc,bskc->bshk", q_c.astype(jnp.float32), c_sel.astype(jnp.float32),
                         precision=hp)
              + jnp.einsum("bshr,bskr->bshk", q_pe.astype(jnp.float32),
                           pe_sel.astype(jnp.float32), precision=hp)) * scale
    scores = jnp.where(valid[:, :, None, :], scores, NEG_INF)
    p = jax.nn.softmax(scores, axis=-1)
    return einsum("bshk,bskc->bshc", p, c_sel, dtype)


def dense_mla(q_nope, q_pe, k_nope, k_pe, v, mask, scale: float, dtype) -> jax.Array:
    """Unabsorbed MLA (multi-head over all keys) with a boolean mask (B,S,T).

    q_nope: (B,S,H,dn), q_pe: (B,S,H,R), k_nope: (B,T,H,dn), k_pe: (B,T,R), v: (B,T,H,dv)
    -> (B,S,H,dv) in `dtype`.
    """
    hp = jax.lax.Precision.HIGHEST
    f32 = jnp.float32
    scores = (jnp.einsum("bshd,bthd->bsht", q_nope.astype(f32), k_nope.astype(f32), precision=hp)
              + jnp.einsum("bshr,btr->bsht", q_pe.astype(f32), k_pe.astype(f32), precision=hp))
    scores = jnp.where(mask[:, :, None, :], scores * scale, NEG_INF)
    p = jax.nn.softmax(scores, axis=-1)
    return einsum("bsht,bthd->bshd", p, v, dtype)


def over_query_chunks(fn, q_chunk: int, per_query: tuple, shared: tuple):
    """fn(*per_query_slices, *shared) over chunks of the S axis (axis 1) with lax.map.

    Pads S up to a multiple of q_chunk (pad rows are computed and dropped). Returns fn's
    outputs concatenated back along axis 1.
    """
    s = per_query[0].shape[1]
    if s <= q_chunk:
        return fn(*per_query, *shared)
    n = -(-s // q_chunk)
    pad = n * q_chunk - s

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        a = a.reshape(a.shape[0], n, q_chunk, *a.shape[2:])
        return jnp.moveaxis(a, 1, 0)

    outs = jax.lax.map(lambda xs: fn(*xs, *shared), tuple(split(a) for a in per_query))

    def merge(a):
        a = jnp.moveaxis(a, 0, 1)
        return a.reshape(a.shape[0], n * q_chunk, *a.shape[3:])[:, :s]

    return jax.tree.map(merge, outs)


class MLA(nn.Module):
    """Multi-head latent attention with DSA. x (B,S,D) at positions (B,S) -> (B,S,D).

    Without a cache the keys are the S tokens themselves (prefill from position 0, key t at
    position t). With a `KVCache` (B,T,...) the new keys are written at `positions` and the
    queries attend to every slot t <= their position: prefill chunks and decode steps alike.
    Returns (out, cache). Sows `index_scores` (B,S,T) and `topk` (B,S,k) into 'intermediates'
    when that collection is mutable.
    """

    cfg: Config
    impl: str = "xla"
    q_chunk: int = 256

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

    def __call__(self, x: jax.Array, positions: jax.Array, cos, sin, cache: KVCache | None = None):
        cfg = self.cfg
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl {self.impl!r} is not one of {ATTENTION_IMPLS}")
        b, s, _ = x.shape
        h, dn, r, dv, c_dim = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                               cfg.v_head_dim, cfg.kv_lora_rank)
        dtype = jnp.dtype(cfg.dtype)
        with jax.named_scope("q"):
            qr = self.q_norm(self.wq_a(x))  # (B,S,q_lora)
            q = self.wq_b(qr).reshape(b, s, h, dn + r)
            q_nope, q_pe = q[..., :dn], apply_rope(q[..., dn:], cos, sin, interleaved=True)
        with jax.named_scope("kv"):
            kv = self.wkv_a(x)  # (B,S,C+R)
            c = self.kv_norm(kv[..., :c_dim])  # (B,S,C)
            k_pe = apply_rope(kv[..., c_dim:], cos, sin, interleaved=True)  # (B,S,R)
            if cfg.fp8_activations:  # the FP8 latent cache
                c_q, c_s = act_quant(c, cfg.scale_fmt)
            else:
                c_q, c_s = c, jnp.ones((b, s, -(-c_dim // BLOCK)), jnp.float32)
        with jax.named_scope("indexer"):
            iq, iw = self.indexer.queries(x, qr, cos, sin)  # (B,S,n,d), (B,S,n)
            ik, iks = self.indexer.keys(x, cos, sin)  # (B,S,d), (B,S)
        if cache is None:
            c = act_dequant(c_q, c_s, dtype) if cfg.fp8_activations else c
        else:
            cache = cache.write(positions, c=c_q, c_scale=c_s, k_pe=k_pe, ik=ik, ik_scale=iks)
            c, k_pe, ik, iks = cache.latent(dtype), cache.k_pe, cache.ik, cache.ik_scale
        t = c.shape[1]

        def select(iq, iw, q_pos):
            return select_topk(index_scores(iq, iw, ik, iks), q_pos, cfg.index_topk)

        if self.is_mutable_collection("intermediates"):
            scores = index_scores(iq, iw, ik, iks)
            self.sow("intermediates", "index_scores", scores)
            idx, valid = select_topk(scores, positions, cfg.index_topk)
            self.sow("intermediates", "topk", idx)
        else:
            idx, valid = over_query_chunks(select, self.q_chunk, (iq, iw, positions), ())

        wkv_b = self.wkv_b.dense_weight().reshape(h, dn + dv, c_dim)
        if self.impl == "xla":
            with jax.named_scope("sparse_attention"):
                q_c = einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :dn], dtype)
                attend = lambda q_c, q_pe, idx, valid: sparse_mla(  # noqa: E731
                    q_c, q_pe, c, k_pe, idx, valid, cfg.softmax_scale, dtype)
                o_c = over_query_chunks(attend, self.q_chunk, (q_c, q_pe, idx, valid), ())
                o = einsum("bshc,hdc->bshd", o_c, wkv_b[:, dn:], dtype)
        else:
            with jax.named_scope("dense_attention"):
                kvb = self.wkv_b(c).reshape(b, t, h, dn + dv)
                picked = jnp.zeros((b, s, t), bool)
                picked = jax.vmap(jax.vmap(lambda row, i, v: row.at[i].set(v)))(picked, idx, valid)
                o = dense_mla(q_nope, q_pe, kvb[..., :dn], k_pe, kvb[..., dn:], picked,
                              cfg.softmax_scale, dtype)
        return self.wo(o.reshape(b, s, h * dv)), cache
