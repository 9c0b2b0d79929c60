"""A generation session that keeps its KV cache between calls: a chat continues from the cache of the
previous turn instead of prefilling the whole conversation again.

``ChatSession(model, max_len)`` holds one sequence (batch 1). ``stream(new_ids, ...)`` writes ``new_ids``
into the cache at the current length, then decodes, and every generated token stays in the cache: the
next call continues after it. Slot t of the cache holds position t and a query only sees the slots at or
before its position, so slots past ``length`` are invisible until they are written again: ``truncate(n)``
is free, and ``prepare(ids)`` keeps the longest common prefix of the cache and a new context.

Compilation is done ahead of time and timed apart from the run: each new shape (the prefill bucket, the
cache capacity) is compiled once per process with ``.lower().compile()``; ``on_compile`` hears about it
before it starts, and ``stats`` gets ``compile_s`` separately from the steady-state ``prefill_s`` /
``decode_s``.

The cache grows with the conversation: its capacity is a power of two (at least ``MIN_CAPACITY``, at most
``max_len``); growing copies the filled slots into a larger cache (one new decode-step compile per
capacity).

``speculative=k`` decodes with the model's MTP layer drafting k tokens per forward of the model
(``engine.speculative``; the same greedy tokens, the same distribution). The session then also keeps the MTP
layer's cache, and the token an iteration ends on (the correction or bonus token) is yielded before its keys
are written: ``written`` counts the tokens in the cache, and the next call writes the rest first.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.engine import generate as gen
from dsv32_jax.engine import speculative as spec
from dsv32_jax.engine.checks import check_budget, check_sampling
from dsv32_jax.engine.generate import bucket
from dsv32_jax.model.mtp import init_mtp_cache
from dsv32_jax.model.transformer import init_cache
from sharding.distributed import to_host
from sharding.mesh import on_mesh

MIN_CAPACITY = 1024
PIECE = 512  # prefill at most this many tokens per call


_EXECUTABLES: dict = {}  # (kind, cfg, impl, shapes, param shardings) -> compiled executable


def _ids(values, what: str) -> list[int]:
    out = []
    for v in np.asarray(values).reshape(-1).tolist() if isinstance(values, np.ndarray) else values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{what} must be non-negative integer token ids, got {v!r}")
        out.append(int(v))
    return out


@jax.jit
def _copy_into(new, old):
    """The slots of `old` at the start of the larger cache `new` (same structure, longer sequence axis)."""
    return jax.tree.map(lambda n, o: jax.lax.dynamic_update_slice(n, o.astype(n.dtype), (0,) * n.ndim), new, old)


class ChatSession:
    """One sequence with a kept KV cache. ``model``: a ``dsv32_jax.Model``; ``max_len``: the most positions
    the session may use (default and maximum: the model's max_position_embeddings).

    ``on_compile(label, seconds)`` is called with ``seconds=None`` just before a new shape is compiled (it can
    take a while) and again with the compile time once it is done.
    """

    def __init__(self, model, max_len: int | None = None,
                 on_compile: Callable[[str, float | None], None] | None = None, speculative: int = 0) -> None:
        cfg = model.config
        if max_len is None:
            max_len = cfg.max_seq_len
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) \
                or not 2 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be an int in [2, {cfg.max_seq_len}] (max_position_embeddings), "
                             f"got {max_len!r}")
        if speculative:
            spec.check(speculative, model.mtp)
        self.model, self.max_len, self.on_compile = model, int(max_len), on_compile
        self.speculative = int(speculative)
        self._cfg, self._impl = cfg, model.attention_impl
        self._tokens: list[int] = []
        self._written = 0  # of _tokens, the first `_written` are in the cache
        self._cache = self._mtp_cache = None
        self._h = None  # speculative: the model's head input at position _written - 1 (1, D), or None
        self._verified = None  # speculative: (the head input at base.. (1, k+1, D), base) of the last iteration
        self._capacity = 0
        self._params_key = None

    # -------------------------------------------------------------------------------------------- state

    @property
    def length(self) -> int:
        """Positions in use: the tokens written into the cache so far."""
        return len(self._tokens)

    @property
    def room(self) -> int:
        """Positions left: new ids plus new tokens of the next ``stream`` must fit in this."""
        return self.max_len - len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """The ids in the cache, in order (a copy)."""
        return list(self._tokens)

    @property
    def written(self) -> int:
        """Tokens whose keys are in the cache (all but the last one a speculative call yielded)."""
        return self._written

    @property
    def capacity(self) -> int:
        """Slots of the cache as allocated now (0 before the first call)."""
        return self._capacity

    def reset(self) -> None:
        """Forget the conversation and free the cache."""
        self._tokens = []
        self._drop_cache()

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` positions (no device work: later slots are simply written again)."""
        if not 0 <= n <= len(self._tokens):
            raise ValueError(f"cannot truncate a session of {len(self._tokens)} tokens to {n}")
        del self._tokens[n:]
        if n < self._written:
            self._written, self._h, self._verified = n, None, None

    def prepare(self, context: Sequence[int]) -> list[int]:
        """Make the session a prefix of ``context`` (keeping the longest common prefix in the cache) and
        return the ids of ``context`` still to prefill (at least one, so that there are logits to sample
        from). Pass them to ``stream``."""
        context = _ids(context, "context")
        if not context:
            raise ValueError("the context must have at least one token")
        n = 0
        for a, b in zip(self._tokens, context):
            if a != b:
                break
            n += 1
        n = min(n, len(context) - 1)
        self.truncate(n)
        return context[n:]

    # -------------------------------------------------------------------------------------------- generation

    def stream(self, new_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
               top_p: float = 0.95, seed: int = 0, stop_tokens: Sequence[int] | None = None,
               stats: dict | None = None) -> Iterator[int]:
        """Prefill ``new_ids`` (at least one id) after the current context, then yield up to
        ``max_new_tokens`` sampled tokens, stopping after a stop token (default: EOS), which is yielded.

        Arguments are checked now (ValueError); the work starts with the first ``next``. Every yielded token
        is in the cache; stopping the iteration early keeps what was yielded. temperature 0 is greedy.
        ``stats`` (a dict) receives prefill_tokens, prefill_s, decode_steps, decode_s (steady state: compile
        time excluded), compile_s and compiled (labels of the shapes compiled during this call).
        """
        temperature, top_p = check_sampling(temperature, top_p)
        ids = _ids(new_ids, "new_ids")
        if not ids:
            raise ValueError("new_ids must have at least one token (the logits to sample from come from it)")
        vocab = self._cfg.vocab_size
        bad = [t for t in ids if not t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside [0, {vocab})")
        n = check_budget(self.length + len(ids), max_new_tokens, self.max_len)
        stops = [self._cfg.eos_token_id] if stop_tokens is None else _ids(stop_tokens, "stop_tokens")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        stats = {} if stats is None else stats
        stats.update(prefill_tokens=0, prefill_s=0.0, decode_steps=0, decode_s=0.0, compile_s=0.0, compiled=[])
        if self.speculative:
            stats.update(iterations=0, accepted=[0] * self.speculative)
            return self._speculate(ids, n, temperature, top_p, int(seed), frozenset(stops), stats)
        return self._generate(ids, n, temperature, top_p, int(seed), frozenset(stops), stats)

    def _generate(self, ids, n, temperature, top_p, seed, stops, stats) -> Iterator[int]:
        context = list(self._tokens)
        try:
            logits = self._prefill(ids, self.length + len(ids) + n, stats)
        except BaseException:  # the context stays as it was; the cache may have been given to the call
            self._tokens = context
            self._drop_cache()
            raise
        key = jax.random.key(seed)
        temp, topp = jnp.float32(temperature), jnp.float32(top_p)
        for _ in range(n):
            try:
                exe = self._executable("decode step", ("step",), stats, lambda: gen.step.lower(
                    self.model.params, self._cache, jnp.zeros(1, jnp.int32), key, temp, topp, logits,
                    cfg=self._cfg, impl=self._impl))
                t0 = time.perf_counter()
                key, sub = jax.random.split(key)
                token, logits, self._cache = exe(self.model.params, self._cache,
                                                 jnp.full(1, self.length, jnp.int32), sub, temp, topp, logits)
                tok = int(to_host(token)[0])
                if tok == gen.NONFINITE:
                    produced = self._tokens[len(context) + len(ids):]
                    raise gen.nonfinite_error(self.model.params, self._cfg, self._impl,
                                              self._tokens[:len(context) + len(ids)], produced, 0,
                                              [produced])
            except gen.NonFiniteLogits:
                raise
            except BaseException:  # e.g. Ctrl-C inside the call, whose cache was donated: rebuilt next time
                self._drop_cache()
                raise
            stats["decode_s"] += time.perf_counter() - t0
            stats["decode_steps"] += 1
            self._tokens.append(tok)
            self._written = len(self._tokens)
            yield tok  # the cache holds every token yielded: closing the iteration here loses nothing
            if tok in stops:
                return

    def _speculate(self, ids, n, temperature, top_p, seed, stops, stats) -> Iterator[int]:
        """`_generate` with k drafts an iteration (`engine.speculative`)."""
        context, k, mtp = list(self._tokens), self.speculative, self.model.mtp
        try:
            logits = self._prefill(ids, self.length + len(ids) + n, stats)
        except BaseException:
            self._tokens = context
            self._drop_cache()
            raise
        key = jax.random.key(seed)
        temp, topp = jnp.float32(temperature), jnp.float32(top_p)
        prompt_end, left = len(self._tokens), n
        pos = jnp.full(1, self.length, jnp.int32)
        try:
            exe = self._executable("speculative start", ("begin",), stats, lambda: spec.begin.lower(
                mtp, self._mtp_cache, logits, self._h, pos, key, temp, topp, cfg=self._cfg, impl=self._impl))
            t0 = time.perf_counter()
            key, sub = jax.random.split(key)
            x, drafts, self._mtp_cache = exe(mtp, self._mtp_cache, logits, self._h, pos, sub, temp, topp)
            tokens, end = to_host(x), self.length
        except BaseException:
            self._drop_cache()
            raise
        while True:  # yield tokens[:], then run the next iteration
            stats["decode_s"] += time.perf_counter() - t0
            for t in tokens.tolist():
                if t == gen.NONFINITE:
                    produced = self._tokens[prompt_end:]
                    raise gen.nonfinite_error(self.model.params, self._cfg, self._impl,
                                              self._tokens[:prompt_end], produced, 0, [produced])
                self._tokens.append(t)
                self._written = min(len(self._tokens), end)
                stats["decode_steps"] += 1
                left -= 1
                yield t  # the cache holds every token yielded but the iteration's last one
                if t in stops or not left:
                    return
            try:
                exe = self._executable(f"speculative step (k={k})", ("step", k), stats, lambda: spec.step.lower(
                    self.model.params, mtp, self._cache, self._mtp_cache, drafts, key, temp, topp, cfg=self._cfg,
                    impl=self._impl, k=k))
                t0 = time.perf_counter()
                key, sub = jax.random.split(key)
                base = self.length - 1  # the position of the token the iteration starts from
                accepted, tokens, hidden, drafts, self._cache, self._mtp_cache = exe(
                    self.model.params, mtp, self._cache, self._mtp_cache, drafts, sub, temp, topp)
                a = int(to_host(accepted)[0])
            except BaseException:
                self._drop_cache()
                raise
            stats["iterations"] += 1
            for j in range(a):
                stats["accepted"][j] += 1
            tokens, end = to_host(tokens)[0, :a + 1], base + a + 1  # keys written up to end - 1
            self._written = min(len(self._tokens), end)
            self._verified = (hidden, base)  # `_prefill` picks the head input at _written - 1

    def _drop_cache(self) -> None:
        self._cache = self._mtp_cache = self._h = self._verified = None
        self._capacity = self._written = 0

    def _prefill(self, ids: list[int], needed: int, stats: dict):
        """Write the context's tokens not in the cache yet (all of them if the cache was dropped), then ``ids``,
        into a cache of at least ``needed`` slots; -> the logits after the last id. Speculative: the MTP layer's
        keys too, from the model's head input before the first written token (``_h``; unknown after a
        truncation: that token is written again)."""
        start = self._written
        if self._verified is not None:  # after speculative iterations: the head input there
            hidden, base = self._verified
            self._h, self._verified = hidden[:, start - 1 - base], None
        if self.speculative and self._h is None and start:
            start -= 1
        pending = self._tokens[start:] + ids
        del self._tokens[start:]
        self._written = start
        self._reserve(needed, stats)
        t0, compile_before = time.perf_counter(), stats["compile_s"]
        logits = None
        for i in range(0, len(pending), PIECE):
            piece = pending[i:i + PIECE]
            start = self.length
            size = min(bucket(len(piece)), self._capacity - start)
            tokens = np.zeros((1, size), np.int32)
            tokens[0, :len(piece)] = piece
            positions = (start + np.arange(size, dtype=np.int32))[None]
            last = np.array([len(piece) - 1], np.int32)
            if self.speculative:
                logits = self._prefill_mtp(tokens, positions, last, size, stats)
            else:
                exe = self._executable(f"prefill for bucket {size}", ("prefill", size), stats, lambda: gen.forward.lower(
                    self.model.params, tokens, positions, self._cache, last, cfg=self._cfg, impl=self._impl))
                logits, self._cache, _ = exe(self.model.params, jnp.asarray(tokens), jnp.asarray(positions),
                                             self._cache, jnp.asarray(last))
            self._tokens.extend(piece)
            self._written = len(self._tokens)
        jax.block_until_ready(logits)
        stats["prefill_tokens"] += len(pending)
        stats["prefill_s"] += time.perf_counter() - t0 - (stats["compile_s"] - compile_before)
        return logits

    def _prefill_mtp(self, tokens, positions, last, size: int, stats: dict):
        """One prefill piece through the model and the MTP layer (`generate.forward_mtp`) -> its logits."""
        mtp, h = self.model.mtp, self._h
        if h is None and not self.length:  # position -1 is not written anyway: the compile of later pieces
            h = jnp.zeros((1, self._cfg.dim), self._cfg.dtype)
        label = f"prefill with the MTP layer for bucket {size}"
        exe = self._executable(label, ("prefill mtp", size, h is None), stats, lambda: gen.forward_mtp.lower(
            self.model.params, mtp, tokens, positions, self._cache, self._mtp_cache, h, last, cfg=self._cfg,
            impl=self._impl))
        logits, self._h, _, self._cache, self._mtp_cache = exe(
            self.model.params, mtp, jnp.asarray(tokens), jnp.asarray(positions), self._cache, self._mtp_cache, h,
            jnp.asarray(last))
        return logits

    def _reserve(self, needed: int, stats: dict) -> None:
        """A cache of at least ``needed`` slots (and room for the padding of the next prefill piece)."""
        needed = min(self.max_len, max(needed, self.length + bucket(1)))
        if self._cache is not None and self._capacity >= needed:
            return
        capacity = min(self.max_len, max(MIN_CAPACITY, bucket(needed)))
        with on_mesh(self.model.params):
            cache = init_cache(self._cfg, 1, capacity)
            mtp_cache = init_mtp_cache(self._cfg, 1, capacity) if self.speculative else None
        if self._cache is not None:
            t0 = time.perf_counter()
            cache, mtp_cache = _copy_into((cache, mtp_cache), (self._cache, self._mtp_cache))
            jax.block_until_ready(cache)
            stats["prefill_s"] += time.perf_counter() - t0
        self._cache, self._mtp_cache, self._capacity = cache, mtp_cache, capacity

    def _executable(self, label: str, shape: tuple, stats: dict, lower: Callable):
        if self._params_key is None:
            self._params_key = tuple(getattr(x, "sharding", None) for x in jax.tree.leaves(self.model.params))
        key = (shape, self._capacity, self._cfg, self._impl, self._params_key)
        exe = _EXECUTABLES.get(key)
        if exe is None:
            label = f"{label} (cache {self._capacity})"
            if self.on_compile is not None:
                self.on_compile(label, None)
            t0 = time.perf_counter()
            with on_mesh(self.model.params):
                exe = lower().compile()
            dt = time.perf_counter() - t0
            _EXECUTABLES[key] = exe
            stats["compile_s"] += dt
            stats["compiled"].append(label)
            if self.on_compile is not None:
                self.on_compile(label, dt)
        return exe
