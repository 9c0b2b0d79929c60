"""The decoder: embedding, scanned blocks (dense-FFN layers, then MoE layers), final norm, fp32 head.

Each group of identical layers is one `nn.scan`, so a 61-layer model compiles two block bodies,
not 61 copies. Params are stacked with a leading 'layers' axis, and so is each group's cache,
which rides in the scan's carry and is updated in place.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsv32_jax.model.attention import MLA
from dsv32_jax.model.cache import KVCache
from dsv32_jax.model.config import Config
from dsv32_jax.model.layers import Embed, Linear, RMSNorm
from dsv32_jax.model.moe import EXPERTS, FFN, MoE
from dsv32_jax.model.rope import rope_tables
from sharding.mesh import constrain

ACT = ("batch", "seq", "embed")  # logical axes of the residual stream (B, S, D)


class Block(nn.Module):
    """(h, residual, cache), layer index -> (h', residual', cache'): fused-add norm, MLA (writing
    this layer's keys into the group's stacked cache in place), fused-add norm, FFN or MoE."""

    cfg: Config
    moe: bool
    impl: str = "xla"
    stack: int | None = None  # MoE: the routed-expert stack's layer count (`moe.Experts.stack`)

    @nn.compact
    def __call__(self, carry, layer, positions, cos, sin):
        cfg = self.cfg
        h, residual, cache = carry
        h, residual = constrain(h, ACT), constrain(residual, ACT)
        x, residual = RMSNorm(cfg.rms_norm_eps, "embed", name="attn_norm")(h, residual)
        self.sow("intermediates", "attn_in", x)
        with jax.named_scope("attn"):
            h, cache = MLA(cfg, self.impl, name="attn")(x, positions, cos, sin, cache, layer)
        self.sow("intermediates", "attn_out", h)
        x, residual = RMSNorm(cfg.rms_norm_eps, "embed", name="ffn_norm")(h, residual)
        self.sow("intermediates", "ffn_in", x)
        with jax.named_scope("moe" if self.moe else "ffn"):
            h = (MoE(cfg, self.stack, name="ffn")(x, layer) if self.moe
                 else FFN(cfg, cfg.inter_dim, name="ffn")(x))
        self.sow("intermediates", "ffn_out", h)
        return (constrain(h, ACT), constrain(residual, ACT), constrain_cache(cache)), None


def _stack(cfg: Config, moe: bool, n: int, impl: str, name: str):
    scanned = nn.scan(
        Block, variable_axes={"params": 0, "intermediates": 0}, variable_broadcast=EXPERTS,
        split_rngs={"params": True, EXPERTS: False},  # EXPERTS: one key for the broadcast stack
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=n,
        metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, moe, impl, name=name)


def layer_counts(cfg: Config) -> dict[str, int]:
    return {"dense_layers": cfg.n_dense_layers, "moe_layers": cfg.n_moe_layers}


@partial(jax.jit, static_argnums=(0, 1, 2))
def init_cache(cfg: Config, batch: int, length: int) -> dict[str, KVCache]:
    """Empty caches for every layer group: {group: KVCache (layers, batch, length, ...)}. Under
    a mesh (`jax.set_mesh`) each is created in its shards (`KVCache.AXES`), never whole."""
    return {g: constrain_cache(KVCache.zeros(cfg, n, batch, length))
            for g, n in layer_counts(cfg).items() if n}


def constrain_cache(cache: KVCache) -> KVCache:
    return cache.replace(**{k: constrain(getattr(cache, k), axes) for k, axes in cache.AXES.items()})


class Transformer(nn.Module):
    """tokens (B,S) int at positions (B,S), cache -> (float32 logits, cache).

    The tokens' keys are written into the cache (`init_cache`) at `positions`, and each query
    attends to the cache slots at or before its position: a whole prompt, a prefill chunk or a
    decode step. Logits (B,S,V); `last` (B,) picks one position per sequence before the head:
    logits (B,V). Without positions and cache: a forward from position 0 into a fresh cache of
    length S (the same computation). `hidden`: also return the head's input at every position, the
    final-normed hidden state (B,S,D) that the MTP layer reads (`model.mtp`), `last` or not.
    """

    cfg: Config
    impl: str = "xla"

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None, last=None, hidden=False):
        cfg = self.cfg
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        if cache is None:
            cache = init_cache(cfg, b, s)
        cos, sin = rope_tables(cfg, positions)
        h = constrain(Embed(cfg, name="embed")(tokens), ACT)
        h, residual = h, jnp.zeros_like(h)  # residual 0: the first fused add is exact (h + 0 = h)
        new_cache = {}
        for group, n in layer_counts(cfg).items():
            if n:
                stack = _stack(cfg, group == "moe_layers", n, self.impl, group)
                (h, residual, new_cache[group]), _ = stack(
                    (h, residual, cache[group]), jnp.arange(n), positions, cos, sin)
        norm = RMSNorm(cfg.rms_norm_eps, "embed", name="norm")
        normed = norm(h, residual)[0] if hidden else None  # every position: the MTP layer reads it
        if last is not None:
            rows = jnp.arange(h.shape[0])
            h, residual = h[rows, last], residual[rows, last]
        h = normed if hidden and last is None else norm(h, residual)[0]
        head = Linear(cfg, cfg.dim, cfg.vocab_size, ("vocab", "embed"), f32=True, name="head")
        logits = head(h.astype(jnp.float32))
        return (logits, new_cache, normed) if hidden else (logits, new_cache)


def _is_expert_path(path: tuple[str, ...]) -> bool:
    return len(path) > 2 and path[1:3] == ("ffn", "experts")


def variables(params: dict) -> dict:
    """The one params tree users see -> Flax variables: routed-expert weights (paths
    moe_layers/ffn/experts/*) go to the EXPERTS collection, everything else to 'params'."""
    def split(tree, path, want):
        out = {}
        for k, v in tree.items():
            p = (*path, k)
            if isinstance(v, dict):
                sub = split(v, p, want)
                if sub:
                    out[k] = sub
            elif _is_expert_path(p) == want:
                out[k] = v
        return out

    out = {"params": split(params, (), False)}
    experts = split(params, (), True)
    if experts:
        out[EXPERTS] = experts
    return out


def merge_experts(variables: dict) -> dict:
    """Flax variables (from `init`) -> the one params tree (inverse of `variables`)."""
    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
        return out

    return merge(variables["params"], variables.get(EXPERTS, {}))
