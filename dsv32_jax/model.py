"""The decoder: embedding, scanned blocks (dense-FFN layers, then MoE layers), final norm, fp32 head.

Each group of identical layers is one `nn.scan`, so a 61-layer model compiles two block bodies,
not 61 copies. Params are stacked with a leading 'layers' axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsv32_jax.attention import MLA
from dsv32_jax.config import Config
from dsv32_jax.layers import Embed, Linear, RMSNorm
from dsv32_jax.moe import FFN, MoE
from dsv32_jax.rope import rope_tables


class Block(nn.Module):
    """(h, residual) -> (h', residual'): fused-add norm, MLA, fused-add norm, FFN or MoE."""

    cfg: Config
    moe: bool
    impl: str = "xla"

    @nn.compact
    def __call__(self, carry, positions, cos, sin):
        cfg = self.cfg
        h, residual = carry
        x, residual = RMSNorm(cfg.rms_norm_eps, "embed", name="attn_norm")(h, residual)
        self.sow("intermediates", "attn_in", x)
        with jax.named_scope("attn"):
            h = MLA(cfg, self.impl, name="attn")(x, positions, cos, sin)
        self.sow("intermediates", "attn_out", h)
        x, residual = RMSNorm(cfg.rms_norm_eps, "embed", name="ffn_norm")(h, residual)
        self.sow("intermediates", "ffn_in", x)
        with jax.named_scope("moe" if self.moe else "ffn"):
            h = MoE(cfg, name="ffn")(x) if self.moe else FFN(cfg, cfg.inter_dim, name="ffn")(x)
        self.sow("intermediates", "ffn_out", h)
        return (h, residual), None


def _stack(cfg: Config, moe: bool, n: int, impl: str, name: str):
    scanned = nn.scan(
        Block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=n,
        metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, moe, impl, name=name)


class Transformer(nn.Module):
    """tokens (B,S) int at positions (B,S) -> logits (B,S,V) float32 (one forward, no cache)."""

    cfg: Config
    impl: str = "xla"

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        cos, sin = rope_tables(cfg, positions)
        h = Embed(cfg, name="embed")(tokens)
        carry = (h, jnp.zeros_like(h))  # residual 0: the first fused add is exact (h + 0 = h)
        if cfg.n_dense_layers:
            carry, _ = _stack(cfg, False, cfg.n_dense_layers, self.impl, "dense_layers")(
                carry, positions, cos, sin)
        if cfg.n_moe_layers:
            carry, _ = _stack(cfg, True, cfg.n_moe_layers, self.impl, "moe_layers")(
                carry, positions, cos, sin)
        h, _ = RMSNorm(cfg.rms_norm_eps, "embed", name="norm")(*carry)
        head = Linear(cfg, cfg.dim, cfg.vocab_size, ("vocab", "embed"), f32=True, name="head")
        return head(h.astype(jnp.float32))
