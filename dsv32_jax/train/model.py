"""The training forward: the inference modules' parameters and pure functions, over a whole sequence
at positions 0..S-1 with no KV cache, returning per-layer indexer statistics beside the logits.

`TrainMLA` subclasses the inference `MLA` (same `setup`, so the same params tree) and only replaces
`__call__`; the inference path is not touched. Per stage:

  dense   attention over every causal key (`attention.dense_mla`), LM loss trains the main model.
  warmup  dense attention as above; the indexer is fitted to the main attention: per query, the
          target is the attention probabilities summed over heads and L1-normalized, the loss
          KL(target || softmax(index scores over the causal keys)).
  sparse  attention over the indexer's top-k only (`attention.sparse_mla` on rows gathered from the
          layer's own latents: real sparse attention, O(S*k), not a dense mask); the indexer's KL is
          restricted to the selected set (target: the sparse attention's own probabilities).

The indexer reads `stop_gradient` copies of its inputs (x and the query latent qr) and the KL
target is detached, so the KL never reaches the main model; the top-k indices are integers, so the
LM loss never reaches the indexer.

Every stage also measures the indexer's recall of the dense attention mass: the share of the
(head-averaged, detached) dense attention probability inside the top-k the indexer picks, over the
queries that see more keys than index_topk (the others attend everything: recall 1 trivially).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsv32_jax.model.attention import MLA, NEG_INF, dense_mla, index_scores, sparse_mla
from dsv32_jax.model.config import Config
from dsv32_jax.model.layers import Embed, Linear, RMSNorm
from dsv32_jax.model.moe import EXPERTS, FFN, MoE
from dsv32_jax.model.mtp import SharedHead, mtp_input
from dsv32_jax.model.quant import einsum
from dsv32_jax.model.rope import rope_tables
from dsv32_jax.model.transformer import ACT, layer_counts
from sharding.mesh import constrain

STAGES = ("dense", "warmup", "sparse", "mtp")  # mtp: `step.losses`
REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
STATS = ("kl", "recall")  # per-layer scalars every stage returns


def _kl(target: jax.Array, logits: jax.Array, valid: jax.Array) -> jax.Array:
    """KL(target || softmax(logits)) over the last axis restricted to `valid` -> (...) f32.
    target is a distribution on the valid entries (0 elsewhere)."""
    logq = jax.nn.log_softmax(jnp.where(valid, logits, NEG_INF), axis=-1)
    logt = jnp.log(jnp.where(target > 0, target, 1.0))
    return jnp.sum(jnp.where(valid & (target > 0), target * (logt - logq), 0.0), axis=-1)


def head_mean(p: jax.Array) -> jax.Array:
    """Attention probabilities (B,S,H,T) -> summed over heads, L1-normalized (B,S,T)."""
    s = p.sum(2)
    return s / jnp.maximum(s.sum(-1, keepdims=True), 1e-30)


def recall(target: jax.Array, idx: jax.Array, positions: jax.Array, topk: int):
    """Mass of `target` (B,S,T) on the picked slots idx (B,S,k) (-1: none), averaged over the
    queries with more than `topk` visible keys. -> (recall, number of such queries)."""
    picked = jnp.take_along_axis(target, jnp.maximum(idx, 0), -1)
    mass = jnp.sum(jnp.where(idx >= 0, picked, 0.0), -1)  # (B,S)
    counted = positions >= topk  # position p sees p+1 keys
    n = counted.sum()
    return jnp.where(n > 0, jnp.sum(jnp.where(counted, mass, 0.0)) / jnp.maximum(n, 1), 1.0), n


class TrainMLA(MLA):
    """MLA for training: x (B,S,D) at positions (B,S), no cache -> (out (B,S,D), {kl, recall})."""

    stage: str = "sparse"

    def __call__(self, x, positions, cos, sin):  # noqa: D102  (replaces MLA.__call__)
        cfg = self.cfg
        b, s, _ = x.shape
        h, dn, dv, c_dim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        dtype = jnp.dtype(cfg.dtype)
        qr, q_nope, q_pe, c, k_pe = self.project(x, cos, sin)  # every key: a token of this sequence

        # the indexer on detached inputs: its loss (the KL) cannot reach the main model
        xd, qrd = jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr)
        iq, iw = self.indexer.queries(xd, qrd, cos, sin)
        ik, iks = self.indexer.keys(xd, cos, sin)
        logits = index_scores(iq, iw, ik, iks)  # (B,S,T) f32, T = S
        causal = positions[:, None, :] <= positions[:, :, None]  # (B,S,T): slot t = position t
        masked = jnp.where(causal, logits, NEG_INF)
        kk = min(cfg.index_topk, s)
        vals, idx = jax.lax.top_k(jax.lax.stop_gradient(masked), kk)
        idx = jnp.where(vals > NEG_INF, idx, -1)  # (B,S,k), -1: no visible key left

        wkv_b = self.wkv_b.dense_weight().reshape(h, dn + dv, c_dim)
        kvb = self.wkv_b(c).reshape(b, s, h, dn + dv)
        dense_scores = (einsum("bshd,bthd->bsht", q_nope, kvb[..., :dn], dtype, jnp.float32)
                        + einsum("bshr,btr->bsht", q_pe, k_pe, dtype, jnp.float32))
        # the dense attention distribution (detached): the warm-up target and the recall metric
        dense_p = jax.nn.softmax(jnp.where(causal[:, :, None, :],
                                           jax.lax.stop_gradient(dense_scores) * cfg.softmax_scale,
                                           NEG_INF), axis=-1)
        target = head_mean(dense_p)  # (B,S,T)
        self.sow("intermediates", "dense_attention", target)  # kept only when asked (notebooks/02)
        self.sow("intermediates", "topk", idx)  # the indexer's picks (notebooks/04)
        rec, _ = recall(target, idx, positions, cfg.index_topk)

        if self.stage in ("dense", "warmup"):
            o = dense_mla(q_nope, q_pe, kvb[..., :dn], k_pe, kvb[..., dn:], causal,
                          cfg.softmax_scale, dtype)
            kl = jnp.mean(_kl(target, masked, causal))
        else:
            def rows(i):  # the selected latent rows of this sequence: (B,S,k,C), (B,S,k,R)
                safe = jnp.maximum(i, 0)
                pick = jax.vmap(lambda a, j: a[j])
                return pick(c.astype(dtype), safe), pick(k_pe.astype(dtype), safe)

            q_c = einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :dn], dtype)
            o_c = sparse_mla(q_c, q_pe, idx, rows, cfg.softmax_scale, dtype)
            o = einsum("bshc,hdc->bshd", o_c, wkv_b[:, dn:], dtype)
            # the KL on the selected set: target = the sparse attention's own probabilities
            sel = idx >= 0
            sel_scores = jnp.take_along_axis(jax.lax.stop_gradient(dense_scores),
                                             jnp.broadcast_to(jnp.maximum(idx, 0)[:, :, None],
                                                              (b, s, h, kk)), -1)
            sel_p = jax.nn.softmax(jnp.where(sel[:, :, None], sel_scores * cfg.softmax_scale,
                                             NEG_INF), axis=-1)
            kl = jnp.mean(_kl(head_mean(sel_p), jnp.take_along_axis(logits, jnp.maximum(idx, 0), -1),
                              sel))
        out = self.wo(o.reshape(b, s, h * dv))
        return out, {"kl": kl, "recall": rec}


class TrainBlock(nn.Module):
    """(h, residual), layer -> (h', residual'), per-layer stats: the inference Block's layout."""

    cfg: Config
    moe: bool
    stage: str
    stack: int | None = None  # MoE: the routed-expert stack's layer count (`moe.Experts.stack`)

    @nn.compact
    def __call__(self, carry, layer, positions, cos, sin):
        cfg = self.cfg
        h, residual = carry
        h, residual = constrain(h, ACT), constrain(residual, ACT)
        x, residual = RMSNorm(cfg.rms_norm_eps, "embed", name="attn_norm")(h, residual)
        h, stats = TrainMLA(cfg, "xla", self.stage, name="attn")(x, positions, cos, sin)
        x, residual = RMSNorm(cfg.rms_norm_eps, "embed", name="ffn_norm")(h, residual)
        h = (MoE(cfg, self.stack, name="ffn")(x, layer) if self.moe
             else FFN(cfg, cfg.inter_dim, name="ffn")(x))
        return (constrain(h, ACT), constrain(residual, ACT)), stats


