"""The serving engine's jitted programs: a forward of a batch of token runs over the paged pool,
then a sample per sequence (`step`); with speculative decoding, the same with the MTP layer's pool
and draft state (`spec_prefill`), and a draft-verify iteration (`spec_decode`).

A run is S tokens of one sequence at consecutive positions: a prefill chunk (S up to the chunk) or a
decode step (S = 1); padding tokens sit after the real ones (their keys land in the sequence's own
unused slots or in the scratch page, and no real query sees them). With multi-step scheduling a
decode step is `decode_steps`: up to n tokens per sequence, each sampled token fed back on the
device. Shapes are bucketed (batch, S and the page-table width P, each a power of two), so a server
compiles a fixed set of programs. The pools are donated: every step writes them in place.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsv32_jax.engine import speculative as spec
from dsv32_jax.engine.generate import NONFINITE, all_greedy_or, sample
from dsv32_jax.model.cache import PagedKVCache
from dsv32_jax.model.config import Config
from dsv32_jax.model.mtp import mtp_forward
from dsv32_jax.model.transformer import Transformer, constrain_cache, layer_counts, variables
from sharding.mesh import constrain, context_mesh


def inputs(host: dict[str, np.ndarray], mesh=None) -> dict[str, jax.Array]:
    """A step's host arrays (int32, uint32, float32 or bool) -> the same on the device, in one transfer
    (replicated over `mesh`, or on the default device): one packed int32 buffer, cut apart by one small
    program. A program called with numpy arguments moves each one itself, and the calling thread lets go
    of the interpreter lock for each: a step's ~10 arguments were ~10 waits for the HTTP thread to hand
    it back."""
    layout = tuple((k, x.shape, x.dtype.str) for k, x in host.items())
    buf = np.concatenate([_words(x) for x in host.values()])
    if mesh is None:
        dev = jax.device_put(buf)
    else:
        dev = jax.make_array_from_callback(buf.shape, NamedSharding(mesh, PartitionSpec()), lambda i: buf[i])
    return dict(zip(host, _unpack(dev, layout)))


def _words(x: np.ndarray) -> np.ndarray:
    if x.dtype == bool:
        return x.astype(np.int32).ravel()
    if x.dtype.itemsize != 4 or x.dtype.kind not in "iuf":
        raise TypeError(f"a step input must be 4-byte numbers or bools, got {x.dtype}")
    return np.ascontiguousarray(x).view(np.int32).ravel()


@partial(jax.jit, static_argnums=1)
def _unpack(buf: jax.Array, layout: tuple) -> tuple[jax.Array, ...]:
    out, at = [], 0
    for _, shape, dtype in layout:
        n = int(np.prod(shape))
        x = buf[at:at + n].reshape(shape)  # int32
        dt = np.dtype(dtype)
        out.append(x != 0 if dt == bool else x if dt == np.int32 else jax.lax.bitcast_convert_type(x, dt))
        at += n
    return tuple(out)


@partial(jax.jit, static_argnums=(0, 1, 2))
def pools(cfg: Config, n_pages: int, mtp: bool = False) -> dict[str, PagedKVCache]:
    """Empty pools of n_pages pages for every layer group (and, with mtp, for the MTP layers:
    "mtp", the same page ids). Under a mesh with data > 1 they are split over data into pools of
    n_pages / data pages, one per data group (`model.cache.PagedKVCache`)."""
    mesh = context_mesh()
    if mesh is not None and n_pages % mesh.shape["data"]:
        raise ValueError(f"a pool of {n_pages} pages does not split over data = {mesh.shape['data']} "
                         "groups of whole pages")
    counts = layer_counts(cfg) | ({"mtp": cfg.n_mtp_layers} if mtp else {})
    return {g: constrain_cache(PagedKVCache.pool(cfg, n, n_pages)) for g, n in counts.items() if n}


@partial(jax.jit, static_argnums=(0, 1))
def draft_slots(cfg: Config, n: int) -> spec.Drafts:
    """Each running sequence's speculative state between steps, in its slot (0: the padding lanes'
    scratch slot): `speculative.Drafts`' d (n,), q (n,V), h (n,D) (x and pos: unused)."""
    zero = jnp.zeros(n, jnp.int32)
    return spec.Drafts(zero, zero, zero, jnp.zeros((n, cfg.vocab_size), jnp.float32),
                       jnp.zeros((n, cfg.dim), cfg.dtype))


