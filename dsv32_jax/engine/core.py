"""The engine core, which the server, `Model.generate` and the chat session all run: requests in
from any thread, one engine thread running the scheduler's steps over the paged pool, tokens out
through each request's `emit` callback.

    engine = Engine(model, max_batch=32)         # model: engine.runner.Model
    engine.start()
    rid = engine.submit(prompt_ids, Sampling(max_tokens=64, temperature=0), emit)
    # emit(new_tokens, finish) is called from the engine thread: finish is None while the request
    # runs, then once "stop" | "length" | "cancelled" | "error: ..."
    engine.cancel(rid); engine.metrics(); engine.stop(drain=True)

Engine(model, speculative=k) decodes speculatively (`engine.speculative`): the model's MTP layer
(load_model(mtp=True)) drafts k tokens per step, one forward verifies them; its own pool beside the
model's, the same pages; each running sequence's draft state in a device slot. Greedy output is the
same token for token, sampled output the same distribution.

On a mesh with data > 1 the pool is split over data: each data group holds `pages` pages (of
`cache_gb` GiB: the size per device) and runs its own sequences (`scheduler`).

`run()` drives the engine from the caller's thread instead of its own (not started): one step per
iteration until every submitted request has ended. `Model.generate` does so (`engine.batch`).

In a multi-process run every process builds the Engine (its pool spans the global mesh). With
lockstep=True (`Model.generate`'s SPMD callers) every process submits the same requests and runs
the same schedule: nothing is broadcast. Otherwise process 0
schedules: before each step (warm-up steps too) it broadcasts the step's inputs, and each other
process runs that step in `follow()` until process 0's engine ends. Only process 0 reads the tokens.
An engine failure there ends the whole run (`sharding.distributed.fatal`): the others cannot go on;
whoever drives the engine ends the open requests with the cause (`on_fatal` -> `fail`).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from dsv32_jax.engine import speculative as spec
from dsv32_jax.engine import step as st
from dsv32_jax.engine.checks import check_budget, check_ids, check_sampling
from dsv32_jax.engine.pages import Pages
from dsv32_jax.engine.scheduler import Batch, Sampling, Scheduler, Seq
from dsv32_jax.model.cache import PAGE
from dsv32_jax.model.config import cdiv
from sharding import distributed
from sharding.distributed import to_host
from sharding.mesh import params_mesh, use_mesh

Emit = Callable[[list[int], "str | None"], object]


class QueueFull(RuntimeError):
    """Too many requests wait already: try again after `retry_after` seconds."""

    def __init__(self, msg: str, retry_after: float):
        super().__init__(msg)
        self.retry_after = retry_after


class EngineStopped(RuntimeError):
    """The engine takes no more requests (stopping, or it failed: the message says which)."""


class Engine:
    def __init__(self, model, *, max_batch: int = 32, pages: int | None = None,
                 cache_gb: float | None = None, chunk: int = 512, max_waiting: int = 256,
                 prefix_cache: bool = True, max_prefill: int = 4, speculative: int = 0,
                 decode_steps: int = 1, max_len: int | None = None, lockstep: bool = False,
                 on_compile: Callable[[str, float | None], None] | None = None, table: int = 1):
        cfg = model.config
        if speculative:
            spec.check(speculative, model.mtp)
        for name, v in (("max_batch", max_batch), ("chunk", chunk), ("max_waiting", max_waiting),
                        ("max_prefill", max_prefill), ("decode_steps", decode_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if pages is not None and cache_gb is not None:
            raise ValueError("give the pool's size as pages or as cache_gb, not both")
        self.model, self.config = model, cfg
        # the most positions a request may use (prompt + new tokens); the pool must hold one
        self.max_len = cfg.max_seq_len if max_len is None else min(int(max_len), cfg.max_seq_len)
        self._mesh = mesh = params_mesh(model.params)
        shards = 1 if mesh is None else mesh.shape["data"]  # the pool is split over data
        self.k = speculative
        mtp = bool(speculative)
        if cache_gb is not None:
            pages = st.pages_for_bytes(cfg, int(cache_gb * (1 << 30)), mtp)
        elif pages is None:
            pages = default_pages(cfg, cdiv(max_batch, shards), _free_bytes(model.params), mtp)
        # process 0 broadcasts each step (lockstep: every process schedules the same requests)
        self._multi = jax.process_count() > 1 and not lockstep
        if jax.process_count() > 1:  # one pool over the global mesh: the size every process can hold
            pages = int(multihost_utils.process_allgather(np.int32(pages)).min())
        if pages - 1 < cdiv(self.max_len, PAGE):
            raise ValueError(f"a pool of {pages} pages ({pages - 1} usable) cannot hold one request of "
                             f"{self.max_len} tokens ({cdiv(self.max_len, PAGE)} pages of {PAGE})")
        self.max_waiting = max_waiting
        self.sched = Scheduler(Pages(shards * pages, prefix_cache, shards), max_batch, chunk,
                               max_prefill, self.max_len, speculative, decode_steps, table)
        with use_mesh(mesh):
            # committed to their devices, as every step returns them: else the first step compiles
            # its shape for uncommitted pools and the next step of that shape compiles it again
            self._pools, self._slots = jax.tree.map(_committed, (
                st.pools(cfg, shards * pages, mtp), st.draft_slots(cfg, max_batch + 1) if mtp else None))
        self._ids = itertools.count()
        # what a step program's compile depends on besides the step's shape (`_SEEN`)
        self._programs = (cfg, model.attention_impl, self.k, _leaf_key((model.params, model.mtp)),
                          _leaf_key((self._pools, self._slots)))
        self.on_compile = on_compile
        self.compiled: list[str] = []  # the labels of the programs this engine compiled
        self._cv = threading.Condition()
        self._inbox: list[Seq] = []
        self._cancels: list[int] = []
        self._stopping = self._drain = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self._prompt_tokens = 0
        self._rate = _Rate()
        # seconds spent in prefill steps, in decode steps, in the first run of a step program
        # this process compiled (`compile`: compile + one step; not counted in the others), and
        # the engine thread's waits for work (`idle`)
        self.seconds = {"prefill": 0.0, "decode": 0.0, "compile": 0.0, "idle": 0.0}

    # Client side (any thread) -----------------------------------------------------------------------

    def submit(self, prompt, sampling: Sampling, emit: Emit, keep: bool = False) -> int:
        """Queue a request -> its id. keep=True: when it ends it parks with its pages, for
        `resume` to continue (a chat's next turn) or `release` to free."""
        prompt = self._checked(prompt, sampling)
        with self._cv:
            self._admissible()
            seq = Seq(next(self._ids), prompt, len(prompt), sampling, emit, keep=keep)
            self._inbox.append(seq)
            self._prompt_tokens += len(prompt)
            self._cv.notify()
        return seq.rid

    def resume(self, rid: int, prompt, sampling: Sampling, emit: Emit) -> None:
        """Continue the parked request rid (submitted with keep, ended) as a new request for
        `prompt`, its whole context: the keys it computed are kept up to the first token that
        differs (in whole pages), only the rest runs. KeyError if rid is not parked."""
        prompt = self._checked(prompt, sampling)
        with self._cv:
            self._admissible()
            if rid not in self.sched.parked:
                raise KeyError(f"request {rid} is not parked")
            self._prompt_tokens += len(prompt)
            self.sched.resume(rid, prompt, sampling, emit)
            self._cv.notify()

    def release(self, rid: int) -> None:
        """Free a parked request's pages."""
        with self._cv:
            self.sched.release(rid)

    def _checked(self, prompt, sampling: Sampling) -> list[int]:
        prompt = check_ids(prompt, "prompt", self.config.vocab_size)
        check_budget(len(prompt), sampling.max_tokens, self.max_len)
        check_sampling(sampling.temperature, sampling.top_p)
        return prompt

    def _admissible(self) -> None:
        """Under the lock: raise if the engine takes no request now."""
        if self._stopping or self.error:
            raise EngineStopped(self.error or "the engine is shutting down")
        if len(self.sched.waiting) + len(self._inbox) >= self.max_waiting:
            raise QueueFull(f"{self.max_waiting} requests are waiting already", retry_after=1.0)

    def cancel(self, rid: int) -> None:
        with self._cv:
            self._cancels.append(rid)
            self._cv.notify()

    def metrics(self) -> dict[str, float]:
        with self._cv:
            s, p = self.sched, self.sched.pages
            return {"running": len(s.running), "waiting": len(s.waiting) + len(self._inbox),
                    "pages_used": p.used, "pages_cached": p.cached, "pages_total": p.usable,
                    "prompt_tokens": self._prompt_tokens, **s.counts,
                    "generation_tokens_per_s": self._rate.value(),
                    "step_s": self.seconds["prefill"] + self.seconds["decode"],
                    "idle_s": self.seconds["idle"], "compiles": len(self.compiled),
                    "compile_s": self.seconds["compile"]}

    def warmup(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile the step for every shape bucket (a step on padding only: it writes the scratch
        page), or for as many as leave room in the process's memory mappings (`memory_maps`):
        the others compile on first use."""
        shapes = self.sched.shapes()
        t0 = time.perf_counter()
        for i, (b, s, p, decode) in enumerate(shapes):
            maps = memory_maps()
            if maps and maps[0] > WARM_MAPS * maps[1]:
                if progress:
                    progress(f"compiled {i} of {len(shapes)} step shapes: this process holds {maps[0]} "
                             f"memory mappings, the kernel allows {maps[1]} (vm.max_map_count); the "
                             "others compile on first use, each stalling the requests in flight (raise the "
                             "limit: sysctl -w vm.max_map_count=262144)")
                return
            if progress:
                progress(f"compiling step {i + 1}/{len(shapes)} (batch {b}, tokens {s}, pages {p})")
            width = self.sched.decode_steps if decode else 1
            to_host(self._run(Batch([], [], s, b, p, bool(self.k), decode, 1, width))[0])  # padding only
        if progress:
            progress(f"compiled {len(shapes)} step shapes in {time.perf_counter() - t0:.1f} s")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dsv32-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool, timeout: float | None = None) -> None:
        """No new requests; drain=True lets the open ones finish (up to `timeout` s, then as below),
        else each gets emit([], "error: server shutting down")."""
        with self._cv:
            self._stopping, self._drain = True, drain
            self._cv.notify()
        if self._thread is None:  # never started: the open requests hear of it here
            self._loop()
        else:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._cv:
                    self._drain = False
                    self._cv.notify()
                self._thread.join()

    def run(self):
        """Drive the engine from the caller's thread (it must not be started): yields after each
        step (and once for a turn that only delivered events) until every request submitted so
        far has ended; the requests hear of their tokens through their `emit` as usual. A
        failing step raises here (the engine is then unusable)."""
        if self._thread is not None:
            raise RuntimeError("Engine.run drives an engine that was not started")
        while self._inbox or not self.sched.idle:
            self._turn()
            yield

    # The engine thread ------------------------------------------------------------------------------

    def follow(self) -> None:
        """A multi-process run's processes other than 0: run every step process 0 runs (it
        broadcasts each one's inputs) until its engine ends."""
        while (got := _share(None, bool(self.k))) is not None:
            self._step(got)

    def _run(self, batch: Batch):
        """Process 0: one step (in a multi-process run, the others run it too: `follow`) ->
        (tokens (B,) or (B,k+1), accepted drafts (B,) or None), on the device."""
        a = batch.arrays() | {"decode": batch.decode, "steps": batch.steps, "width": batch.width}
        if self._multi:
            _share(a, bool(self.k))
        return self._step(a)

    def _step(self, a: dict):
        """One step's program on the arrays of `Batch.arrays()` and its KIND. A program this
        process has not run yet compiles first: `on_compile(label, None)` before, `(label,
        seconds)` after (the compile and this first step)."""
        shape = (a["decode"], a["width"], *((k, v.shape) for k, v in sorted(a.items()) if k not in KIND))
        key = (shape, self._programs)
        if key in _SEEN:
            return self._program(a)
        _check_maps()  # before a compile only: reading /proc/self/maps takes ~10 ms at 15,000 mappings
        label = _label(a, self.k)
        if self.on_compile is not None:
            self.on_compile(label, None)
        t0 = time.perf_counter()
        out = jax.block_until_ready(self._program(a))
        dt = time.perf_counter() - t0
        _SEEN.add(key)
        self.seconds["compile"] += dt
        self.compiled.append(label)
        if self.on_compile is not None:
            self.on_compile(label, dt)
        return out

    def _program(self, a: dict):
        m, kw = self.model, {"cfg": self.config, "impl": self.model.attention_impl}
        multi, decode = "left" in a, a["decode"]
        host = {k: v for k, v in a.items() if k not in KIND}
        if multi or (self.k and decode):  # one token a sequence in
            host |= {"tokens": a["tokens"][:, 0], "positions": a["positions"][:, 0]}
        if multi:
            host["steps"] = np.asarray(a["steps"], np.int32)
        with use_mesh(self._mesh):
            x = st.inputs(host, self._mesh)
            sampling = (x["seeds"], x["counters"], x["temperature"], x["top_p"])
            if multi:  # the tokens after the first count as accepted
                tokens, n, self._pools = st.decode_steps(
                    m.params, self._pools, x["table"], x["tokens"], x["positions"], x["steps"], x["left"],
                    x["stops"], *sampling, width=a["width"], **kw)
                return tokens, n
            if not self.k:
                token, self._pools = st.step(m.params, self._pools, x["table"], x["tokens"],
                                             x["positions"], x["last"], *sampling, **kw)
                return token, None
            if decode:
                n, tokens, self._pools, self._slots = st.spec_decode(
                    m.params, m.mtp, self._pools, self._slots, x["table"], x["tokens"], x["positions"],
                    x["slot"], *sampling, k=self.k, **kw)
                return tokens, n
            token, self._pools, self._slots = st.spec_prefill(
                m.params, m.mtp, self._pools, self._slots, x["table"], x["tokens"], x["positions"],
                x["last"], x["after"], x["ends"], x["slot"], *sampling, **kw)
            return token, None

    def _loop(self) -> None:
        try:
            while self._turn():
                pass
            if self._multi and not self.error:
                _share(None, bool(self.k))  # the others stop following
        except Exception as e:  # noqa: BLE001 - every open request hears of it, then the thread ends
            msg = f"engine failed: {type(e).__name__}: {e}"
            if self._multi:  # the run ends, the open requests told by `on_fatal` (a process lost
                time.sleep(1.0)  # fails the step: its watch names the cause first)
                distributed.fatal(" ".join(msg.split()))
            self.fail(msg)

    def _turn(self) -> bool:
        """One step (or a wait for work). False when the engine is done."""
        events = []
        with self._cv:
            for seq in self._inbox:
                self.sched.add(seq)
            self._inbox.clear()
            for rid in self._cancels:
                seq = self.sched.remove(rid)
                if seq is not None:
                    events.append((seq, [], "cancelled"))
            self._cancels.clear()
            if self._stopping and not (self._drain and not self.sched.idle):
                events += [(s, [], "error: server shutting down") for s in self._open()]
                done = True
            else:
                done = False
                if self.sched.idle and not events:
                    t0 = time.perf_counter()
                    self._cv.wait()
                    self.seconds["idle"] += time.perf_counter() - t0
                    return True
            batch = None if done else self.sched.plan()
        _send(events)
        if done:
            return False
        if batch is None:
            return True
        t0, compiling = time.perf_counter(), self.seconds["compile"]
        tokens, accepted = (None if x is None else to_host(x) for x in self._run(batch))
        self.seconds["decode" if batch.decode else "prefill"] += \
            time.perf_counter() - t0 - (self.seconds["compile"] - compiling)
        with self._cv:
            if self.error:  # failed meanwhile (`fail`, from a multi-process run's watch)
                return False
            events = self.sched.commit(batch, tokens, accepted)
            self._rate.add(sum(len(new) for _, new, _ in events))
        _send(events)
        return True

    def _open(self) -> list[Seq]:
        out = list(self.sched.waiting) + list(self.sched.running)
        for s in out:
            self.sched.remove(s.rid)
        return out

    def fail(self, msg: str) -> None:
        """End every open request with the error `msg`; the engine takes no more (the first
        failure stands). Any thread: a multi-process run that breaks calls it (`on_fatal`)."""
        with self._cv:
            if self.error:
                return
            self.error = msg
            self.sched.waiting.extend(self._inbox)
            self._inbox.clear()
            events = [(s, [], f"error: {self.error}") for s in self._open()]
        _send(events)


# XLA:CPU maps a few pages for each kernel it compiles: a step program of the demo model holds
# ~760 memory mappings (measured), and Linux ends a process that asks for more than
# vm.max_map_count (65530 by default) inside the compiler (a segfault). So a warm-up stops at
# WARM_MAPS of the limit, and a step of a new shape is refused past MAX_MAPS, in one error.
WARM_MAPS, MAX_MAPS = 0.6, 0.95


def memory_maps() -> tuple[int, int] | None:
    """This process's memory mappings and the kernel's limit on them, where the kernel says (Linux)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f), limit
    except (OSError, ValueError):
        return None


def _check_maps() -> None:
    maps = memory_maps()
    if maps and maps[0] > MAX_MAPS * maps[1]:
        raise MemoryError(
            f"this process holds {maps[0]} memory mappings and the kernel allows {maps[1]} "
            "(vm.max_map_count): compiling another step shape could end it (XLA:CPU maps ~700 per "
            "step program). Serve fewer shapes (a smaller --max-batch or --chunk) or raise the limit "
            "(sysctl -w vm.max_map_count=262144)")


KIND = ("decode", "steps", "width")  # a step's kind beside its arrays: which program, how far

# The step programs this process has run, as (the step's shape, `Engine._programs`): jit's cache
# holds the programs themselves; this mirrors its keys so that a compile is announced before it
# starts (`on_compile`), in whichever engine it happens.
_SEEN: set[tuple] = set()


def _leaf_key(tree) -> tuple:
    return tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(tree))


def _label(a: dict, k: int) -> str:
    """A step program's name for a compile notice."""
    (b, s), p = a["tokens"].shape, a["table"].shape[1]
    kind = ("speculative " if k else "") + ("decode" if a["decode"] else "prefill")
    size = f"{b} sequences" + ("" if a["decode"] else f" x {s} tokens")
    more = f", up to {a['width']} tokens" if a["width"] > 1 else ""
    return f"{kind} step ({size}, {p}-page tables{more})"
FREE_FRACTION = 0.8  # of a device's free memory the default pool may take (the rest: step buffers)


def default_pages(cfg, max_batch: int, free: int | None, mtp: bool = False) -> int:
    """The pool's default size: every running sequence at full length (+ the scratch page), cut to
    FREE_FRACTION of the device memory left after the weights when the device reports it (GPUs;
    `free` None on a CPU). mtp: the MTP layer's pool too."""
    full = max_batch * cdiv(cfg.max_seq_len, PAGE) + 1
    if free is None:
        return full
    return min(full, st.pages_for_bytes(cfg, int(FREE_FRACTION * free), mtp))


def _committed(a: jax.Array) -> jax.Array:
    return a if a.committed or not a.is_fully_addressable else jax.device_put(a, a.sharding)


def _free_bytes(params) -> int | None:
    """The least free memory over this process's devices holding `params`, if they report it."""
    free = []
    for d in {s.device for a in jax.tree.leaves(params) for s in a.addressable_shards}:
        stats = d.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free) if free else None


def _share(a: dict | None, spec: bool) -> dict | None:
    """A multi-process run's next step: the arrays and KIND process 0 gives (None: no more steps),
    on every process (the others pass None)."""
    head = [0] * 7
    if a is not None:
        head = [*a["tokens"].shape, a["table"].shape[1], *(a[k] for k in KIND),
                a["stops"].shape[1] if "stops" in a else 1]
    B, S, P, decode, steps, width, stops = map(int, multihost_utils.broadcast_one_to_all(
        np.array(head, np.int32)))
    if B == 0:
        return None
    like = Batch([], [], S, B, P, spec, bool(decode), steps, width, stops).arrays() if a is None \
        else {k: v for k, v in a.items() if k not in KIND}
    return multihost_utils.broadcast_one_to_all(like) | {"decode": bool(decode), "steps": steps,
                                                          "width": width}


def _send(events) -> None:
    for seq, new, finish in events:
        seq.emit(new, finish)


class _Rate:
    """Generated tokens per second over the last ~10 s."""

    def __init__(self, window: float = 10.0):
        self.window, self.events = window, collections.deque()  # (time, tokens), oldest first

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.events.append((now, n))
        while now - self.events[0][0] > self.window:
            self.events.popleft()

    def value(self) -> float:
        now = time.monotonic()
        recent = [(t, k) for t, k in self.events if now - t <= self.window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(k for _, k in recent) / span
