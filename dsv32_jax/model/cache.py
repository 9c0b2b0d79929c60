"""The inference cache of a group of layers: MLA's latent `c` and rotary key `k_pe`, and the
indexer's keys, stacked over layers.

With FP8 simulation the latent and the indexer keys are stored as e4m3 + float32 scales, exactly
the values the release keeps (its MLA cache is 656 B/token/layer: 512 e4m3 + 4 fp32 scales + 64
bf16 k_pe). Without it they are stored in the compute dtype (scales are 1). e4m3 and bf16 values
are held as their bit patterns (uint8 / uint16, see `BITS`). Slot t holds the key at
position t.

The cache travels through the layer scan as part of the carry: each layer writes its new rows in
place (a scatter at [layer, b, position]) and reads only what it needs: the indexer a key tile at a
time, the attention the selected rows (`gather`). No layer's cache is ever copied whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dsv32_jax.model.config import BLOCK, Config, cdiv
from dsv32_jax.model.quant import FP8, act_dequant


@struct.dataclass
class KVCache:
    c: jax.Array  # (L, B, T, C) e4m3 (FP8 simulation) or compute dtype, stored as BITS
    c_scale: jax.Array  # (L, B, T, C/128) f32
    k_pe: jax.Array  # (L, B, T, R) compute dtype, rotated, stored as BITS
    ik: jax.Array  # (L, B, T, d) indexer keys, e4m3 or compute dtype, stored as BITS
    ik_scale: jax.Array  # (L, B, T) f32

    @classmethod
    def zeros(cls, cfg: Config, layers: int, batch: int, length: int) -> "KVCache":
        lead = (layers, batch, length)
        store = _stored(FP8 if cfg.fp8_activations else cfg.dtype)
        return cls(c=jnp.zeros((*lead, cfg.kv_lora_rank), store),
                   c_scale=jnp.ones((*lead, cdiv(cfg.kv_lora_rank, BLOCK)), jnp.float32),
                   k_pe=jnp.zeros((*lead, cfg.qk_rope_head_dim), _stored(cfg.dtype)),
                   ik=jnp.zeros((*lead, cfg.index_head_dim), store),
                   ik_scale=jnp.ones(lead, jnp.float32))

    @property
    def length(self) -> int:
        return self.c.shape[2]

    def write(self, layer: jax.Array, positions: jax.Array, **new: jax.Array) -> "KVCache":
        """Store new entries (B, S, ...) of `layer` at slots `positions` (B, S), in place."""
        b = jnp.arange(positions.shape[0])[:, None]
        return self.replace(**{k: getattr(self, k).at[layer, b, positions].set(_store(v, getattr(self, k)))
                               for k, v in new.items()})

    def gather(self, layer: jax.Array, idx: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """The selected rows of `layer`: idx (B, ...) slots (negative: invalid, reads slot 0) ->
        latent (B, ..., C) dequantized to `dtype` after the gather, k_pe (B, ..., R)."""
        b = jnp.arange(idx.shape[0]).reshape(-1, *([1] * (idx.ndim - 1)))
        slot = jnp.maximum(idx, 0)
        c = act_dequant(_load(self.c[layer, b, slot]), self.c_scale[layer, b, slot], dtype)
        return c, _load(self.k_pe[layer, b, slot])

    def key_tile(self, layer: jax.Array, start: jax.Array, size: int):
        """Indexer keys of slots [start, start + size) of `layer`: (B, size, d), (B, size)."""
        b, d = self.ik.shape[1], self.ik.shape[3]
        zero = jnp.zeros((), jnp.int32)
        ik = jax.lax.dynamic_slice(self.ik, (layer, zero, start, zero), (1, b, size, d))
        s = jax.lax.dynamic_slice(self.ik_scale, (layer, zero, start), (1, b, size))
        return _load(ik[0]), s[0]

    def layer_latent(self, layer: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """Every slot of `layer`: latent (B, T, C) in `dtype`, k_pe (B, T, R). Only the dense
        reference attention (`attention_impl="xla_dense"`) reads a whole layer."""
        return act_dequant(_load(self.c[layer]), self.c_scale[layer], dtype), _load(self.k_pe[layer])


# Narrow float payloads are kept as their bit patterns: XLA:CPU widens a float8 / bf16 array it
# updates in place (to f16 / f32, whole, every step); unsigned ints of the same width it does not.
BITS = {jnp.dtype(FP8): jnp.dtype(jnp.uint8), jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16)}
_FLOATS = {v: k for k, v in BITS.items()}


def _stored(dtype) -> jnp.dtype:
    return BITS.get(jnp.dtype(dtype), jnp.dtype(dtype))


def _store(v: jax.Array, into: jax.Array) -> jax.Array:
    """New values in the stored type (bit patterns for e4m3 / bf16)."""
    if into.dtype in _FLOATS:
        return jax.lax.bitcast_convert_type(v.astype(_FLOATS[into.dtype]), into.dtype)
    return v.astype(into.dtype)


def _load(v: jax.Array) -> jax.Array:
    """Stored values back as compute operands (bit patterns -> e4m3 / bf16)."""
    return jax.lax.bitcast_convert_type(v, _FLOATS[v.dtype]) if v.dtype in _FLOATS else v


def bytes_per_token(cfg: Config) -> dict[str, int]:
    """Bytes per token per layer as allocated: MLA (c, c_scale, k_pe) and indexer (ik, ik_scale)."""
    one = jax.eval_shape(lambda: KVCache.zeros(cfg, 1, 1, 1))
    size = {k: int(v.size * v.dtype.itemsize) for k, v in vars(one).items()}
    mla = size["c"] + size["c_scale"] + size["k_pe"]
    indexer = size["ik"] + size["ik_scale"]
    return {"mla": mla, "indexer": indexer, "total": mla + indexer}
