"""The multi-token-prediction (MTP) layer of the release: from the main model's hidden state at
position i and the token t_{i+1}, logits for the token t_{i+2}.

    x      = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])      (embedding first, then hidden)
    h'     = the decoder block of a MoE layer (MLA + DSA with its own indexer, MoE) on x
    logits = shared_head.head(shared_head.norm(h'))            (fp32 head, as the main head)

h_i is the main model's head input (its final-normed hidden state, `Transformer(hidden=True)`);
the layer returns its own head input as the next hidden state, so a chain of drafts feeds it back.
(MODEL_SPEC.md does not say which h; the serving engines that report the published acceptance
with the released weights feed the normed one, and recycle the MTP head's input the same way.)
The block is the main model's `Block`, with its own layer-stacked cache (`init_mtp_cache`) and its
own routed-expert stack. Params: the MTP layers stacked on a leading axis (`mtp_stack`, the layout
`checkpoint.weights.abstract_params(cfg, mtp=True)["mtp"]` describes); `mtp_forward` runs one.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsv32_jax.model.cache import KVCache
from dsv32_jax.model.config import Config
from dsv32_jax.model.layers import Embed, Linear, RMSNorm
from dsv32_jax.model.moe import EXPERTS
from dsv32_jax.model.rope import rope_tables
from dsv32_jax.model.transformer import ACT, Block, constrain_cache, variables
from sharding.mesh import constrain


class SharedHead(nn.Module):
    """h (B,S,D), residual -> (float32 logits (B,S,V), or (B,V) at `last` (B,); the normed hidden
    (B,S,D))."""

    cfg: Config

    @nn.compact
    def __call__(self, h, residual, last=None):
        cfg = self.cfg
        h, _ = RMSNorm(cfg.rms_norm_eps, "embed", name="norm")(h, residual)
        head = Linear(cfg, cfg.dim, cfg.vocab_size, ("vocab", "embed"), f32=True, name="head")
        picked = h if last is None else h[jnp.arange(h.shape[0]), last]
        return head(picked.astype(jnp.float32)), h


def mtp_input(cfg: Config, h: jax.Array, tokens: jax.Array) -> jax.Array:
    """eh_proj([enorm(embed(tokens)); hnorm(h)]) (B,S,D): the block's input. Called inside an MTP
    layer's compact `__call__` (the inference and the training one): its modules are the layer's."""
    e = RMSNorm(cfg.rms_norm_eps, "embed", name="enorm")(Embed(cfg, name="embed_tokens")(tokens))
    hn = RMSNorm(cfg.rms_norm_eps, "embed", name="hnorm")(h.astype(e.dtype))
    eh = Linear(cfg, 2 * cfg.dim, cfg.dim, ("embed", "eh_in"), cfg.quantized, name="eh_proj")
    return constrain(eh(jnp.concatenate([e, hn], -1)), ACT)


class MTPLayer(nn.Module):
    """(h (B,S,D), cache), (depth, tokens (B,S)) at positions (B,S) -> (h', cache'), logits.

    h: the hidden state the previous head read at each position; tokens: the token after each
    position. Writes the layer's keys into `cache` (layer index = depth), as the main blocks do."""

    cfg: Config
    impl: str = "xla"

    @nn.compact
    def __call__(self, carry, xs, positions, cos, sin, last=None):
        cfg = self.cfg
        h, cache = carry
        depth, tokens = xs
        x = mtp_input(cfg, h, tokens)
        block = Block(cfg, True, self.impl, cfg.n_mtp_layers, name="block")
        (x, residual, cache), _ = block((x, jnp.zeros_like(x), cache), depth, positions, cos, sin)
        logits, h = SharedHead(cfg, name="shared_head")(x, residual, last)
        return (h, constrain_cache(cache)), logits


def mtp_stack(cfg: Config, impl: str = "xla"):
    """Every MTP layer, chained (layer d reads layer d-1's hidden state and tokens[d]): the
    stacked params' layout, as `nn.scan` stacks the main decoder's."""
    scanned = nn.scan(
        MTPLayer, variable_axes={"params": 0, "intermediates": 0}, variable_broadcast=EXPERTS,
        split_rngs={"params": True, EXPERTS: False},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_mtp_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, impl)


def init_args(cfg: Config):
    """Example inputs of `mtp_stack(cfg).init` (one token): carry, xs, positions, cos, sin."""
    n = cfg.n_mtp_layers
    positions = jnp.zeros((1, 1), jnp.int32)
    cos, sin = rope_tables(cfg, positions)
    carry = (jnp.zeros((1, 1, cfg.dim), cfg.dtype), init_mtp_cache(cfg, 1, 1))
    return carry, (jnp.arange(n), jnp.zeros((n, 1, 1), jnp.int32)), positions, cos, sin


def init_mtp_cache(cfg: Config, batch: int, length: int) -> KVCache:
    """The MTP layers' own latent and indexer cache: (n_mtp_layers, batch, length, ...)."""
    return KVCache.zeros(cfg, cfg.n_mtp_layers, batch, length)


def _layer(params: dict, depth: int) -> dict:
    """MTP layer `depth`'s Flax variables: its slice of the stacked params, and the routed-expert
    stack whole (the block reads its experts at [depth])."""
    v = variables(params)
    return {"params": jax.tree.map(lambda a: a[depth], v["params"]), EXPERTS: v[EXPERTS]}


@partial(jax.jit, static_argnames=("cfg", "depth", "impl"))
def mtp_forward(params: dict, cfg: Config, h: jax.Array, tokens: jax.Array, positions: jax.Array,
                cache: KVCache, depth: int = 0, impl: str = "xla", last: jax.Array | None = None):
    """One MTP layer. params: the stacked MTP tree (`abstract_params(cfg, mtp=True)["mtp"]`);
    h (B,S,D): the hidden state the main head read at `positions` (`Transformer(hidden=True)`, or
    this function's own output for a chained draft); tokens (B,S): the token after each position;
    cache: `init_mtp_cache` (or a paged pool). -> (float32 logits (B,S,V) for the token two after
    each position, or (B,V) at `last` (B,) only; the new hidden state (B,S,D); the cache with this
    layer's keys written at `positions`)."""
    cos, sin = rope_tables(cfg, positions)
    (h, cache), logits = MTPLayer(cfg, impl).apply(_layer(params, depth), (h, cache),
                                                    (jnp.int32(depth), tokens), positions, cos, sin, last)
    return logits, h, cache
