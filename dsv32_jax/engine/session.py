"""A chat session: one conversation continued turn after turn on the serving engine's core.

``ChatSession(model, max_len)`` keeps the conversation's tokens and an engine (``engine.core.Engine``, one
sequence, driven from the caller's thread) whose pool outlives the turns. ``stream(new_ids, ...)``
submits the conversation plus ``new_ids`` as one request and yields its tokens as the engine samples
them. The request is submitted with ``keep``: when a turn ends its sequence parks with its pages, and
the next turn resumes it (``Engine.resume``), so only the tokens after its computed keys run (the new
ids, and the last reply's final token, sampled but not yet run). ``truncate(n)`` and ``prepare(ids)``
edit the tokens only: on resuming, the sequence keeps its whole pages before the first change.

Compiles: a step program this process has not run yet is announced to ``on_compile(label, None)``
before it starts and ``(label, seconds)`` after (the compile and that first step), and ``stats``
gets ``compile_s`` apart from the steady-state ``prefill_s`` / ``decode_s``.

Every step reads page tables as wide as the pool (as the old contiguous cache was read whole), so a
session compiles its step programs once per pool size, not again as the conversation grows.

The pool grows with the conversation: it holds a power of two of positions (at least
``MIN_CAPACITY``, at most ``max_len``); growing builds a larger engine, whose first turn prefills the
whole conversation once.

``speculative=k``: the engine decodes with k drafts of the model's MTP layer per step
(``engine.speculative``; the same greedy tokens, the same distribution).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dsv32_jax.engine import generate as gen
from dsv32_jax.engine import speculative as spec
from dsv32_jax.engine.checks import check_budget, check_ids, check_sampling, check_seed
from dsv32_jax.engine.core import Engine
from dsv32_jax.engine.generate import bucket
from dsv32_jax.engine.scheduler import NONFINITE_FINISH, Sampling
from dsv32_jax.model.cache import PAGE
from dsv32_jax.model.config import cdiv

MIN_CAPACITY = 1024
PIECE = 512  # prefill at most this many tokens per step


class ChatSession:
    """One conversation. ``model``: a ``dsv32_jax.Model``; ``max_len``: the most positions the
    session may use (default and maximum: the model's max_position_embeddings).

    ``on_compile(label, seconds)`` is called with ``seconds=None`` just before a new step program
    is compiled (it can take a while) and again with the time once it is done.
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
        self._tokens: list[int] = []
        self._engine: Engine | None = None
        self._rid: int | None = None  # the conversation's request in the engine (parked between turns)

    # -------------------------------------------------------------------------------------------- state

    @property
    def length(self) -> int:
        """Positions in use: the conversation's tokens."""
        return len(self._tokens)

    @property
    def room(self) -> int:
        """Positions left: new ids plus new tokens of the next ``stream`` must fit in this."""
        return self.max_len - len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """The conversation's ids, in order (a copy)."""
        return list(self._tokens)

    @property
    def capacity(self) -> int:
        """Positions the engine's pool holds now (0 before the first call, after `reset` and after
        an interrupted step)."""
        return 0 if self._engine is None else self._engine.max_len

    def reset(self) -> None:
        """Forget the conversation and free the pool."""
        self._tokens = []
        self._drop()

    def _drop(self) -> None:
        self._engine = self._rid = None

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` positions (no device work)."""
        if not 0 <= n <= len(self._tokens):
            raise ValueError(f"cannot truncate a session of {len(self._tokens)} tokens to {n}")
        del self._tokens[n:]

    def prepare(self, context: Sequence[int]) -> list[int]:
        """Make the session a prefix of ``context`` (the longest common prefix of the two) and return
        the ids of ``context`` after it (at least one, so that there are logits to sample from).
        Pass them to ``stream``."""
        context = check_ids(context, "context", self.model.config.vocab_size)
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
        """Continue the conversation by ``new_ids`` (at least one id), then yield up to
        ``max_new_tokens`` sampled tokens, stopping after a stop token (default: EOS), which is yielded.

        Arguments are checked now (ValueError); the work starts with the first ``next``. Every yielded token
        joins the conversation; stopping the iteration early keeps what was yielded. temperature 0 is
        greedy. ``stats`` (a dict) receives prefill_tokens (computed: the prefix cache's pages are not),
        prefill_s, decode_steps (tokens yielded), decode_s (steady state: compile time excluded), compile_s
        and compiled (labels of the programs compiled during this call); speculative: iterations and
        accepted (per draft position).
        """
        cfg = self.model.config
        temperature, top_p = check_sampling(temperature, top_p)
        ids = check_ids(new_ids, "new_ids", cfg.vocab_size)
        if not ids:
            raise ValueError("new_ids must have at least one token (the logits to sample from come from it)")
        n = check_budget(self.length + len(ids), max_new_tokens, self.max_len)
        stops = (cfg.eos_token_id,) if stop_tokens is None else tuple(check_ids(stop_tokens, "stop_tokens"))
        sampling = Sampling(n, temperature, top_p, check_seed(seed) % (1 << 32), stops)
        return self._run(ids, sampling, {} if stats is None else stats)

    def _run(self, ids: list[int], sampling: Sampling, stats: dict) -> Iterator[int]:
        before = list(self._tokens)
        context = before + ids
        engine = self._reserve(len(context) + sampling.max_tokens)
        start = _Marks(engine)
        out, finish = [], []

        def emit(new: list[int], f: str | None) -> None:
            out.extend(new)
            if f is not None:
                finish.append(f)

        if self._rid is None:
            self._rid = engine.submit(context, sampling, emit, keep=True)
        else:  # the conversation's sequence, parked with its keys since the last turn
            engine.resume(self._rid, context, sampling, emit)
        rid = self._rid
        self._tokens, sent = list(context), 0
        try:
            for _ in engine.run():
                while sent < len(out):
                    self._tokens.append(out[sent])
                    sent += 1
                    yield out[sent - 1]  # closing the iteration here keeps what was yielded
            while sent < len(out):  # the last step's tokens
                self._tokens.append(out[sent])
                sent += 1
                yield out[sent - 1]
        except GeneratorExit:  # closed early: the request ends, its full pages stay cached
            engine.cancel(rid)
            for _ in engine.run():
                pass
            raise
        except BaseException:  # e.g. Ctrl-C inside a step, whose pools were donated: a new engine
            self._drop()  # next time (which prefills the conversation again)
            if not sent:
                self._tokens = before
            raise
        finally:
            start.report(engine, stats, sent)
        if finish and finish[0] == NONFINITE_FINISH:
            m, produced = self.model, out[:sent]
            raise gen.nonfinite_error(m.params, m.config, m.attention_impl, context, produced, 0,
                                      [produced])

    def _reserve(self, needed: int) -> Engine:
        """The engine, with a pool of at least ``needed`` positions."""
        if self._engine is not None and self._engine.max_len >= needed:
            return self._engine
        self._drop()  # the old pool goes before the new one is made
        capacity = min(self.max_len, max(MIN_CAPACITY, bucket(needed)))
        self._engine = Engine(self.model, max_batch=1, pages=cdiv(capacity, PAGE) + 1, chunk=PIECE,
                              max_waiting=1, max_prefill=1, speculative=self.speculative,
                              max_len=capacity, lockstep=True, on_compile=self.on_compile,
                              table=cdiv(capacity, PAGE))  # one table width: compiles per capacity only
        return self._engine


class _Marks:
    """An engine's counters at the start of a call: `report` puts the call's share in `stats`."""

    def __init__(self, engine: Engine):
        self.seconds = dict(engine.seconds)
        self.counts = dict(engine.sched.counts)
        self.accepted = list(engine.sched.accepted_at)
        self.compiled = len(engine.compiled)

    def report(self, engine: Engine, stats: dict, sent: int) -> None:
        c = {k: v - self.counts[k] for k, v in engine.sched.counts.items()}
        s = {k: v - self.seconds[k] for k, v in engine.seconds.items()}
        stats.update(prefill_tokens=c["prefix_query_tokens"] - c["prefix_hit_tokens"],
                     prefill_s=s["prefill"], decode_steps=sent, decode_s=s["decode"],
                     compile_s=s["compile"], compiled=engine.compiled[self.compiled:])
        if engine.k:
            stats.update(iterations=c["draft_tokens"] // engine.k,
                         accepted=[a - b for a, b in zip(engine.sched.accepted_at, self.accepted)])
