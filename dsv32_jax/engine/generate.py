"""Cached generation: chunked prefill at any start position, then an on-device decode loop.

Shapes are bucketed (batch as given; prompt length to a power of two; cache length to prompt
bucket + new-token bucket), so each function compiles once per bucket, not per token or per prompt
length. Temperature, top-p, seeds and stop tokens are traced values (no recompilation).
Each decode step's attention reads only the indexer's top-k cache slots; the indexer reads all
slots of the bucket.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.model.config import Config
from dsv32_jax.model.transformer import Transformer, init_cache

MAX_STOP_TOKENS = 8


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << max(int(n - 1).bit_length(), (minimum - 1).bit_length())


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits (B,V) f32 -> tokens (B,) int32. temperature <= 0: greedy; else nucleus sampling."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the most likely token
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature <= 0, greedy, sampled)


class Generator:
    """Jitted prefill / decode for one model (the module is static; params are arguments)."""

    def __init__(self, cfg: Config, module: Transformer, prefill_chunk: int = 512):
        self.cfg, self.module, self.prefill_chunk = cfg, module, prefill_chunk

    # ---- jitted pieces ------------------------------------------------------------------------
    @partial(jax.jit, static_argnums=0, donate_argnums=(3,))
    def _prefill_chunk(self, params, tokens, cache, positions, last):
        return self.module.apply({"params": params}, tokens, positions, cache, last)

    @partial(jax.jit, static_argnums=0, donate_argnums=(2,))
    def _step(self, params, cache, pos, key, temperature, top_p, logits):
        """Sample from `logits`, then run the sampled tokens at `pos` -> (token, logits, cache)."""
        token = sample(logits, key, temperature, top_p)
        logits, cache = self.module.apply({"params": params}, token[:, None], pos[:, None], cache,
                                          jnp.zeros_like(pos))
        return token, logits, cache

    @partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
    def _decode_loop(self, params, cache, logits, n_out, pos, max_new, key, temperature, top_p,
                     stop_ids):
        """On-device loop: up to max_new tokens per sequence, stopping each on a stop token."""
        b = logits.shape[0]

        def cond(state):
            i, _, _, _, done, _, _ = state
            return (i < max_new) & ~jnp.all(done)

        def body(state):
            i, logits, cache, pos, done, out, key = state
            key, sub = jax.random.split(key)
            token = sample(logits, sub, temperature, top_p)
            out = out.at[:, i].set(jnp.where(done, -1, token))
            done = done | jnp.isin(token, stop_ids)

            def forward(args):
                cache, pos = args
                return self.module.apply({"params": params}, token[:, None], pos[:, None], cache,
                                         jnp.zeros_like(pos))

            logits, cache = jax.lax.cond((i + 1 < max_new) & ~jnp.all(done), forward,
                                         lambda args: (logits, args[0]), (cache, pos))
            return i + 1, logits, cache, pos + 1, done, out, key

        state = (jnp.int32(0), logits, cache, pos, jnp.zeros(b, bool),
                 jnp.full((b, n_out), -1, jnp.int32), key)
        _, _, cache, _, _, out, _ = jax.lax.while_loop(cond, body, state)
        return out, cache

    # ---- host-side API ------------------------------------------------------------------------
    def prefill(self, params, tokens: np.ndarray, lengths: np.ndarray, cache, start=None):
        """Write a padded prompt batch (B, P) into `cache` at positions start+0..P-1 (start (B,)
        int, default 0), in chunks of `prefill_chunk`. Returns (logits at each sequence's last
        prompt token (B, V), cache)."""
        b, p = tokens.shape
        start = np.zeros(b, np.int32) if start is None else np.asarray(start, np.int32)
        chunk = min(self.prefill_chunk, p)
        if p % chunk:
            raise ValueError(f"padded prompt length {p} is not a multiple of the chunk {chunk}")
        last_logits = None
        for i in range(0, p, chunk):
            pos = start[:, None] + i + np.arange(chunk, dtype=np.int32)[None]
            in_chunk = np.clip(lengths - 1 - i, 0, chunk - 1).astype(np.int32)
            logits, cache = self._prefill_chunk(params, jnp.asarray(tokens[:, i:i + chunk]), cache,
                                                jnp.asarray(pos), jnp.asarray(in_chunk))
            hit = jnp.asarray((lengths - 1 >= i) & (lengths - 1 < i + chunk))[:, None]
            last_logits = logits if last_logits is None else jnp.where(hit, logits, last_logits)
        return last_logits, cache

    def _setup(self, prompts, max_new_tokens, stop_tokens):
        cfg = self.cfg
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for p in prompts:
            bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside [0, {cfg.vocab_size})")
        lengths = np.array([len(p) for p in prompts], np.int32)
        p_bucket = bucket(int(lengths.max()))
        if p_bucket > self.prefill_chunk:
            p_bucket = -(-p_bucket // self.prefill_chunk) * self.prefill_chunk
        n_out = bucket(max_new_tokens)
        total = p_bucket + n_out
        if int(lengths.max()) + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt ({int(lengths.max())}) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds max_position_embeddings {cfg.max_seq_len}")
        total = min(total, cfg.max_seq_len)
        tokens = np.zeros((len(prompts), p_bucket), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        stops = [cfg.eos_token_id] if stop_tokens is None else list(stop_tokens)
        if len(stops) > MAX_STOP_TOKENS:
            raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(stops)}")
        stop_ids = np.full(MAX_STOP_TOKENS, -2, np.int32)
        stop_ids[:len(stops)] = stops
        return tokens, lengths, n_out, total, stop_ids

    def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
                 stop_tokens: Sequence[int] | None = None) -> list[list[int]]:
        tokens, lengths, n_out, total, stop_ids = self._setup(prompts, max_new_tokens, stop_tokens)
        cache = init_cache(self.cfg, len(prompts), total)
        logits, cache = self.prefill(params, tokens, lengths, cache)
        out, _ = self._decode_loop(params, cache, logits, n_out, jnp.asarray(lengths),
                                   jnp.int32(max_new_tokens), jax.random.key(seed),
                                   jnp.float32(temperature), jnp.float32(top_p),
                                   jnp.asarray(stop_ids))
        return [_trim(row, max_new_tokens, stop_ids) for row in np.asarray(out)]

    def stream(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
               stop_tokens: Sequence[int] | None = None, stats: dict | None = None
               ) -> Iterator[list[int | None]]:
        """Yields, per step, the new token of each sequence (None once it has stopped).
        `stats` (a dict) receives prefill_s, prefill_tokens, decode_s, decode_steps."""
        stats = {} if stats is None else stats
        tokens, lengths, _, total, stop_ids = self._setup(prompts, max_new_tokens, stop_tokens)
        t0 = time.perf_counter()
        cache = init_cache(self.cfg, len(prompts), total)
        logits, cache = self.prefill(params, tokens, lengths, cache)
        jax.block_until_ready(logits)
        stats.update(prefill_s=time.perf_counter() - t0, prefill_tokens=int(lengths.sum()),
                     decode_s=0.0, decode_steps=0)
        pos, key = jnp.asarray(lengths), jax.random.key(seed)
        done = np.zeros(len(prompts), bool)
        for _ in range(max_new_tokens):
            t0 = time.perf_counter()
            key, sub = jax.random.split(key)
            token, logits, cache = self._step(params, cache, pos, sub, jnp.float32(temperature),
                                              jnp.float32(top_p), logits)
            pos = pos + 1
            tok = np.asarray(token)
            stats["decode_s"] += time.perf_counter() - t0
            stats["decode_steps"] += 1
            yield [None if d else int(t) for t, d in zip(tok, done)]
            done |= np.isin(tok, stop_ids)
            if done.all():
                return


def _trim(row: np.ndarray, max_new: int, stop_ids: np.ndarray) -> list[int]:
    out = []
    for t in row[:max_new]:
        if t < 0:
            break
        out.append(int(t))
        if t in stop_ids:
            break
    return out
