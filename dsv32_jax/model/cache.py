"""The per-layer inference cache: MLA's latent `c` and rotary key `k_pe`, and the indexer's keys.

With FP8 simulation the latent and the indexer keys are stored as e4m3 + float32 scales, exactly
the values the release keeps (its MLA cache is 656 B/token/layer: 512 e4m3 + 4 fp32 scales + 64
bf16 k_pe). Without it they are stored in the compute dtype (scales are 1). Stacked caches carry a
leading layer axis; slot t holds the key at position t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dsv32_jax.model.config import BLOCK, Config
from dsv32_jax.model.quant import FP8, act_dequant


@struct.dataclass
class KVCache:
    c: jax.Array  # (B, T, C) e4m3 (FP8 simulation) or compute dtype
    c_scale: jax.Array  # (B, T, C/128) f32
    k_pe: jax.Array  # (B, T, R) compute dtype, rotated
    ik: jax.Array  # (B, T, d) indexer keys, e4m3 or compute dtype
    ik_scale: jax.Array  # (B, T) f32

    @classmethod
    def zeros(cls, cfg: Config, batch: int, length: int, layers: int | None = None) -> "KVCache":
        lead = (batch, length) if layers is None else (layers, batch, length)
        store = FP8 if cfg.fp8_activations else jnp.dtype(cfg.dtype)
        return cls(c=jnp.zeros((*lead, cfg.kv_lora_rank), store),
                   c_scale=jnp.ones((*lead, -(-cfg.kv_lora_rank // BLOCK)), jnp.float32),
                   k_pe=jnp.zeros((*lead, cfg.qk_rope_head_dim), cfg.dtype),
                   ik=jnp.zeros((*lead, cfg.index_head_dim), store),
                   ik_scale=jnp.ones(lead, jnp.float32))

    def write(self, positions: jax.Array, **new: jax.Array) -> "KVCache":
        """Store new entries (B, S, ...) at slots `positions` (B, S) of each sequence."""
        b = jnp.arange(positions.shape[0])[:, None]
        return self.replace(**{k: getattr(self, k).at[b, positions].set(v.astype(getattr(self, k).dtype))
                               for k, v in new.items()})

    def latent(self, dtype) -> jax.Array:
        """The latent cache (B, T, C) in `dtype` (dequantized)."""
        return act_dequant(self.c, self.c_scale, dtype)


def bytes_per_token(cfg: Config) -> dict[str, int]:
    """Bytes per token per layer as allocated: MLA (c, c_scale, k_pe) and indexer (ik, ik_scale)."""
    one = jax.eval_shape(lambda: KVCache.zeros(cfg, 1, 1))
    size = {k: int(v.size * v.dtype.itemsize) for k, v in vars(one).items()}
    mla = size["c"] + size["c_scale"] + size["k_pe"]
    indexer = size["ik"] + size["ik_scale"]
    return {"mla": mla, "indexer": indexer, "total": mla + indexer}
