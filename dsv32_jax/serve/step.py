"""The serving engine's one jitted program: a forward of a batch of token runs over the paged pool,
then a sample per sequence.

A run is S tokens of one sequence at consecutive positions: a prefill chunk (S up to the chunk) or a
decode step (S = 1); padding tokens sit after the real ones (their keys land in the sequence's own
unused slots or in the scratch page, and no real query sees them). Shapes are bucketed (batch, S and
the page-table width P, each a power of two), so a server compiles a fixed set of programs. The pools
are donated: every step writes them in place.
"""

from __future__ import annotations

from functools import partial

import jax

from dsv32_jax.engine.generate import sample
from dsv32_jax.model.cache import PagedKVCache
from dsv32_jax.model.config import Config
from dsv32_jax.model.transformer import Transformer, constrain_cache, layer_counts, variables


@partial(jax.jit, static_argnums=(0, 1))
def pools(cfg: Config, n_pages: int) -> dict[str, PagedKVCache]:
    """Empty pools of n_pages pages for every layer group."""
    return {g: constrain_cache(PagedKVCache.pool(cfg, n, n_pages))
            for g, n in layer_counts(cfg).items() if n}


@partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("pools",))
def step(params, pools, table, tokens, positions, last, seeds, counters, temperature, top_p, *,
         cfg: Config, impl: str):
    """tokens (B,S) at positions (B,S) of the sequences whose page tables are `table` (B,P); `last`
    (B,) the index of each run's last real token. -> (next token per sequence (B,) int32, sampled
    from the logits at `last` with its own temperature/top_p (B,) and key fold_in(key(seed),
    counter); `NONFINITE` where those logits were not finite), the pools."""
    cache = {g: p.with_pages(table) for g, p in pools.items()}
    logits, cache = Transformer(cfg, impl).apply(variables(params), tokens, positions, cache, last)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    token = jax.vmap(lambda lg, k, t, p: sample(lg[None], k, t, p)[0])(
        logits, keys, temperature, top_p)
    return token, {g: c.with_pages(None) for g, c in cache.items()}


def pool_bytes(cfg: Config, n_pages: int) -> int:
    """Device bytes of `pools(cfg, n_pages)`."""
    shapes = jax.eval_shape(lambda: pools(cfg, n_pages))
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def pages_for_bytes(cfg: Config, budget: int) -> int:
    """The most pages whose pools fit in `budget` bytes."""
    per_page = pool_bytes(cfg, 2) - pool_bytes(cfg, 1)
    return max(0, budget - pool_bytes(cfg, 1)) // per_page + 1
