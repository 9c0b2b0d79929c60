"""A batch of prompts generated on the engine core (`engine.core.Engine`): what `Model.generate` and
`Model.generate_stream` run. There is one generation loop in the project, the server's.

Each prompt is one request of an engine built for the call and driven from the caller's thread
(`Engine.run`). Its pool holds every sequence at full length (no preemption; the page count per
data group rounded up to a power of two, at least MIN_PAGES, so calls of similar sizes reuse the
compiled steps);
every prompt prefills in the same steps (chunks of PREFILL_CHUNK); decode steps take up to
DECODE_STEPS tokens per sequence in one program (multi-step; `generate_stream` takes one, so each
token comes as soon as it is sampled; speculative decoding, one draft-verify iteration).

Sequence i samples with the seed `seed + i` (mod 2**32) and the engine's per-request keys, so its
tokens do not depend on the other prompts of the batch, and equal a server request's with that
seed. In a multi-process run every process calls with the same arguments and runs the same steps
(`Engine(lockstep=True)`: nothing is broadcast).
"""

from __future__ import annotations

from typing import Iterator, Sequence

from dsv32_jax.engine import generate as gen
from dsv32_jax.engine.checks import (check_budget, check_ids, check_max_new_tokens, check_sampling,
                                     check_seed)
from dsv32_jax.engine.core import Engine
from dsv32_jax.engine.scheduler import NONFINITE_FINISH, Sampling
from dsv32_jax.model.cache import PAGE
from dsv32_jax.model.config import cdiv
from sharding.mesh import params_mesh

PREFILL_CHUNK = gen.PREFILL_CHUNK
DECODE_STEPS = 16
MIN_PAGES = 64  # of 64 slots: 4096 positions (the released model: 190 MB of cache per group)


class _Batch:
    """The validated request, its engine, and each sequence's tokens and finish as they come."""

    def __init__(self, model, prompts, max_new_tokens, temperature, top_p, seed, stop_tokens,
                 speculative: int, decode_steps: int):
        cfg = model.config
        temperature, top_p = check_sampling(temperature, top_p)
        n_new = check_max_new_tokens(max_new_tokens)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        self.prompts = [check_ids(p, "prompts", cfg.vocab_size) for p in prompts]
        for p in self.prompts:
            check_budget(len(p), n_new, cfg.max_seq_len)
        stops = (cfg.eos_token_id,) if stop_tokens is None else tuple(check_ids(stop_tokens, "stop_tokens"))
        seed = check_seed(seed)
        self.model = model
        self.engine = _engine(model, self.prompts, n_new, speculative, decode_steps)
        self.out: list[list[int]] = [[] for _ in self.prompts]
        self.finish: list[str | None] = [None] * len(self.prompts)
        for i, p in enumerate(self.prompts):
            sampling = Sampling(n_new, temperature, top_p, (seed + i) % (1 << 32), stops)
            self.engine.submit(p, sampling, self._emit(i))

    def _emit(self, i: int):
        def emit(new: list[int], finish: str | None) -> None:
            self.out[i] += new
            if finish is not None:
                self.finish[i] = finish
        return emit

    def check(self) -> None:
        """Raise for the first sequence that failed (its logits went non-finite: the others ran
        to their end first), naming where."""
        for i, f in enumerate(self.finish):
            if f is not None and f.startswith("error"):
                if f != NONFINITE_FINISH:
                    raise RuntimeError(f"sequence {i}: {f}")
                m = self.model
                raise gen.nonfinite_error(m.params, m.config, m.attention_impl, self.prompts[i],
                                          self.out[i], i, self.out)

    def stats(self, stats: dict | None) -> None:
        if stats is None:
            return
        e, counts = self.engine, self.engine.sched.counts
        stats.update(prefill_s=e.seconds["prefill"], decode_s=e.seconds["decode"],
                     prefill_tokens=counts["prefix_query_tokens"] - counts["prefix_hit_tokens"])
        if e.k:  # per sequence and iteration: how often its j-th draft was accepted
            stats.update(iterations=counts["draft_tokens"] // e.k,
                         accepted=list(e.sched.accepted_at))


def _engine(model, prompts: list[list[int]], n_new: int, speculative: int,
            decode_steps: int) -> Engine:
    mesh = params_mesh(model.params)
    shards = 1 if mesh is None else mesh.shape["data"]
    n = gen.bucket(len(prompts), 1)
    longest = max(len(p) for p in prompts) + n_new
    # per data group; at least MIN_PAGES: small calls share one pool shape, so one set of programs
    pages = gen.bucket(cdiv(n, shards) * cdiv(longest, PAGE) + 1, MIN_PAGES)
    return Engine(model, max_batch=n, pages=pages, chunk=PREFILL_CHUNK, max_waiting=len(prompts),
                  max_prefill=n, speculative=speculative,
                  decode_steps=1 if speculative else decode_steps, max_len=longest, lockstep=True)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, speculative: int = 0,
             stats: dict | None = None) -> list[list[int]]:
    """`Model.generate`: each prompt's new tokens (a stop token included)."""
    b = _Batch(model, prompts, max_new_tokens, temperature, top_p, seed, stop_tokens, speculative,
               DECODE_STEPS)
    for _ in b.engine.run():
        pass
    b.stats(stats)
    b.check()
    return b.out


def stream(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
           stop_tokens: Sequence[int] | None = None, stats: dict | None = None
           ) -> Iterator[list[int | None]]:
    """`Model.generate_stream`: the request is checked (and its engine built) now; then yields,
    for j = 0, 1, ..., the j-th new token of each sequence (None once it has ended), as soon as
    every sequence still running has it."""
    b = _Batch(model, prompts, max_new_tokens, temperature, top_p, seed, stop_tokens, 0, 1)
    return _aligned(b, {} if stats is None else stats)


def _aligned(b: _Batch, stats: dict) -> Iterator[list[int | None]]:
    j = 0

    def ready() -> bool:  # every sequence has its j-th token or has ended, and one has it
        return any(len(o) > j for o in b.out) and \
            all(len(o) > j or f is not None for o, f in zip(b.out, b.finish))

    for _ in b.engine.run():
        while ready():
            yield [o[j] if len(o) > j else None for o in b.out]
            j += 1
    b.stats(stats)
    stats["decode_steps"] = j
    b.check()