class TrainTransformer(nn.Module):
    """tokens (B,S) -> (logits (B,S,V) f32, {kl, recall}: (L,) per layer). Params: the inference
    Transformer's tree exactly (same module names and scans). Applied with
    mutable=["intermediates"], each layer also gives its dense attention distribution
    (`dense_attention`, (B,S,T): summed over heads, normalized; stacked per layer group)."""

    cfg: Config
    stage: str = "sparse"
    remat: str = "none"

    @nn.compact
    def __call__(self, tokens, hidden=False):
        """`hidden`: also return the head's input (B,S,D), which the MTP layers read."""
        cfg = self.cfg
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        cos, sin = rope_tables(cfg, positions)
        h = constrain(Embed(cfg, name="embed")(tokens), ACT)
        h, residual = h, jnp.zeros_like(h)
        stats = []
        block = TrainBlock
        if REMAT[self.remat] is not None:
            block = nn.remat(TrainBlock, policy=REMAT[self.remat], prevent_cse=False)
        for group, n in layer_counts(cfg).items():
            if n:
                scanned = nn.scan(
                    block, variable_axes={"params": 0, "intermediates": 0},
                    variable_broadcast=EXPERTS,
                    split_rngs={"params": True},
                    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=n,
                    metadata_params={nn.PARTITION_NAME: "layers"})
                (h, residual), st = scanned(cfg, group == "moe_layers", self.stage, name=group)(
                    (h, residual), jnp.arange(n), positions, cos, sin)
                stats.append(st)
        h, _ = RMSNorm(cfg.rms_norm_eps, "embed", name="norm")(h, residual)
        head = Linear(cfg, cfg.dim, cfg.vocab_size, ("vocab", "embed"), f32=True, name="head")
        stats = {k: jnp.concatenate([st[k] for st in stats]) for k in STATS}
        logits = head(h.astype(jnp.float32))
        return (logits, stats, h) if hidden else (logits, stats)


