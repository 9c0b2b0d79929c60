"""Sampling (`sample`: greedy or nucleus, per row) and the model's forward over a contiguous cache
(`forward`, chunked `prefill` at any start position).

Generation itself runs on the serving engine's core (`engine.core.Engine`, `engine.batch`): these are
the pieces it shares, and the teacher-forced forward of `Model.logits`. All jitted functions are
module-level, over explicit params with the config static (no jitted method pins a model object).
Temperature, top-p and seeds are traced values (no recompilation). Caches are donated: every step
updates them in place.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.model.config import Config
from dsv32_jax.model.config import cdiv
from dsv32_jax.model.transformer import Transformer, init_cache, variables
from sharding.distributed import to_host
from sharding.mesh import on_mesh

PREFILL_CHUNK = 512
NONFINITE = -2  # `sample`'s answer for a logits row holding NaN/Inf
INTERMEDIATES = ("attn_in", "attn_out", "ffn_in", "ffn_out", "index_scores", "topk", "gate_experts")


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << max(int(n - 1).bit_length(), (minimum - 1).bit_length())


class NonFiniteLogits(ValueError):
    """A sequence's logits held NaN/Inf: it was stopped. `outputs`: the tokens every sequence had
    produced (the others ran to their end), `sequence`: the first failed one."""

    def __init__(self, msg: str, sequence: int, outputs: list[list[int]]):
        super().__init__(msg)
        self.sequence, self.outputs = sequence, outputs


def nucleus_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array):
    """logits (B,V) -> (order (B,V): the vocab ids by falling logit, their logits / temperature with
    the tokens outside the top-p nucleus at -inf): what `sample` draws from (temperature > 0)."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the most likely token
    return order, jnp.where(keep, sorted_logits, -jnp.inf)


def by_temperature(temperature: jax.Array, greedy, sampled, *args):
    """greedy(*args) where temperature <= 0, else sampled(*args) (the same structure of arrays).

    Lowered for the CPU this is a `lax.cond` (temperature unbatched: it stays one under vmap), so
    greedy decoding never runs the sampled branch, whose argsort of the vocabulary costs XLA:CPU
    ~0.2 ms per row, more than a decode step of the demo model. Elsewhere both are computed and
    `where` picks (no branch on a device value), as before. The same values either way."""
    def pick(*a):
        return jax.tree.map(partial(jnp.where, temperature <= 0), greedy(*a), sampled(*a))

    def branch(*a):
        return jax.lax.cond(temperature <= 0, greedy, sampled, *a)

    return jax.lax.platform_dependent(*args, cpu=branch, default=pick)


def over_rows(f, *args):
    """f vmapped over rows: the arguments' leading axis, but temperature and top_p (the last two)
    when they are () for the whole batch (then `by_temperature` stays a branch under vmap: a
    greedy batch never runs the sampled one on the CPU)."""
    sampling = (0 if jnp.ndim(args[-2]) else None, 0 if jnp.ndim(args[-1]) else None)
    return jax.vmap(f, (0,) * (len(args) - 2) + sampling)(*args)


