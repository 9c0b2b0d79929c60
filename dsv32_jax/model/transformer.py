"""The decoder: embedding, scanned blocks (dense-FFN layers, then MoE layers), final norm, fp32 head.

Each group of identical layers is one `nn.scan`, so a 61-layer model compiles two block bodies,
not 61 copies. Params are stacked with a leading 'layers' axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsv32_jax.model.attention import MLA
from dsv32_jax.model.cache import KVCache
from dsv32_jax.model.config import Config
from dsv32_jax.model.layers import Embed, Linear, RMSNorm
from dsv32_jax.model.moe import FFN, MoE
from dsv32_jax.model.rope import rope_tables


class Block(nn.Module):
    """(h, residual), layer cache -> (h', residual'), new layer cache: fused-add norm, MLA,
    fused-add norm, FFN or MoE."""

    cfg: Config
    moe: bool
    impl: str = "xla"

    @nn.compact
    def __call__(self, carry, cache, positions, cos, sin):
        cfg = self.cfg
        h, residual = carry
        x, residual = RMSNorm(cfg.rms_norm_eps, "embed", name="attn_norm")(h, residual)
        self.sow("intermediates", "attn_in", x)
        with jax.named_scope("attn"):
            h, cache = MLA(cfg, self.impl, name="attn")(x, positions, cos, sin, cache)
        self.sow("intermediates", "attn_out", h)
        x, residual = RMSNorm(cfg.rms_norm_eps, "embed", name="ffn_norm")(h, residual)
        self.sow("intermediates", "ffn_in", x)
        with jax.named_scope("moe" if self.moe else "ffn"):
            h = MoE(cfg, name="ffn")(x) if self.moe else FFN(cfg, cfg.inter_dim, name="ffn")(x)
        self.sow("intermediates", "ffn_out", h)
        return (h, residual), cache


def _stack(cfg: Config, moe: bool, n: int, impl: str, name: str):
    scanned = nn.scan(
        Block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=n,
        metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, moe, impl, name=name)


def layer_counts(cfg: Config) -> dict[str, int]:
    return {"dense_layers": cfg.n_dense_layers, "moe_layers": cfg.n_moe_layers}


def init_cache(cfg: Config, batch: int, length: int) -> dict[str, KVCache]:
    """Empty caches for every layer group: {group: KVCache with a leading layer axis}."""
    return {g: KVCache.zeros(cfg, batch, length, n) for g, n in layer_counts(cfg).items() if n}


class Transformer(nn.Module):
    """tokens (B,S) int at positions (B,S) -> float32 logits.

    cache=None: one forward from position 0 (positions default to 0..S-1), returns logits
    (B,S,V). With a cache (`init_cache`), the tokens' keys are written at `positions` and
    (logits, new cache) is returned. `last` (B,) picks one position per sequence before the
    head: logits (B,V).
    """

    cfg: Config
    impl: str = "xla"

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None, last=None):
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        cos, sin = rope_tables(cfg, positions)
        h = Embed(cfg, name="embed")(tokens)
        carry = (h, jnp.zeros_like(h))  # residual 0: the first fused add is exact (h + 0 = h)
        new_cache = {}
        for group, n in layer_counts(cfg).items():
            if n:
                layer_cache = None if cache is None else cache[group]
                carry, new_cache[group] = _stack(cfg, group == "moe_layers", n, self.impl, group)(
                    carry, layer_cache, positions, cos, sin)
        h, residual = carry
        if last is not None:
            rows = jnp.arange(h.shape[0])
            h, residual = h[rows, last], residual[rows, last]
        h, _ = RMSNorm(cfg.rms_norm_eps, "embed", name="norm")(h, residual)
        head = Linear(cfg, cfg.dim, cfg.vocab_size, ("vocab", "embed"), f32=True, name="head")
        logits = head(h.astype(jnp.float32))
        return logits if cache is None else (logits, new_cache)
