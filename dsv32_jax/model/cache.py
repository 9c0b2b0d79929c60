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

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from dsv32_jax.model.config import BLOCK, Config, cdiv
from dsv32_jax.model.quant import FP8, act_dequant
# stored bits -> e4m3 / bf16 values; PAGE: slots per page of the paged cache (the kernels' too)
from pallas_kernels.common import FROM_BITS, PAGE, from_bits
from sharding.mesh import local


@struct.dataclass
class KVCache:
    c: jax.Array  # (L, B, T, C) e4m3 (FP8 simulation) or compute dtype, stored as BITS
    c_scale: jax.Array  # (L, B, T, C/128) f32
    k_pe: jax.Array  # (L, B, T, R) compute dtype, rotated, stored as BITS
    ik: jax.Array  # (L, B, T, d) indexer keys, e4m3 or compute dtype, stored as BITS
    ik_scale: jax.Array  # (L, B, T) f32

    # logical axes of each field (sharding.rules): sequences split over "data", the rest whole
    AXES: ClassVar[dict] = {"c": ("layers", "batch", "seq", "kv_lora"),
                            "c_scale": ("layers", "batch", "seq", None),
                            "k_pe": ("layers", "batch", "seq", None),
                            "ik": ("layers", "batch", "seq", "index_dim"),
                            "ik_scale": ("layers", "batch", "seq")}

    def axes(self) -> "KVCache":
        """The logical axes of each field, as a cache of name tuples (`sharding.mesh.local`)."""
        return self.replace(**self.AXES)

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
        """Store new entries (B, S, ...) of `layer` at slots `positions` (B, S), in place (on each
        device's own sequences under a mesh: `sharding.mesh.local`)."""
        def put(a, layer, p, v):  # a (L, B, T, ...), p (B, S), v (B, S, ...)
            return a.at[layer, jnp.arange(p.shape[0])[:, None], p].set(v)

        return self.replace(**{
            k: local(put, (self.AXES[k], (), ("batch", "seq"), self.AXES[k][1:]), self.AXES[k])(
                getattr(self, k), layer, positions, _store(v, getattr(self, k)))
            for k, v in new.items()})

    def gather(self, layer: jax.Array, idx: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """The selected rows of `layer`: idx (B, ...) slots (negative: invalid, reads slot 0) ->
        latent (B, ..., C) dequantized to `dtype` after the gather, k_pe (B, ..., R)."""
        def rows(a, layer, i):  # a (L, B, T, W), i (B, ...) -> (B, ..., W)
            b = jnp.arange(i.shape[0]).reshape(-1, *([1] * (i.ndim - 1)))
            return a[layer, b, i]

        slot = jnp.maximum(idx, 0)
        lead = ("batch",) + (None,) * (idx.ndim - 1)

        def pick(a):
            return local(rows, (KVCache.AXES["c"], (), lead), lead + (None,))(a, layer, slot)

        c = act_dequant(from_bits(pick(self.c)), pick(self.c_scale), dtype)
        return c, from_bits(pick(self.k_pe))

    def key_tile(self, layer: jax.Array, start: jax.Array, size: int):
        """Indexer keys of slots [start, start + size) of `layer`: (B, size, d), (B, size)."""
        def tile(ik, s, layer, start):  # (L, B, T, d), (L, B, T) -> (B, size, d), (B, size)
            zero = jnp.zeros((), jnp.int32)
            k = jax.lax.dynamic_slice(ik, (layer, zero, start, zero), (1, ik.shape[1], size, ik.shape[3]))
            sc = jax.lax.dynamic_slice(s, (layer, zero, start), (1, s.shape[1], size))
            return k[0], sc[0]

        k, s = local(tile, (self.AXES["ik"], self.AXES["ik_scale"], (), ()),
                     (("batch", "seq", None), ("batch", "seq")))(self.ik, self.ik_scale, layer, start)
        return from_bits(k), s

    def layer_latent(self, layer: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """Every slot of `layer`: latent (B, T, C) in `dtype`, k_pe (B, T, R). Only the dense
        reference attention (`attention_impl="xla_dense"`) reads a whole layer."""
        c = act_dequant(from_bits(self.c[layer]), self.c_scale[layer], dtype)
        return c, from_bits(self.k_pe[layer])

    def table(self) -> tuple[tuple, tuple]:
        """What the Pallas kernels read besides the fields (their `pages` argument), and its
        logical axes: nothing for the contiguous cache."""
        return (), ()


@struct.dataclass
class PagedKVCache(KVCache):
    """The same cache in pages (the serving engine's, `dsv32_jax.serve`): the fields hold one pool of
    rows per layer, (L, N, ...) with N = pages x PAGE, shared by every sequence, and `pages` (B, P)
    is the page table: logical slot t of sequence b lives in row pages[b, t // PAGE] * PAGE + t % PAGE.
    The model sees logical slots only (a length of P x PAGE): the indexer's key tiles and the
    attention's selected rows go through the table, one more index lookup, no copy (in the Pallas
    kernels too: `table()` is their `pages` argument). Page 0 is the
    pool's scratch page: table entries a sequence does not own point there, and slots past the
    table map there, so writes of padding land in it and nothing real ever reads it.

    Under a mesh the pool's rows are split over "data" as the sequences are ("pool"): each data
    group's block is a pool of its own, with its own scratch page 0, and its sequences' tables hold
    page ids within it. So every read and write runs on each device's own block
    (`sharding.mesh.local`), as the contiguous cache's do. `pages` is None in a pool at rest; a step
    sets it (`with_pages`)."""

    pages: jax.Array | None = None  # (B, P) int32 page ids (within the sequence's data group)

    AXES: ClassVar[dict] = {"c": ("layers", "pool", "kv_lora"), "c_scale": ("layers", "pool", None),
                            "k_pe": ("layers", "pool", None), "ik": ("layers", "pool", "index_dim"),
                            "ik_scale": ("layers", "pool")}
    TABLE: ClassVar[tuple] = ("batch", None)

    @classmethod
    def pool(cls, cfg: Config, layers: int, n_pages: int) -> "PagedKVCache":
        """An empty pool of n_pages pages (page 0 the scratch page) for `layers` layers."""
        flat = KVCache.zeros(cfg, layers, 1, n_pages * PAGE)
        return cls(**{k: getattr(flat, k)[:, 0] for k in KVCache.AXES})

    def with_pages(self, pages: jax.Array | None) -> "PagedKVCache":
        return self.replace(pages=pages)

    def table(self) -> tuple[tuple, tuple]:
        return (self.pages,), (self.TABLE,)

    def axes(self) -> "PagedKVCache":
        """As `KVCache.axes`, and the page table's: each device's own sequences' rows."""
        return super().axes().replace(pages=self.TABLE)

    @property
    def length(self) -> int:
        return self.pages.shape[1] * PAGE

    @staticmethod
    def rows(pages: jax.Array, slots: jax.Array) -> jax.Array:
        """Logical slots (B, ...) of the sequences whose tables are `pages` (B, P) -> pool rows
        (B, ...); slots outside the table (negative, or past its P pages: a run's padding) map
        into the scratch page."""
        b = jnp.arange(slots.shape[0]).reshape(-1, *([1] * (slots.ndim - 1)))
        n = pages.shape[1]
        inside = (slots >= 0) & (slots < n * PAGE)
        page = jnp.where(inside, pages[b, jnp.clip(slots // PAGE, 0, n - 1)], 0)
        return page * PAGE + jnp.maximum(slots, 0) % PAGE

    def _pick(self, fields: tuple[str, ...], layer, slots: jax.Array, lead: tuple) -> tuple:
        """The pool rows of each of `fields` at logical `slots` (B, ...) of `layer`, each
        (B, ..., W), read on each device's own sequences and pool block (the rows looked up once);
        lead: the slots' logical axes."""
        def pick(pools, p, layer, s):
            r = self.rows(p, s)
            return tuple(pools[k][layer, r] for k in fields)

        return local(pick, ({k: self.AXES[k] for k in fields}, self.TABLE, (), lead),
                     tuple(lead + self.AXES[k][2:] for k in fields))(
            {k: getattr(self, k) for k in fields}, self.pages, layer, slots)

    def write(self, layer: jax.Array, positions: jax.Array, **new: jax.Array) -> "PagedKVCache":
        fields = tuple(new)  # (dicts come back from `local` in sorted key order)

        def put(pools, p, layer, s, vals):  # pools (L, N, ...), p (B, P), s (B, S), vals (B, S, ...)
            r = self.rows(p, s)
            return tuple(pools[k].at[layer, r].set(vals[k]) for k in fields)

        out = local(put, ({k: self.AXES[k] for k in fields}, self.TABLE, (), ("batch", "seq"),
                          {k: ("batch", "seq") + self.AXES[k][2:] for k in fields}),
                    tuple(self.AXES[k] for k in fields))(
            {k: getattr(self, k) for k in fields}, self.pages, layer, positions,
            {k: _store(v, getattr(self, k)) for k, v in new.items()})
        return self.replace(**dict(zip(fields, out)))

    def gather(self, layer: jax.Array, idx: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        c, c_s, k_pe = self._pick(("c", "c_scale", "k_pe"), layer, idx,
                                  ("batch",) + (None,) * (idx.ndim - 1))
        return act_dequant(from_bits(c), c_s, dtype), from_bits(k_pe)

    def key_tile(self, layer: jax.Array, start: jax.Array, size: int):
        slots = jnp.broadcast_to(start + jnp.arange(size), (self.pages.shape[0], size))
        k, k_s = self._pick(("ik", "ik_scale"), layer, slots, ("batch", None))
        return from_bits(k), k_s

    def layer_latent(self, layer: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        return self.gather(layer, jnp.broadcast_to(jnp.arange(self.length),
                                                   (self.pages.shape[0], self.length)), dtype)


# Narrow float payloads are kept as their bit patterns: XLA:CPU widens a float8 / bf16 array it
# updates in place (to f16 / f32, whole, every step); unsigned ints of the same width it does not.
# One map for the cache and the kernels that read it (`pallas_kernels.common.FROM_BITS`).
BITS = {v: k for k, v in FROM_BITS.items()}


def _stored(dtype) -> jnp.dtype:
    return BITS.get(jnp.dtype(dtype), jnp.dtype(dtype))


def _store(v: jax.Array, into: jax.Array) -> jax.Array:
    """New values in the stored type (bit patterns for e4m3 / bf16)."""
    if into.dtype in FROM_BITS:
        return jax.lax.bitcast_convert_type(v.astype(FROM_BITS[into.dtype]), into.dtype)
    return v.astype(into.dtype)


def bytes_per_token(cfg: Config) -> dict[str, int]:
    """Bytes per token per layer as allocated: MLA (c, c_scale, k_pe) and indexer (ik, ik_scale)."""
    one = jax.eval_shape(lambda: KVCache.zeros(cfg, 1, 1, 1))
    size = {k: int(v.size * v.dtype.itemsize) for k, v in vars(one).items()}
    mla = size["c"] + size["c_scale"] + size["k_pe"]
    indexer = size["ik"] + size["ik_scale"]
    return {"mla": mla, "indexer": indexer, "total": mla + indexer}
