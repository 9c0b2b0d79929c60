"""Continuous batching: which sequences run in the next step, and what their pages are.

A sequence is its tokens (the prompt, then each sampled token) and how many of them have their keys
in the cache (`computed`). Its next run feeds the tokens not yet computed, at most `chunk` of them:
several while it prefills, one (the token sampled last) while it decodes. A run that reaches the end
of the tokens samples the next one. So prefill and decode are one kind of step with other shapes;
the scheduler alternates prefill steps (up to `max_prefill` sequences) and decode steps (every
decoding sequence) while both have work; decoding sequences also take their next token in the rows
a prefill step's batch bucket leaves empty (`_riders`).

Admission (first come, first served) happens when a running slot is free and the pages for the whole
prompt can be had, after the prefix cache lent its pages: those tokens are not prefilled again. A
decode that crosses into a new page takes one; when none is left, the newest running sequence is
preempted: its pages go back and it waits at the head of the queue to be recomputed (prompt and the
tokens it already produced, which are not sent again).

With speculative decoding (`ahead` = k drafts) a decode step verifies the pending token and k drafts
at once: it needs the pages of k more slots (up to the last the sequence may use), and a sequence
decodes once a run has left its draft state (`Seq.drafted`): a prefix hit that leaves one token to
run is a prefill. Its runs may end with up to k + 1 tokens. The MTP layer's key at a slot depends on
the token after it, so a page's prefix key covers that token too (`page_keys(overlap=1)`).

A sequence submitted with `keep` (a chat session's) parks when it ends (stop, length, or cancelled):
it keeps its pages and computed keys in `parked` until `resume` continues it with a longer context
(only the tokens after its computed ones run; an edited context keeps the whole pages before the
first change) or `release` lets them go.

On a mesh with data > 1 the pool is split over data (`Pages` with shards): each sequence runs in
one shard, on the batch rows of that shard's block (rows [d * B/D, (d + 1) * B/D) of a step of B
rows), with pages of that shard only. Admission picks the shard with the longest prefix hit, then
the fewest running sequences; a shard short of pages preempts its own newest sequence.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Callable

import numpy as np

from dsv32_jax.engine.generate import NONFINITE, bucket
from dsv32_jax.engine.pages import Pages, page_keys
from dsv32_jax.model.cache import PAGE
from dsv32_jax.model.config import cdiv


NONFINITE_FINISH = "error: the logits were not finite (NaN/Inf)"  # a sequence sampled NONFINITE


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
    slot: int = 0  # its row of the engine's per-sequence device state (0: none)
    shard: int = 0  # the pool shard (data group) it runs in while it holds pages
    drafted: bool = False  # speculative: its draft state for the pending token is in its slot
    keep: bool = False  # when it ends, it parks with its pages (`Scheduler.parked`) to be resumed

    @property
    def produced(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed


@dataclasses.dataclass
class Batch:
    """One step: seqs[i] feeds tokens[computed : computed + feed[i]] in row rows[i] of a (B, S) run
    with page tables of width P (all powers of two), tables[i] its page table (ids within its
    shard). Speculative (`spec`): a prefill step also runs the MTP
    layer, a decode step (`decode`) is a draft-verify iteration. With multi-step scheduling
    (`width` > 1: the scheduler's decode_steps) a decode step is `engine.step.decode_steps`: up to
    `steps` tokens per sequence, each sequence's stop ids in a row of `stops` entries."""
    seqs: list[Seq]
    feed: list[int]
    S: int
    B: int
    P: int
    spec: bool = False
    decode: bool = False
    steps: int = 1
    width: int = 1
    stops: int = 1
    rows: list[int] = dataclasses.field(default_factory=list)
    tables: list[np.ndarray] = dataclasses.field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        """The step's inputs (`engine.step`'s programs): padding lanes write into the scratch page
        (and the scratch slot 0)."""
        B, S, P = self.B, self.S, self.P
        out = {"table": np.zeros((B, P), np.int32), "tokens": np.zeros((B, S), np.int32),
               "positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)),
               "last": np.zeros(B, np.int32), "seeds": np.zeros(B, np.uint32),
               "counters": np.zeros(B, np.int32), "temperature": np.zeros(B, np.float32),
               "top_p": np.ones(B, np.float32)}
        if self.spec:
            out["slot"] = np.zeros(B, np.int32)
            if not self.decode:
                out["after"], out["ends"] = np.zeros((B, S), np.int32), np.zeros(B, bool)
        if self.width > 1:
            out["left"], out["stops"] = np.zeros(B, np.int32), np.full((B, self.stops), -1, np.int32)
        for i, s, n, t in zip(self.rows, self.seqs, self.feed, self.tables):
            out["table"][i, :len(t)] = t
            out["tokens"][i, :n] = s.tokens[s.computed:s.computed + n]
            out["positions"][i] += s.computed
            out["last"][i] = n - 1
            out["seeds"][i] = s.sampling.seed
            out["counters"][i] = s.produced
            out["temperature"][i] = s.sampling.temperature
            out["top_p"][i] = s.sampling.top_p
            if self.spec:
                out["slot"][i] = s.slot
            if "left" in out:
                out["left"][i] = s.sampling.max_tokens - s.produced
                out["stops"][i, :len(s.sampling.stop_ids)] = s.sampling.stop_ids
            if "after" in out:
                nxt = s.tokens[s.computed + 1:s.computed + n + 1]
                out["after"][i, :len(nxt)] = nxt
                out["ends"][i] = s.computed + n == len(s.tokens)
        return out


def seq_buckets(chunk: int) -> list[int]:
    """The run lengths S of prefill steps: powers of two from 16 below `chunk`, then `chunk`."""
    out = [s for s in (1 << i for i in range(4, 32)) if s < chunk]
    return out + [chunk]


def pow2_up_to(n: int) -> list[int]:
    out = [1 << i for i in range((n - 1).bit_length())]
    return out + [n] if not out or out[-1] < n else out


class Scheduler:
    def __init__(self, pages: Pages, max_batch: int, chunk: int, max_prefill: int, max_len: int,
                 ahead: int = 0, decode_steps: int = 1, table: int = 1):
        self.pages = pages
        self.shards = pages.shards
        self.cap = cdiv(max_batch, self.shards)  # running sequences per shard
        self.max_batch, self.chunk, self.max_prefill, self.max_len = max_batch, chunk, max_prefill, max_len
        self.ahead = ahead  # speculative drafts per decode step (0: off)
        if ahead and decode_steps > 1:
            raise ValueError("decode_steps > 1 and speculative decoding do not combine")
        self.decode_steps = decode_steps  # the most tokens a decode step may take (multi-step)
        self.table = table  # the least page-table width of a step (fewer shapes, longer tables)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.parked: dict[int, Seq] = {}  # rid -> an ended `keep` sequence holding its pages
        self.counts = {"prefix_hit_tokens": 0, "prefix_query_tokens": 0, "preemptions": 0,
                       "generation_tokens": 0, "steps": 0, "multi_steps": 0, "riding_decodes": 0,
                       "draft_tokens": 0, "accepted_draft_tokens": 0}
        self.accepted_at = [0] * ahead  # decode steps whose j-th draft was accepted, per j
        self._prefill_next = True
        self._slots = list(range(max_batch, 0, -1))  # free rows of the per-sequence state

    # Shapes -----------------------------------------------------------------------------------------

    def page_buckets(self) -> list[int]:
        return [p for p in pow2_up_to(bucket(cdiv(self.max_len, PAGE), 1)) if p >= self.table] or \
            [bucket(self.table, 1)]

    def shapes(self) -> list[tuple[int, int, int, bool]]:
        """Every (B, S, P, decode) a step may have (with one stop id per sequence): what a warm-up
        compiles. A multi-step decode takes its step count as an argument: one program."""
        d = self.shards
        out = [(d * b, 1, p, True) for b in pow2_up_to(bucket(self.cap, 1))
               for p in self.page_buckets()]
        prefill = min(self.max_prefill, self.cap)  # a prefill step runs running sequences
        return out + [(d * b, s, p, False) for b in pow2_up_to(bucket(prefill, 1))
                      for s in seq_buckets(self.chunk) for p in self.page_buckets()]

    # Queue ------------------------------------------------------------------------------------------

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def remove(self, rid: int) -> Seq | None:
        """Take request rid out (cancelled): its pages go back (a `keep` sequence parks with
        them). None if it is not here."""
        for group in (self.waiting, self.running):
            for s in group:
                if s.rid == rid:
                    group.remove(s)
                    self._end(s)
                    return s
        return None

    def resume(self, rid: int, tokens: list[int], sampling: Sampling, emit) -> Seq:
        """The parked sequence rid continued as a new request for `tokens` (its context: what it
        has computed, cut at the first token that differs, then the rest) -> it, queued."""
        s = self.parked.pop(rid)
        same = 0
        for a, b in zip(s.tokens, tokens[:-1]):  # the last token always runs: it gives the logits
            if a != b:
                break
            same += 1
        lag = self._overlap  # speculative: a slot's MTP key depends on the token after it too
        if same < s.computed + lag:  # an edit: the whole pages before it stay (a page that may be
            keep = max(same - lag, 0) // PAGE  # in the prefix cache is never written again)
            self.pages.release(s.pages[keep:])
            s.pages, s.keys, s.computed = s.pages[:keep], s.keys[:keep], keep * PAGE
        s.tokens, s.n_prompt, s.sampling, s.emit, s.drafted = list(tokens), len(tokens), sampling, emit, False
        self.waiting.append(s)
        return s

    def release(self, rid: int) -> None:
        """A parked sequence's pages go back."""
        s = self.parked.pop(rid, None)
        if s is not None:
            self._drop_pages(s)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # One step ---------------------------------------------------------------------------------------

    def _decodes(self, s: Seq) -> bool:
        return s.pending == 1 and (s.drafted or not self.ahead)

    def plan(self) -> Batch | None:
        self._admit()
        decode = [s for s in self.running if self._decodes(s)]
        prefill = [s for s in self.running if not self._decodes(s)]
        if not prefill and not decode:
            return None
        use_prefill = bool(prefill) and (self._prefill_next or not decode)
        self._prefill_next = not use_prefill
        steps, width = 1, 1
        if use_prefill:
            seqs = prefill[:self.max_prefill]
            riders = self._riders(seqs, decode)
            self.counts["riding_decodes"] += len(riders)
            seqs += riders
            feed = [1 if self._decodes(s) else min(s.pending, self.chunk) for s in seqs]
            S = min(bucket(max(feed)), self.chunk)
        else:
            steps, width = self._steps(decode, bool(prefill)), self.decode_steps
            seqs = self._with_pages(decode, self.ahead or steps - 1)
            if not seqs:
                return None
            feed, S = [1] * len(seqs), 1
        P = bucket(max(self.table, *(len(s.pages) for s in seqs)), 1)  # padding past a table: scratch
        stops = bucket(max(1, *(len(s.sampling.stop_ids) for s in seqs)), 1) if width > 1 else 1
        each = bucket(max(self._per_shard(seqs)), 1)  # rows per shard
        rows, taken = [], [0] * self.shards
        for s in seqs:
            rows.append(s.shard * each + taken[s.shard])
            taken[s.shard] += 1
        return Batch(seqs, feed, S, self.shards * each, P, bool(self.ahead), not use_prefill,
                     steps, width, stops, rows, [self.pages.local_ids(s.pages) for s in seqs])

    def _riders(self, prefill: list[Seq], decode: list[Seq]) -> list[Seq]:
        """Decoding sequences that take their next token in a prefill step, in the rows its batch
        bucket leaves empty in their shard, if their tables are no wider than the prefill's and
        their pending slot has its page: the step's shape and cost stay, a decode step's work is
        done. (Alternate steps would otherwise leave them waiting for the next decode step.)"""
        n = self._per_shard(prefill)
        room = bucket(max(n), 1) - n
        width = bucket(max(len(s.pages) for s in prefill), 1)
        out = []
        for s in decode:
            if room[s.shard] and len(s.pages) <= width and \
                    len(s.pages) * PAGE >= self._slots_needed(s, 0):
                room[s.shard] -= 1
                out.append(s)
        return out

    def _per_shard(self, seqs: list[Seq]) -> np.ndarray:
        """How many of `seqs` run in each shard."""
        return np.bincount(np.array([s.shard for s in seqs], int), minlength=self.shards)

    def _steps(self, decode: list[Seq], prefilling: bool) -> int:
        """How many tokens the decode step of `decode` may take: `decode_steps` while no sequence
        waits or prefills (a new request waits for one step) and the free pages cover them
        without preempting anyone, else 1."""
        n = self.decode_steps
        if n == 1 or prefilling or self.waiting:
            return 1
        short = [0] * self.shards
        for s in decode:
            short[s.shard] += max(0, cdiv(self._slots_needed(s, n - 1), PAGE) - len(s.pages))
        return n if all(k <= self.pages.free_in(d) for d, k in enumerate(short)) else 1

    def commit(self, batch: Batch, sampled: np.ndarray, accepted: np.ndarray | None = None
               ) -> list[tuple[Seq, list[int], str | None]]:
        """Take a step's tokens -> (seq, new tokens, finish) per sequence that has news; finished
        sequences leave with their pages released. sampled (B,): the token sampled after each run;
        or, a speculative or multi-step decode step's, (B, k+1) with `accepted` (B,): row r's
        first accepted[r] tokens are drafts (or tokens) whose keys the step wrote, then the next
        token. Sequence i's are in row batch.rows[i]."""
        self.counts["steps"] += 1
        self.counts["multi_steps"] += batch.steps > 1
        events = []
        sampled = np.asarray(sampled).reshape(len(sampled), -1)
        for i, s, n in zip(batch.rows, batch.seqs, batch.feed):
            a = 0 if accepted is None else int(accepted[i])
            s.computed += n + a
            if batch.spec:  # the step left the draft after tokens[computed] in the slot
                s.drafted = True
            if batch.decode and batch.spec:
                self.counts["draft_tokens"] += self.ahead
                self.counts["accepted_draft_tokens"] += a
                for j in range(a):
                    self.accepted_at[j] += 1
            ends = s.computed >= len(s.tokens)  # else a prefill chunk short of it: no token
            finish, new = None, []
            for tok in map(int, sampled[i, :a + 1] if ends else ()):
                if tok == NONFINITE:
                    finish = NONFINITE_FINISH
                    break
                s.tokens.append(tok)
                self.counts["generation_tokens"] += 1
                new.append(tok)
                if tok in s.sampling.stop_ids:
                    finish = "stop"
                elif s.produced >= s.sampling.max_tokens:
                    finish = "length"
                if finish:
                    break
            self._register(s)
            if finish is not None:
                self.running.remove(s)
                self._end(s)
            if ends:
                events.append((s, new, finish))
        return events

    # Pages ------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        running = self._per_shard(self.running)  # per shard, kept up to date below
        while self.waiting and len(self.running) < self.max_batch:
            s = self.waiting[0]
            if s.pages:  # resumed: its own pages, and the ones its new tokens need
                more = cdiv(len(s.tokens), PAGE) - len(s.pages)
                if running[s.shard] >= self.cap or more > self.pages.free_in(s.shard):
                    return
                s.pages += self.pages.allocate(max(more, 0), s.shard)
                s.slot = self._slots.pop()
                self.counts["prefix_hit_tokens"] += s.computed
                self.counts["prefix_query_tokens"] += len(s.tokens)
                self.running.append(self.waiting.popleft())
                running[s.shard] += 1
                continue
            # one token is always run
            keys = page_keys(s.tokens, (len(s.tokens) - 1) // PAGE, overlap=self._overlap)
            fits = []  # (prefix pages, -running, shard) of the shards that can take it now
            for d in range(self.shards):
                hit, idle = self.pages.hits(keys, d)
                need = cdiv(len(s.tokens), PAGE) - hit
                if running[d] < self.cap and need <= self.pages.free_in(d) - idle:
                    fits.append((hit, -running[d], -d))
            if not fits:
                return
            s.shard = d = -max(fits)[2]
            shared = self.pages.lookup(keys, d)
            s.pages = shared + self.pages.allocate(cdiv(len(s.tokens), PAGE) - len(shared), d)
            s.keys = keys[:len(shared)]
            s.computed = len(shared) * PAGE
            s.slot = self._slots.pop()
            self.counts["prefix_hit_tokens"] += s.computed
            self.counts["prefix_query_tokens"] += len(s.tokens)
            self.running.append(self.waiting.popleft())
            running[d] += 1

    @property
    def _overlap(self) -> int:
        return 1 if self.ahead else 0

    def _slots_needed(self, s: Seq, ahead: int) -> int:
        """The slots a decode step of s writes that matter: its pending token's, and `ahead` more
        (k drafts, or the tokens of a multi-step), up to the last slot a token it may still
        produce is computed in."""
        last = s.n_prompt + s.sampling.max_tokens - 2  # the final token is sent, never computed
        return min(s.computed + ahead, max(last, s.computed)) + 1

    def _with_pages(self, seqs: list[Seq], ahead: int) -> list[Seq]:
        """Give each decoding sequence the pages its next slots need, preempting the newest running
        sequences while none is left. -> the sequences still running, in order."""
        for s in list(seqs):  # (the page check first: `in` scans the running list)
            while len(s.pages) * PAGE < self._slots_needed(s, ahead) and s in self.running:
                while not self.pages.free_in(s.shard):  # the newest request of its shard
                    victim = max((r for r in self.running if r.shard == s.shard), key=lambda r: r.rid)
                    self._preempt(victim)
                    if victim is s:
                        break
                if s in self.running:
                    s.pages += self.pages.allocate(1, s.shard)
        running = set(map(id, self.running))
        return [s for s in seqs if id(s) in running]

    def _end(self, s: Seq) -> None:
        """A sequence that ended (or was cancelled): it parks (`keep`) or its pages go back."""
        if not s.keep:
            self._drop_pages(s)
            return
        if s.slot:
            self._slots.append(s.slot)
        # a step cut at max_tokens may have written the keys of drafts it did not emit: those of
        # its tokens stand (the last one's MTP key read such a draft: it runs again)
        s.computed = min(s.computed, len(s.tokens) - 1)
        s.slot, s.drafted = 0, False
        self.parked[s.rid] = s

    def _preempt(self, s: Seq) -> None:
        self.running.remove(s)
        self._drop_pages(s)
        self.waiting.appendleft(s)
        self.counts["preemptions"] += 1

    def _drop_pages(self, s: Seq) -> None:
        self.pages.release(s.pages)
        if s.slot:
            self._slots.append(s.slot)
        s.pages, s.keys, s.computed, s.slot, s.drafted = [], [], 0, 0, False

    def _register(self, s: Seq) -> None:
        """Offer each page the sequence has filled to the prefix cache."""
        end = min(s.computed, len(s.tokens) - self._overlap) // PAGE
        for k in range(len(s.keys), end):
            key = page_keys(s.tokens[k * PAGE:(k + 1) * PAGE + self._overlap], 1,
                            s.keys[-1] if s.keys else b"", self._overlap)[0]
            self.pages.register(s.pages[k], key)
            s.keys.append(key)