def _open(pools, table):
    """The pools as the caches of the sequences whose page tables are `table` (B,P)."""
    return {g: p.with_pages(table) for g, p in pools.items()}


def _close(caches):
    """The caches back as pools at rest (no page table)."""
    return {g: c.with_pages(None) for g, c in caches.items()}


def _split(caches):
    """The layer groups' caches, the MTP layer's."""
    return {g: c for g, c in caches.items() if g != "mtp"}, caches["mtp"]


def _whole(*xs):
    """The tokens a step returns, on every device: in a multi-process run with data > 1 process 0
    reads them all (the others follow without reading)."""
    return tuple(constrain(x, (None,) * x.ndim) for x in xs)


def _keys(seeds, counters):
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)


def _sample(logits, keys, temperature, top_p):
    """A token per row (B,) from logits (B,V), each row with its key and sampling values (B,)."""
    return all_greedy_or(lambda lg, k, t, p: sample(lg[None], k, t, p)[0], logits, keys, temperature,
                         top_p)


def _keep(slots: spec.Drafts, slot, d, q, h) -> spec.Drafts:
    """slots with rows `slot` (B,) set to the drafts d (B,), their distributions q (B,V) and the
    MTP hidden states h (B,D)."""
    return slots._replace(d=slots.d.at[slot].set(d), q=slots.q.at[slot].set(q),
                          h=slots.h.at[slot].set(h.astype(slots.h.dtype)))


@partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("pools",))
def step(params, pools, table, tokens, positions, last, seeds, counters, temperature, top_p, *,
         cfg: Config, impl: str):
    """tokens (B,S) at positions (B,S) of the sequences whose page tables are `table` (B,P); `last`
    (B,) the index of each run's last real token. -> (next token per sequence (B,) int32, sampled
    from the logits at `last` with its own temperature/top_p (B,) and key fold_in(key(seed),
    counter); `NONFINITE` where those logits were not finite), the pools."""
    token, cache = _forward(params, _open(pools, table), tokens, positions, last,
                            _keys(seeds, counters), temperature, top_p, cfg, impl)
    return *_whole(token), _close(cache)


def _forward(params, cache, tokens, positions, last, keys, temperature, top_p, cfg, impl):
    logits, cache = Transformer(cfg, impl).apply(variables(params), tokens, positions, cache, last)
    return _sample(logits, keys, temperature, top_p), cache


@partial(jax.jit, static_argnames=("cfg", "impl", "width"), donate_argnames=("pools",))
def decode_steps(params, pools, table, x, pos, n, left, stops, seeds, counters, temperature,
                 top_p, *, cfg: Config, impl: str, width: int):
    """Up to n <= width decode steps in one program (multi-step scheduling; n is an argument, so
    one program serves every n): each sequence's pending token x (B,) at pos (B,), then the token
    sampled after it, and so on, each step as `step` computes it (the key of its k-th token
    fold_in(key(seed), counter + k)). A row stops after a token in its `stops` (B,K) (-1: none),
    a non-finite row (`NONFINITE`) or its `left` (B,) tokens; the loop ends when every row has
    (padding rows: left 0). The page table must hold the slots up to pos + min(n, left) - 1.
    -> (tokens (B,width): each row's, then -1; how many of a row's tokens had their keys written,
    besides the pending token's (B,); the pools)."""
    b = x.shape[0]

    def more(state):
        i, _, _, live, _, _ = state
        return (i < n) & jnp.any(live)

    def body(state):
        i, x, pos, live, out, cache = state
        tok, cache = _forward(params, cache, x[:, None], pos[:, None], jnp.zeros(b, jnp.int32),
                              _keys(seeds, counters + i), temperature, top_p, cfg, impl)
        tok = jnp.where(live, tok, -1)
        out = out.at[:, i].set(tok)
        live = live & (i + 1 < left) & (tok != NONFINITE) & ~jnp.any(tok[:, None] == stops, -1)
        return i + 1, jnp.maximum(tok, 0), pos + 1, live, out, cache

    state = (jnp.int32(0), x, pos, left > 0, jnp.full((b, width), -1, jnp.int32),
             _open(pools, table))
    out, cache = jax.lax.while_loop(more, body, state)[4:]
    return *_whole(out, jnp.maximum(jnp.sum(out != -1, axis=1) - 1, 0)), _close(cache)


@partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("pools", "slots"))
def spec_prefill(params, mtp, pools, slots, table, tokens, positions, last, after, ends, slot,
                 seeds, counters, temperature, top_p, *, cfg: Config, impl: str):
    """`step`, and the MTP layer (params `mtp`, pool pools["mtp"]) at the same positions: at each
    it reads the main head's input and the token after it, `after` (B,S) (the next prompt token),
    save at `last` where `ends` (B,): the run reaches the end of the sequence's tokens, and the
    token after is the one sampled here. Its keys are written; its logits at `last` give the
    first draft after the sampled token, kept in `slots` at rows `slot` (B,).
    -> (sampled token (B,), pools, slots)."""
    cache, mtp_cache = _split(_open(pools, table))
    logits, cache, hidden = Transformer(cfg, impl).apply(variables(params), tokens, positions,
                                                         cache, last, hidden=True)
    keys = _keys(seeds, counters)
    token = _sample(logits, keys, temperature, top_p)
    rows = jnp.arange(tokens.shape[0])
    after = after.at[rows, last].set(jnp.where(ends, jnp.maximum(token, 0), after[rows, last]))
    logits, h, mtp_cache = mtp_forward(mtp, cfg, hidden, after, positions, mtp_cache, 0, impl,
                                       last=last)
    d, q = spec.drafts(logits, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), temperature,
                       top_p)
    slots = _keep(slots, slot, d, q, h[rows, last])
    return *_whole(token), _close(cache | {"mtp": mtp_cache}), slots


@partial(jax.jit, static_argnames=("cfg", "impl", "k"), donate_argnames=("pools", "slots"))
def spec_decode(params, mtp, pools, slots, table, x, pos, slot, seeds, counters, temperature,
                top_p, *, cfg: Config, impl: str, k: int):
    """One speculative iteration (`speculative.iteration`: k drafts chained from the state in
    `slots` at rows `slot` (B,), verified by one forward over x (B,) at pos (B,) and the drafts)
    over the paged pools. -> (n (B,) drafts accepted, tokens (B,k+1): the n drafts, the next
    token, then -1; pools, slots with the next iteration's state)."""
    cache, mtp_cache = _split(_open(pools, table))
    s = spec.Drafts(x, pos, slots.d[slot], slots.q[slot], slots.h[slot])
    n, tokens, _, nxt, cache, mtp_cache = spec.iteration(
        params, mtp, cache, mtp_cache, s, _keys(seeds, counters), temperature, top_p, cfg=cfg,
        impl=impl, k=k)
    slots = _keep(slots, slot, nxt.d, nxt.q, nxt.h)
    return *_whole(n, tokens), _close(cache | {"mtp": mtp_cache}), slots


def pool_bytes(cfg: Config, n_pages: int, mtp: bool = False) -> int:
    """Device bytes of `pools(cfg, n_pages, mtp)`."""
    shapes = jax.eval_shape(lambda: pools(cfg, n_pages, mtp))
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def pages_for_bytes(cfg: Config, budget: int, mtp: bool = False) -> int:
    """The most pages whose pools fit in `budget` bytes."""
    per_page = pool_bytes(cfg, 2, mtp) - pool_bytes(cfg, 1, mtp)
    return max(0, budget - pool_bytes(cfg, 1, mtp)) // per_page + 1
