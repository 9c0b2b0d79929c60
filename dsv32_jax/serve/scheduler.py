"""Continuous batching: which sequences run in the next step, and what their pages are.

A sequence is its tokens (the prompt, then each sampled token) and how many of them have their keys
in the cache (`computed`). Its next run feeds the tokens not yet computed, at most `chunk` of them:
several while it prefills, one (the token sampled last) while it decodes. A run that reaches the end
of the tokens samples the next one. So prefill and decode are one kind of step with other shapes;
the scheduler alternates prefill steps (up to `max_prefill` sequences) and decode steps (every
decoding sequence) while both have work.

Admission (first come, first served) happens when a running slot is free and the pages for the whole
prompt can be had, after the prefix cache lent its pages: those tokens are not prefilled again. A
decode that crosses into a new page takes one; when none is left, the newest running sequence is
preempted: its pages go back and it waits at the head of the queue to be recomputed (prompt and the
tokens it already produced, which are not sent again).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Callable

import numpy as np

from dsv32_jax.engine.generate import NONFINITE, bucket
from dsv32_jax.model.cache import PAGE
from dsv32_jax.model.config import cdiv
from dsv32_jax.serve.pages import Pages, page_keys


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # the sequence ends after emitting one of these (it is sent)


@dataclasses.dataclass(eq=False)
class Seq:
    rid: int
    tokens: list[int]
    n_prompt: int
    sampling: Sampling
    emit: Callable[[list[int], str | None], Any]
    computed: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)  # of its first len(keys) pages

    @property
    def produced(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed


@dataclasses.dataclass
class Batch:
    """One step: seqs[i] feeds tokens[computed : computed + feed[i]] in a (B, S) run with page
    tables of width P (all powers of two)."""
    seqs: list[Seq]
    feed: list[int]
    S: int
    B: int
    P: int

    def arrays(self) -> dict[str, np.ndarray]:
        """The step's inputs (`serve.step.step`): padding lanes write into the scratch page."""
        B, S, P = self.B, self.S, self.P
        out = {"table": np.zeros((B, P), np.int32), "tokens": np.zeros((B, S), np.int32),
               "positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)),
               "last": np.zeros(B, np.int32), "seeds": np.zeros(B, np.uint32),
               "counters": np.zeros(B, np.int32), "temperature": np.zeros(B, np.float32),
               "top_p": np.ones(B, np.float32)}
        for i, (s, n) in enumerate(zip(self.seqs, self.feed)):
            out["table"][i, :len(s.pages)] = s.pages
            out["tokens"][i, :n] = s.tokens[s.computed:s.computed + n]
            out["positions"][i] += s.computed
            out["last"][i] = n - 1
            out["seeds"][i] = s.sampling.seed
            out["counters"][i] = s.produced
            out["temperature"][i] = s.sampling.temperature
            out["top_p"][i] = s.sampling.top_p
        return out


def seq_buckets(chunk: int) -> list[int]:
    """The run lengths S of prefill steps: powers of two from 16 below `chunk`, then `chunk`."""
    out = [s for s in (1 << i for i in range(4, 32)) if s < chunk]
    return out + [chunk]


def pow2_up_to(n: int) -> list[int]:
    out = [1 << i for i in range((n - 1).bit_length())]
    return out + [n] if not out or out[-1] < n else out