def all_greedy_or(f, *args):
    """`over_rows(f, *args)`, where temperature and top_p (the last two) may be per row (B,).
    Batched, a temperature makes `by_temperature` compute both paths for every row (on XLA:CPU
    the nucleus sort of the vocabulary, ~0.2 ms a row: more than half a 32-sequence decode step of
    the demo model). So where every row is greedy, f runs with temperature () 0 and top_p () 1
    instead (a branch on the CPU, `by_temperature`): the same values, no sampled path."""
    *rest, temperature, top_p = args
    if not jnp.ndim(temperature):
        return over_rows(f, *args)
    return by_temperature(jnp.max(temperature),
                          lambda: over_rows(f, *rest, jnp.float32(0), jnp.float32(1)),
                          lambda: over_rows(f, *args))


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits (B,V) f32 -> tokens (B,) int32. temperature <= 0: greedy; else nucleus sampling.
    A row holding NaN/Inf gives NONFINITE instead of a token (the cheap check of every step)."""
    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(logits):
        order, nucleus = nucleus_logits(logits, temperature, top_p)
        choice = jax.random.categorical(key, nucleus, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    token = by_temperature(temperature, greedy, sampled, logits)
    return jnp.where(jnp.isfinite(logits).all(axis=-1), token, NONFINITE)


def _apply(params, tokens, positions, cache, last, cfg: Config, impl: str, collect: bool):
    module, v = Transformer(cfg, impl), variables(params)
    if collect:
        (logits, cache), state = module.apply(v, tokens, positions, cache, last,
                                              mutable=["intermediates"])
        return logits, cache, state["intermediates"]
    logits, cache = module.apply(v, tokens, positions, cache, last)
    return logits, cache, None


@partial(jax.jit, static_argnames=("cfg", "impl", "collect"), donate_argnames=("cache",))
def forward(params, tokens, positions, cache, last=None, *, cfg: Config, impl: str = "xla",
            collect: bool = False):
    """One forward of tokens (B,S) at positions (B,S), writing their keys into `cache` (donated:
    updated in place). -> (logits (B,S,V), or (B,V) at `last` (B,); cache; intermediates or None).
    collect=True also returns the per-layer values the same computation produced."""
    return _apply(params, tokens, positions, cache, last, cfg, impl, collect)


def prefill(params, cfg: Config, impl: str, tokens: np.ndarray, lengths: np.ndarray, cache,
            start=None, chunk: int = PREFILL_CHUNK, all_logits: bool = False,
            collect: bool = False):
    """Write a padded prompt batch (B, P) into `cache` at positions start+0..P-1 (start (B,) int,
    default 0), `chunk` tokens at a time (P must be a multiple of min(chunk, P)).

    Returns (logits, cache, intermediates): logits at each sequence's last prompt token (B, V),
    or at every position (B, P, V) with all_logits; intermediates (with collect) are the per-chunk
    values joined along the query axis (see `join_intermediates`), else None.
    """
    b, p = tokens.shape
    start = np.zeros(b, np.int32) if start is None else np.asarray(start, np.int32)
    chunk = min(chunk, p)
    if p % chunk:
        raise ValueError(f"padded prompt length {p} is not a multiple of the chunk {chunk}")
    outs, parts, last_logits = [], [], None
    for i in range(0, p, chunk):
        pos = start[:, None] + i + np.arange(chunk, dtype=np.int32)[None]
        in_chunk = None if all_logits else np.clip(lengths - 1 - i, 0, chunk - 1).astype(np.int32)
        with on_mesh(params):
            logits, cache, inter = forward(params, tokens[:, i:i + chunk], pos.astype(np.int32),
                                           cache, in_chunk, cfg=cfg, impl=impl, collect=collect)
        parts.append(inter)
        if all_logits:
            outs.append(logits)
            continue
        hit = ((lengths - 1 >= i) & (lengths - 1 < i + chunk))[:, None]
        last_logits = logits if last_logits is None else _pick(hit, logits, last_logits)
    logits = jnp.concatenate(outs, axis=1) if all_logits else last_logits
    return logits, cache, (join_intermediates(parts) if collect else None)


@jax.jit
def _pick(hit, new, old):
    return jnp.where(hit, new, old)


def join_intermediates(parts: list) -> dict:
    """Per-chunk intermediates -> {name: per-layer values over all chunks}: attn_in/attn_out/
    ffn_in/ffn_out (L,B,S,D), index_scores (L,B,S,T), topk (L,B,S,k) (-1: no pick),
    gate_experts (L_moe, B*S, k) sorted (row b*S + s)."""
    out = {}
    for name in INTERMEDIATES:
        per_chunk = []
        for tree in parts:
            found = [_find(tree.get(g, {}), name) for g in ("dense_layers", "moe_layers")]
            found = [f for f in found if f is not None]
            if found:
                per_chunk.append(jnp.concatenate(found, axis=0))
        if not per_chunk:
            continue
        if name == "gate_experts":  # rows are b*chunk + s: join along s per sequence
            bsz = out["attn_in"].shape[1]
            per_chunk = [g.reshape(g.shape[0], bsz, -1, g.shape[-1]) for g in per_chunk]
            joined = jnp.concatenate(per_chunk, axis=2)
            out[name] = joined.reshape(joined.shape[0], -1, joined.shape[-1])
        else:
            out[name] = jnp.concatenate(per_chunk, axis=2)
    return out


def _find(node, name):
    """The sown value `name` anywhere under node (sow stores a 1-tuple)."""
    if not isinstance(node, dict):
        return None
    if name in node:
        return node[name][0]
    for v in node.values():
        r = _find(v, name)
        if r is not None:
            return r
    return None


def nonfinite_error(params, cfg: Config, impl: str, prompt: list[int], produced: list[int],
                    sequence: int, outputs: list[list[int]]) -> NonFiniteLogits:
    """The error for sequence `sequence`, whose logits after prompt + produced were not finite,
    naming where a replay of those tokens first goes non-finite (`locate_nonfinite`)."""
    where = locate_nonfinite(params, cfg, impl, prompt + produced)
    return NonFiniteLogits(
        f"sequence {sequence}: the logits after {len(prompt)} prompt and {len(produced)} generated "
        f"tokens hold NaN or Inf, so it was stopped; {where}", sequence, outputs)


def locate_nonfinite(params, cfg: Config, impl: str, tokens: list[int]) -> str:
    """Where a forward over `tokens` (one sequence, from position 0) first goes non-finite: the
    first layer whose attention or FFN output holds NaN/Inf, else the final norm and head. It
    replays the prefill with intermediates (`prefill(collect=True)`): only after a failure."""
    try:
        s = len(tokens)
        chunk = min(PREFILL_CHUNK, bucket(s))
        padded = cdiv(s, chunk) * chunk
        t = np.zeros((1, padded), np.int32)
        t[0, :s] = tokens
        with on_mesh(params):
            cache = init_cache(cfg, 1, padded)
        logits, _, inter = prefill(params, cfg, impl, t, np.array([s], np.int32), cache, chunk=chunk,
                                   collect=True)
        bad = {k: to_host(jnp.any(~jnp.isfinite(inter[k][:, :, :s]), axis=(1, 2, 3)))
               for k in ("attn_out", "ffn_out")}
    except Exception as e:  # noqa: BLE001 - a diagnosis that failed must not hide the error itself
        return f"the search for the first non-finite layer failed ({type(e).__name__}: {e})"
    for layer in range(cfg.n_layers):
        ffn = "MoE" if layer >= cfg.n_dense_layers else "FFN"
        for k, part in (("attn_out", "attention"), ("ffn_out", ffn)):
            if bad[k][layer]:
                return f"the first non-finite output is layer {layer}'s {part}"
    if not to_host(jnp.isfinite(logits).all()):
        return "every layer's output is finite: the final norm or the output head overflows"
    return "a full forward over the same tokens stays finite (the layer could not be found)"