class TrainMTPLayer(nn.Module):
    """The inference `mtp.MTPLayer` without a cache: (h, (depth, tokens)) -> (h', (logits,
    stats)) over a whole sequence; the same params."""

    cfg: Config
    stage: str

    @nn.compact
    def __call__(self, h, xs, positions, cos, sin):
        cfg = self.cfg
        depth, tokens = xs
        x = mtp_input(cfg, h, tokens)
        block = TrainBlock(cfg, True, self.stage, cfg.n_mtp_layers, name="block")
        (x, residual), stats = block((x, jnp.zeros_like(x)), depth, positions, cos, sin)
        logits, h = SharedHead(cfg, name="shared_head")(x, residual)
        return h, (logits, stats)


def train_mtp(params: dict, cfg: Config, stage: str, h: jax.Array, tokens: jax.Array):
    """The MTP layers chained over whole sequences: params the MTP tree (the inference
    `mtp.mtp_stack`'s), h (B,S,D) the main head's input, tokens (B,S) -> logits (n_mtp,B,S,V) (layer
    d at position i predicts tokens[i + d + 2]; its input token is tokens[i + d + 1], 0 past the
    end: those positions have no target) and stats (n_mtp,) per STATS."""
    from dsv32_jax.model.transformer import variables

    n, (b, s) = cfg.n_mtp_layers, tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin = rope_tables(cfg, positions)
    shifted = jnp.stack([jnp.pad(tokens[:, d + 1:], ((0, 0), (0, d + 1))) for d in range(n)])
    scanned = nn.scan(TrainMTPLayer, variable_axes={"params": 0}, variable_broadcast=EXPERTS,
                      split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=n,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    _, (logits, stats) = scanned(cfg, stage).apply(variables(params), h, (jnp.arange(n), shifted),
                                                   positions, cos, sin)
    return logits, stats


@partial(jax.jit, static_argnames=("cfg", "stage", "remat"))
def apply(params, tokens, *, cfg: Config, stage: str, remat: str = "none"):
    """The training forward over the one params tree (see `transformer.variables`)."""
    from dsv32_jax.model.transformer import variables

    return TrainTransformer(cfg, stage, remat).apply(variables(params), tokens)