class Scheduler:
    def __init__(self, pages: Pages, max_batch: int, chunk: int, max_prefill: int, max_len: int):
        self.pages = pages
        self.max_batch, self.chunk, self.max_prefill, self.max_len = max_batch, chunk, max_prefill, max_len
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.counts = {"prefix_hit_tokens": 0, "prefix_query_tokens": 0, "preemptions": 0,
                       "generation_tokens": 0, "steps": 0}
        self._prefill_next = True

    # Shapes -----------------------------------------------------------------------------------------

    def page_buckets(self) -> list[int]:
        return pow2_up_to(bucket(cdiv(self.max_len, PAGE), 1))

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every (B, S, P) a step may have: what a warm-up compiles."""
        out = [(b, 1, p) for b in pow2_up_to(bucket(self.max_batch, 1)) for p in self.page_buckets()]
        prefill = min(self.max_prefill, self.max_batch)  # a prefill step runs running sequences
        return out + [(b, s, p) for b in pow2_up_to(bucket(prefill, 1))
                      for s in seq_buckets(self.chunk) for p in self.page_buckets()]

    # Queue ------------------------------------------------------------------------------------------

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def remove(self, rid: int) -> Seq | None:
        """Take request rid out (cancelled): its pages go back. None if it is not here."""
        for group in (self.waiting, self.running):
            for s in group:
                if s.rid == rid:
                    group.remove(s)
                    self._drop_pages(s)
                    return s
        return None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # One step ---------------------------------------------------------------------------------------

    def plan(self) -> Batch | None:
        self._admit()
        prefill = [s for s in self.running if s.pending > 1]
        decode = [s for s in self.running if s.pending == 1]
        if not prefill and not decode:
            return None
        use_prefill = bool(prefill) and (self._prefill_next or not decode)
        self._prefill_next = not use_prefill
        if use_prefill:
            seqs = prefill[:self.max_prefill]
            feed = [min(s.pending, self.chunk) for s in seqs]
            S = min(bucket(max(feed)), self.chunk)
        else:
            seqs = self._with_pages(decode)
            if not seqs:
                return None
            feed, S = [1] * len(seqs), 1
        P = bucket(max(len(s.pages) for s in seqs), 1)  # padding past the table: scratch
        return Batch(seqs, feed, S, bucket(len(seqs), 1), P)

    def commit(self, batch: Batch, sampled: np.ndarray) -> list[tuple[Seq, list[int], str | None]]:
        """Take a step's sampled tokens -> (seq, new tokens, finish) per sequence that has news;
        finished sequences leave with their pages released."""
        self.counts["steps"] += 1
        events = []
        for s, n, tok in zip(batch.seqs, batch.feed, sampled):
            s.computed += n
            self._register(s)
            if s.computed < len(s.tokens):
                continue  # a prefill chunk short of the end: nothing sampled
            tok = int(tok)
            finish = None
            if tok == NONFINITE:
                finish = "error: the logits were not finite (NaN/Inf)"
                new = []
            else:
                s.tokens.append(tok)
                self.counts["generation_tokens"] += 1
                new = [tok]
                if tok in s.sampling.stop_ids:
                    finish = "stop"
                elif s.produced >= s.sampling.max_tokens:
                    finish = "length"
            if finish is not None:
                self.running.remove(s)
                self._drop_pages(s)
            events.append((s, new, finish))
        return events

    # Pages ------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            s = self.waiting[0]
            keys = page_keys(s.tokens, (len(s.tokens) - 1) // PAGE)  # one token is always run
            shared = self.pages.lookup(keys)
            need = cdiv(len(s.tokens), PAGE) - len(shared)
            if need > self.pages.available:
                self.pages.release(shared)
                return
            s.pages = shared + self.pages.allocate(need)
            s.keys = keys[:len(shared)]
            s.computed = len(shared) * PAGE
            self.counts["prefix_hit_tokens"] += s.computed
            self.counts["prefix_query_tokens"] += len(s.tokens)
            self.running.append(self.waiting.popleft())

    def _with_pages(self, seqs: list[Seq]) -> list[Seq]:
        """Give each decoding sequence the page its next slot needs, preempting the newest running
        sequences while none is left. -> the sequences still running, in order."""
        for s in list(seqs):
            if s not in self.running or len(s.pages) * PAGE > s.computed:
                continue
            while not self.pages.available:
                victim = max(self.running, key=lambda r: r.rid)  # the newest request
                self._preempt(victim)
                if victim is s:
                    break
            if s in self.running:
                s.pages += self.pages.allocate(1)
        return [s for s in seqs if s in self.running]

    def _preempt(self, s: Seq) -> None:
        self.running.remove(s)
        self._drop_pages(s)
        self.waiting.appendleft(s)
        self.counts["preemptions"] += 1

    def _drop_pages(self, s: Seq) -> None:
        self.pages.release(s.pages)
        s.pages, s.keys, s.computed = [], [], 0

    def _register(self, s: Seq) -> None:
        """Offer each page the sequence has filled to the prefix cache."""
        for k in range(len(s.keys), s.computed // PAGE):
            key = page_keys(s.tokens[k * PAGE:(k + 1) * PAGE], 1, s.keys[-1] if s.keys else b"")[0]
            self.pages.register(s.pages[k], key)
            s.keys.append(key)
