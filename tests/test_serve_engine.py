"""The serving engine (`dsv32_jax.serve`): the page pool and prefix cache, the scheduler's page
accounting and preemption (no model), and the engine on the demo model: greedy outputs equal to
`Model.generate` for mixed lengths, arrivals mid-decode, shared prefixes, preemption; cancellation,
validation, shutdown.

The engine tests run the demo model in exact numerics (float32, no FP8 simulation). In bfloat16 the
rounding of a row depends on the batch it is computed in (XLA:CPU emits a dot by its shape: a
(11*100)-row matmul rounds row 0 differently from a 100-row one), and the indexer's top-k and the
router turn a 1-ulp change into other picks: `Model.generate` itself then gives other greedy tokens
for a prompt alone and in a batch of 11. Equal tokens across batch compositions is a property of
arithmetic that does not depend on the batch; float32 keeps those differences at ~1e-6, below
every pick here."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from dsv32_jax.model.cache import PAGE
from dsv32_jax.engine.core import Engine, EngineStopped, QueueFull
from dsv32_jax.engine.scheduler import Sampling
from dsv32_jax.engine.core import default_pages
from dsv32_jax.engine.step import pool_bytes
from dsv32_jax.engine.pages import Pages, page_keys
from dsv32_jax.engine.scheduler import Scheduler, Seq
from conftest import xla_env

DEMO = Path(__file__).resolve().parents[1] / "dsv32_jax" / "demo_model"
NEW = 8  # tokens per request
VOCAB = 1024  # the demo model's (checked in `demo`)


# Pages and the scheduler, without a model ------------------------------------------------------------


def test_pages_share_evict_and_refuse_double_release():
    pages = Pages(4)
    a = pages.allocate(2)
    assert sorted(a) == [1, 2] and pages.available == 1 and pages.used == 2
    keys = page_keys(list(range(2 * PAGE)), 2)
    pages.register(a[0], keys[0])
    pages.register(a[1], keys[1])
    pages.release(a)
    assert pages.used == 0 and pages.available == 3 and pages.cached == 2
    # a prompt with the same first page but another second one shares only the first
    other = page_keys(list(range(PAGE)) + [7] * PAGE, 2)
    assert other[0] == keys[0] and other[1] != keys[1]
    assert pages.lookup(other) == [a[0]] and pages.used == 1
    # three fresh pages: the free one, then the idle cached one (evicted, its key forgotten)
    fresh = pages.allocate(2)
    assert a[1] in fresh and pages.lookup(keys) == [a[0]]
    with pytest.raises(MemoryError):
        pages.allocate(1)
    pages.release([a[0], a[0]] + fresh)
    with pytest.raises(RuntimeError, match="released more often"):
        pages.release([a[0]])


def _fake_steps(sched: Scheduler, rng, max_steps=10_000):
    """Run the scheduler with random 'sampled' tokens; -> {rid: tokens sent}, peak pages used."""
    sent, peak = {}, 0
    for _ in range(max_steps):
        batch = sched.plan()
        if batch is None:
            assert sched.idle
            return sent, peak
        peak = max(peak, sched.pages.used)
        rows = batch.B // sched.shards
        assert sorted(set(batch.rows)) == sorted(batch.rows)
        for s, n, r, t in zip(batch.seqs, batch.feed, batch.rows, batch.tables):
            # every real token's slot is in a page it owns, of its shard, in a row of its shard
            assert len(s.pages) * PAGE >= s.computed + n and batch.P >= len(s.pages)
            assert {sched.pages.shard_of(p) for p in s.pages} == {s.shard} and r // rows == s.shard
            assert list(t) == [p - s.shard * sched.pages.per for p in s.pages] and 0 not in t
        events = sched.commit(batch, rng.integers(2, 50, batch.B))
        for s, new, _ in events:
            sent.setdefault(s.rid, []).extend(new)
    raise AssertionError("the scheduler did not finish")


def test_speculative_pages_cover_the_drafts_and_prefix_keys_the_next_token():
    """With k drafts a decode step gets the pages of k more slots (up to the last slot the request
    may still fill), and a page is shared only when the token after it matches too (the MTP
    layer's key at a page's last slot reads it)."""
    pages = Pages(1 + 8)
    sched = Scheduler(pages, max_batch=2, chunk=64, max_prefill=1, max_len=512, ahead=3)
    base = list(range(2, 2 + 2 * PAGE + 1))
    sched.add(Seq(0, list(base), len(base), Sampling(max_tokens=PAGE), lambda *a: None))
    while sched.running or sched.waiting:
        batch = sched.plan()
        for s in batch.seqs:
            if batch.decode:  # the pending token's slot and 3 drafts', within the request's slots
                need = min(s.computed + 3, s.n_prompt + s.sampling.max_tokens - 2) + 1
                assert len(s.pages) * PAGE >= need
        sched.commit(batch, np.full((batch.B, 4), 7), np.full(batch.B, 3) if batch.decode else None)
    assert pages.cached >= 2
    for tail, shared in ((base[2 * PAGE:], 2), ([1], 1)):  # the token after page 2 equal, or not
        s = Seq(1 + shared, base[:2 * PAGE] + tail + [9, 9], 2 * PAGE + 3, Sampling(max_tokens=4),
                lambda *a: None)
        sched.add(s)
        sched.plan()
        assert s.computed == shared * PAGE
        sched.remove(s.rid)


def test_scheduler_preempts_newest_and_returns_every_page():
    pages = Pages(1 + 6)  # 6 usable pages; 4 requests of 2-3 pages each
    sched = Scheduler(pages, max_batch=4, chunk=32, max_prefill=2, max_len=512)
    for rid, n in enumerate((70, 60, 100, 50)):
        sched.add(Seq(rid, list(range(n)), n, Sampling(max_tokens=80), lambda *a: None))
    sent, peak = _fake_steps(sched, np.random.default_rng(0))
    assert {k: len(v) for k, v in sent.items()} == {0: 80, 1: 80, 2: 80, 3: 80}  # nothing lost or sent twice
    assert sched.counts["preemptions"] > 0 and peak <= 6
    assert pages.used == 0 and pages.available == 6


def _run_out(sched, token=7):
    """Fake steps (every sampled token `token`, every draft accepted) until nothing runs."""
    while sched.running or sched.waiting:
        batch = sched.plan()
        if batch.decode and batch.spec:
            sched.commit(batch, np.full((batch.B, sched.ahead + 1), token),
                         np.full(batch.B, sched.ahead))
        else:
            sched.commit(batch, np.full(batch.B, token))


@pytest.mark.parametrize("ahead", [0, 2])
def test_a_kept_sequence_parks_with_its_pages_and_resumes(ahead):
    """A `keep` request (a chat session's) parks when it ends: its pages stay, and a resumed longer
    context runs only the tokens after its computed keys; an edit keeps the whole pages before it
    (with drafts: before the token ahead of it too, which the MTP keys read); a context no longer
    than its keys still runs its last token; release and cancel give every page back."""
    pages = Pages(1 + 8)
    sched = Scheduler(pages, max_batch=2, chunk=64, max_prefill=1, max_len=512, ahead=ahead)
    prompt = list(range(2, 2 + PAGE + 30))
    s = Seq(0, list(prompt), len(prompt), Sampling(max_tokens=5), lambda *a: None, keep=True)
    sched.add(s)
    _run_out(sched)
    assert sched.parked == {0: s} and len(s.tokens) == len(prompt) + 5
    assert s.computed == len(s.tokens) - 1 and pages.used == len(s.pages) == 2 and s.slot == 0
    held = list(s.pages)

    def resume(context, max_tokens=3):
        sched.resume(0, context, Sampling(max_tokens=max_tokens), lambda *a: None)
        batch = sched.plan()
        return batch.seqs[0], batch.feed[0]

    more = s.tokens + [1, 1, 1]
    got, fed = resume(more)
    assert got is s and s.pages[:2] == held and fed == 4 and s.n_prompt == len(more)
    _run_out(sched)
    edit = PAGE + 10  # a change inside the second page: the first stays
    got, fed = resume(s.tokens[:edit] + [9, 9])
    assert s.pages[0] == held[0] and s.computed == PAGE and fed == edit - PAGE + 2
    _run_out(sched)
    edit = PAGE  # a change at the first token of the second page
    got, fed = resume(s.tokens[:edit] + [9, 9])
    assert s.computed == (PAGE if not ahead else 0)
    _run_out(sched)
    got, fed = resume(s.tokens[:PAGE])  # a prefix of its keys, a page long: its last token runs
    assert s.computed == 0 and fed == PAGE
    sched.remove(0)
    assert sched.parked == {0: s}  # cancelled: parked too
    sched.release(0)
    assert not sched.parked and pages.used == 0 and pages.available == 8


def test_decodes_ride_in_the_free_rows_of_a_prefill_step():
    """A prefill step of 3 sequences has a 4th row: a decoding sequence takes its next token there
    (one token fed), and the step's shape is the prefill's own."""
    sched = Scheduler(Pages(40), max_batch=4, chunk=32, max_prefill=3, max_len=256)
    sched.add(Seq(0, [5] * 10, 10, Sampling(max_tokens=20), lambda *a: None))
    sched.commit(sched.plan(), np.full(1, 7))  # its prompt: it decodes now
    for rid in (1, 2, 3):
        sched.add(Seq(rid, [rid] * 100, 100, Sampling(max_tokens=4), lambda *a: None))
    decode = sched.plan()  # prefill and decode steps alternate
    assert decode.decode and decode.seqs[0].rid == 0
    sched.commit(decode, np.full(1, 7))
    batch = sched.plan()
    assert not batch.decode and (batch.B, batch.S) == (4, 32)
    assert [(s.rid, n) for s, n in zip(batch.seqs, batch.feed)] == [(1, 32), (2, 32), (3, 32), (0, 1)]
    before = len(batch.seqs[3].tokens)
    sched.commit(batch, np.full(4, 7))
    assert len(batch.seqs[3].tokens) == before + 1 and sched.counts["riding_decodes"] == 1


def test_sharded_pool_keeps_each_sequence_in_its_data_group():
    """A pool split in 2 (a mesh with data = 2): each sequence's pages and batch row in one shard,
    a shard out of pages preempts its own newest sequence, a prefix is shared within a shard, and
    admission spreads sequences over the shards."""
    pages = Pages(2 * (1 + 5), shards=2)  # 5 usable pages per shard
    assert pages.usable == 10 and pages.per == 6
    sched = Scheduler(pages, max_batch=4, chunk=32, max_prefill=3, max_len=512)
    assert {b for b, *_ in sched.shapes()} == {2, 4}  # 2 rows per shard at most
    for rid, n in enumerate((70, 60, 100, 50, 130)):
        sched.add(Seq(rid, list(range(n)), n, Sampling(max_tokens=80), lambda *a: None))
    sched.plan()
    assert sorted(s.shard for s in sched.running) == [0, 0, 1, 1]
    sent, peak = _fake_steps(sched, np.random.default_rng(1))
    assert {k: len(v) for k, v in sent.items()} == {k: 80 for k in range(5)}
    assert sched.counts["preemptions"] > 0 and pages.used == 0 and pages.available == 10
    # a prompt that starts like a finished one goes to the shard that caches its first page, though
    # that shard runs a sequence and the other none
    base, hit = list(range(2, 2 + PAGE + 5)), sched.counts["prefix_hit_tokens"]
    sched.add(Seq(10, base, len(base), Sampling(max_tokens=2), lambda *a: None))
    _fake_steps(sched, np.random.default_rng(10))
    for rid, prompt in ((11, [7] * 9), (12, base)):
        sched.add(Seq(rid, prompt, len(prompt), Sampling(max_tokens=2), lambda *a: None))
    _fake_steps(sched, np.random.default_rng(11))
    cached = {s for s in range(2) if pages.hits(page_keys(base, 1), s)[0]}
    assert len(cached) == 1 and sched.counts["prefix_hit_tokens"] - hit == PAGE


# The engine on the demo model ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def demo():
    import dsv32_jax

    model = dsv32_jax.load_model(DEMO, dtype="float32", fp8_activations=False, mtp=True)
    assert model.config.vocab_size == VOCAB
    return model


def prompts(n_tokens, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, VOCAB, n).tolist() for n in n_tokens]


FIRST, LATER = prompts((5, 40, 70), seed=1), prompts((3, 33, 100), seed=2)
BASE = prompts((2 * PAGE + 10,), seed=3)[0]
TWIN = BASE[:2 * PAGE] + prompts((20,), seed=4)[0]
LONG = prompts((230, 200, 220), seed=8)  # 4 pages each, 5 once decoding passes 256
LONG_NEW = 60


@functools.lru_cache(maxsize=None)
def _references() -> dict[tuple, list[int]]:
    every = FIRST + LATER + [BASE, TWIN] + LONG  # one batch: one set of programs to compile
    out = demo().generate(every, LONG_NEW, temperature=0, stop_tokens=[])
    return {tuple(p): o for p, o in zip(every, out)}


def reference(ps, new=NEW) -> list[list[int]]:
    """`Model.generate`'s first `new` greedy tokens for each prompt (of the batch of all of them)."""
    return [_references()[tuple(p)][:new] for p in ps]


class Collect:
    """emit callbacks that gather each request's tokens and its finish."""

    def __init__(self):
        self.tokens, self.finish, self.lock = {}, {}, threading.Condition()

    def emit(self, key):
        def f(new, finish):
            with self.lock:
                self.tokens.setdefault(key, []).extend(new)
                if finish is not None:
                    assert key not in self.finish, "two finishes"
                    self.finish[key] = finish
                self.lock.notify_all()
        return f

    def wait(self, n, timeout=300):
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.finish) >= n, timeout), self.finish


def greedy(max_tokens=NEW, **kw):
    return Sampling(max_tokens=max_tokens, temperature=0, **kw)


@pytest.fixture(scope="module")
def engine():  # 8 pages: one request at full length, and preemption when two grow; few shapes to compile
    # decode steps of up to 3 tokens (multi-step) whenever nothing waits or prefills
    eng = Engine(demo(), max_batch=2, chunk=16, max_prefill=2, pages=1 + 8, decode_steps=3)
    eng.start()
    yield eng
    eng.stop(drain=False)


def test_step_inputs_move_to_the_device_in_one_transfer_bit_for_bit(monkeypatch):
    """`step.inputs`: a step's host arrays as one packed buffer (one transfer, in which the engine thread
    lets go of the interpreter lock once, not once per array), each back with its dtype, shape and bits."""
    from dsv32_jax.engine import step as st

    host = {"table": np.array([[-1, 2**31 - 1], [0, 5]], np.int32), "seeds": np.array([0, 2**32 - 1], np.uint32),
            "top_p": np.array([np.inf, -0.0, 1.5e-40], np.float32), "ends": np.array([True, False, True]),
            "steps": np.asarray(7, np.int32)}
    puts, real = [], jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: puts.append(a) or real(*a, **k))
    out = st.inputs(host)
    assert len(puts) == 1 and list(out) == list(host)
    for k, x in host.items():
        assert isinstance(out[k], jax.Array) and (out[k].dtype, out[k].shape) == (x.dtype, x.shape), k
        assert np.asarray(out[k]).tobytes() == x.tobytes(), k
    with pytest.raises(TypeError, match="int64"):
        st.inputs({"x": np.zeros(2, np.int64)})


def test_the_engine_hands_its_step_programs_device_arrays(monkeypatch):
    from dsv32_jax.engine import step as st

    args, real = [], st.step
    monkeypatch.setattr(st, "step", lambda *a, **k: args.append(a[2:]) or real(*a, **k))
    eng = Engine(demo(), max_batch=2, chunk=16, max_prefill=2, pages=1 + 8)
    eng.submit(prompts((20,), seed=3)[0], greedy(max_tokens=3), lambda *a: None)
    for _ in eng.run():
        pass
    assert len(args) == 4  # prefill chunks of 16 and 4 tokens, two decodes
    assert all(isinstance(x, jax.Array) for a in args for x in a), [[type(x) for x in a] for a in args]


def test_mixed_lengths_and_arrivals_mid_decode_equal_generate(engine):
    first, later = FIRST, LATER
    got = Collect()
    for i, p in enumerate(first):
        engine.submit(p, greedy(), got.emit(i))
    with got.lock:  # the later ones arrive while the first decode
        got.lock.wait_for(lambda: any(len(t) >= 2 for t in got.tokens.values()), 300)
    for i, p in enumerate(later):
        engine.submit(p, greedy(), got.emit(3 + i))
    got.wait(6)
    ref = reference(first + later)
    for i, p in enumerate(first + later):
        assert got.finish[i] == "length"
        assert got.tokens[i] == ref[i], f"request {i} ({len(p)} prompt tokens)"
    assert engine.metrics()["pages_used"] == 0
    assert engine.metrics()["multi_steps"] > 0  # the last ones decode 3 tokens a step


def test_shared_prefix_is_not_prefilled_again(engine):
    base, twin = BASE, TWIN
    before = engine.metrics()["prefix_hit_tokens"]
    got = Collect()
    engine.submit(base, greedy(), got.emit(0))
    got.wait(1)
    engine.submit(twin, greedy(), got.emit(1))
    got.wait(2)
    assert engine.metrics()["prefix_hit_tokens"] - before == 2 * PAGE
    assert [got.tokens[0], got.tokens[1]] == reference([base, twin])


def test_cancel_frees_pages(engine):
    got = Collect()
    rid = engine.submit(prompts((90,), seed=5)[0], greedy(max_tokens=400), got.emit(0))
    with got.lock:
        got.lock.wait_for(lambda: got.tokens.get(0), 300)
    engine.cancel(rid)
    got.wait(1)
    assert got.finish[0] == "cancelled" and len(got.tokens[0]) < 400
    assert engine.metrics()["pages_used"] == 0 and engine.metrics()["running"] == 0


def test_sampling_is_the_same_alone_or_batched(engine):
    p, others = prompts((12,), seed=6)[0], prompts((30, 50), seed=7)
    hot = Sampling(max_tokens=NEW, temperature=1.5, top_p=1.0, seed=11)  # flat: the keys matter
    alone = Collect()
    engine.submit(p, hot, alone.emit(0))
    alone.wait(1)
    mixed = Collect()
    for i, q in enumerate(others):
        engine.submit(q, greedy(), mixed.emit(1 + i))
    engine.submit(p, hot, mixed.emit(0))
    mixed.wait(3)
    assert mixed.tokens[0] == alone.tokens[0]
    single = Engine(demo(), max_batch=2, chunk=16, max_prefill=2, pages=1 + 8)  # one token a step
    single.start()
    try:
        one = Collect()
        single.submit(p, hot, one.emit(0))
        one.wait(1)
    finally:
        single.stop(drain=False)
    assert one.tokens[0] == alone.tokens[0]  # multi-step: each token's key as a step of its own


def test_preemption_recomputes_and_stays_exact(engine):
    ps = LONG
    before = engine.metrics()["preemptions"]
    got = Collect()
    for i, p in enumerate(ps):
        engine.submit(p, greedy(max_tokens=LONG_NEW), got.emit(i))
    got.wait(3)
    assert engine.metrics()["preemptions"] > before and engine.metrics()["pages_used"] == 0
    ref = reference(ps, LONG_NEW)
    for i in range(3):
        assert got.tokens[i] == ref[i], f"request {i}"


def test_pallas_attention_over_the_pool_equals_generate():
    """attention_impl="pallas" serves: its kernels (interpreted on CPU) read the pool through the
    page table. Two requests of 4 pages each, far past index_topk (the indexer and top-k kernels
    run, not the short-context skip), prefilled in one step and decoded together: greedy tokens
    equal `Model.generate`'s (XLA attention)."""
    import dsv32_jax

    model = dsv32_jax.load_model(DEMO, dtype="float32", fp8_activations=False,
                                 attention_impl="pallas")
    ps = LONG[:2]
    assert min(map(len, ps)) > 3 * PAGE and model.config.index_topk < 3 * PAGE
    eng = Engine(model, max_batch=2, chunk=256, max_prefill=2, pages=1 + 8)
    eng.start()
    try:
        got = Collect()
        for i, p in enumerate(ps):
            eng.submit(p, greedy(), got.emit(i))
        got.wait(2)
    finally:
        eng.stop(drain=False)
    assert [got.tokens[0], got.tokens[1]] == reference(ps)


def test_bad_requests_queue_limit_and_stop():
    eng = Engine(demo(), max_batch=1, max_waiting=1)  # not started: requests wait
    # its pools committed to the device, as every step returns them: one compile per step shape
    assert all(a.committed for a in jax.tree.leaves(eng._pools))
    with pytest.raises(ValueError, match="outside"):
        eng.submit([5, 99999], greedy(), lambda *a: None)
    with pytest.raises(ValueError, match="exceeds the context"):
        eng.submit([5] * 500, greedy(max_tokens=20), lambda *a: None)
    with pytest.raises(ValueError, match="temperature"):
        eng.submit([5], Sampling(max_tokens=2, temperature=-1), lambda *a: None)
    got = Collect()
    eng.submit([5, 6], greedy(), got.emit(0))
    with pytest.raises(QueueFull) as e:
        eng.submit([5, 6], greedy(), got.emit(1))
    assert e.value.retry_after > 0
    eng.stop(drain=False)
    got.wait(1)
    assert got.finish[0] == "error: server shutting down"
    with pytest.raises(EngineStopped):
        eng.submit([5, 6], greedy(), got.emit(2))


MESH_SCRIPT = """
import json, sys, threading
import dsv32_jax
from dsv32_jax.engine.core import Engine
from dsv32_jax.engine.scheduler import Sampling
from sharding.mesh import make_mesh

path, prompts = sys.argv[1], json.loads(sys.argv[2])
model = dsv32_jax.load_model(path, dtype="float32", fp8_activations=False, mesh=make_mesh(2, 1, 2))
eng = Engine(model, max_batch=4, chunk=16, max_prefill=2, pages=1 + 8, decode_steps=2)
eng.start()
out, done, shards = {}, threading.Semaphore(0), set()
for i, p in enumerate(prompts):
    def emit(new, finish, i=i):
        out.setdefault(i, []).extend(new)
        shards.update(s.shard for s in eng.sched.running)
        if finish:
            done.release()
    eng.submit(p, Sampling(max_tokens=8, temperature=0), emit)
for _ in prompts:
    done.acquire()
eng.stop(drain=False)
print(json.dumps({"tokens": [out[i] for i in range(len(prompts))], "shards": sorted(shards),
                  "counts": eng.metrics(), "pool": list(eng._pools["moe_layers"].c.sharding.spec)}))
"""


def test_engine_on_a_data_tensor_mesh_equals_one_device():
    """(2,1,2) on 4 simulated devices: the pool split over data (8 usable pages a group), 8
    requests on 4 running slots (2 a group: admissions mid-decode, both groups busy), two sharing
    their first 2 pages, multi-step decodes, decodes riding in a prefill step's free rows: greedy
    tokens equal to the unsharded `Model.generate`
    (this module's references, computed here on one device: the subprocess compiles only the
    mesh's programs)."""
    every = FIRST + LATER + [BASE, TWIN]
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(DEMO), json.dumps(every)],
                          capture_output=True, text=True, env=xla_env(4), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["tokens"] == reference(every)
    assert r["shards"] == [0, 1] and r["pool"] == [None, "data"], r
    c = r["counts"]
    assert c["multi_steps"] > 0 and c["riding_decodes"] > 0 and c["pages_total"] == 16, c


def test_compiles_stop_short_of_the_memory_map_limit(monkeypatch):
    """XLA:CPU maps ~760 pages per step program and Linux ends a process past vm.max_map_count:
    a warm-up stops compiling at WARM_MAPS of it (the rest compile on first use), and a step of a
    new shape past MAX_MAPS is one clear error, not a crash in the compiler."""
    from dsv32_jax.engine import core as eng_mod
    from dsv32_jax.engine.scheduler import Batch

    maps, limit = eng_mod.memory_maps()  # this Linux's
    assert 0 < maps < limit
    eng = Engine(demo(), max_batch=1, chunk=16, max_prefill=1, pages=1 + 8)
    lines = []
    monkeypatch.setattr(eng_mod, "memory_maps", lambda: (61, 100))  # past WARM_MAPS: nothing compiled
    eng.warmup(lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"compiled 0 of {len(eng.sched.shapes())} step shapes")
    monkeypatch.setattr(eng_mod, "memory_maps", lambda: (96, 100))
    monkeypatch.setattr(eng_mod, "_SEEN", set())  # a step this process has not compiled, whatever ran before
    with pytest.raises(MemoryError, match="vm.max_map_count"):
        eng._run(Batch([], [], 1, 1, 1))


def test_default_pool_fits_the_device_memory():
    cfg = demo().config
    full = default_pages(cfg, 4, None)
    assert full == 4 * (cfg.max_seq_len // PAGE) + 1
    per_page = pool_bytes(cfg, 2) - pool_bytes(cfg, 1)
    free = 10 * per_page  # room for 8 pages at 80%
    n = default_pages(cfg, 4, free)
    assert n < full and pool_bytes(cfg, n) <= 0.8 * free < pool_bytes(cfg, n + 1)


def test_warmup_shapes_are_the_shapes_steps_take():
    """Every step a scheduler plans has a shape its warm-up list holds, and the list has no batch
    wider than max_batch (a prefill step runs running sequences only)."""
    for max_batch, max_prefill, steps in ((1, 4, 1), (3, 2, 4), (4, 4, 1)):
        sched = Scheduler(Pages(40, True), max_batch, 32, max_prefill, 256, decode_steps=steps)
        shapes = set(sched.shapes())
        assert max(b for b, *_ in shapes) == (1 << (max_batch - 1).bit_length())
        rng, seen = np.random.default_rng(max_batch), set()
        for rid in range(8):
            n = int(rng.integers(1, 120))
            sched.add(Seq(rid, list(rng.integers(0, 100, n)), n, Sampling(max_tokens=int(rng.integers(1, 40))),
                          lambda *a: None))
        while not sched.idle:
            batch = sched.plan()
            assert (batch.B, batch.S, batch.P, batch.decode) in shapes
            assert batch.stops == 1 and batch.width == (steps if batch.decode else 1)
            seen.add(batch.steps)
            sched.commit(batch, np.full((batch.B, batch.steps), 7), np.full(batch.B, batch.steps - 1))
        assert seen == {1, steps}


# Speculative decoding in the engine (the demo model's trained MTP layer) -------------------------------


def test_speculative_engine_equals_generate_and_accepts_the_trained_drafts():
    """k = 2 on three held-out-like contexts of two chats each (3-4 pages with their replies, so
    three running overflow the 8-page pool: preemption), one arriving mid-decode; then the next turn
    of one (a prefix hit), and one request sampled alone and among others. Greedy tokens equal
    `Model.generate`'s; drafts accepted > 70% (the first alone is at 0.95 here, as
    benchmarks/mtp_acceptance measures it teacher-forced: the MTP layer's paged keys are the true
    ones); the sampled request gets the same tokens alone or batched."""
    from dsv32_jax.text.chat import ASSISTANT, THINK_END
    from dsv32_jax.text.tokenizer import Tokenizer
    from dsv32_jax.train import corpus

    tok, turn = Tokenizer.load(DEMO), ASSISTANT + THINK_END
    convs = corpus.conversations(6, 11)
    ctx = [tok.encode(a + b[:b.rindex(turn) + len(turn)]) for a, b in zip(convs[::2], convs[1::2])]
    assert all(2 * PAGE < len(c) + 32 <= 4 * PAGE for c in ctx), [len(c) for c in ctx]
    want = demo().generate(ctx, 32, temperature=0, stop_tokens=[])
    # page tables at least 4 wide (each sequence's widest): the 2-page variants of the speculative
    # steps would cost ~12 s of compiles; growing tables are tested above (mixed lengths)
    eng = Engine(demo(), max_batch=3, chunk=32, max_prefill=3, pages=1 + 8, speculative=2, table=4)
    eng.start()
    try:
        got = Collect()
        for i in (0, 1):
            eng.submit(ctx[i], greedy(max_tokens=32), got.emit(i))
        with got.lock:  # the third arrives while the first two decode
            got.lock.wait_for(lambda: any(len(t) >= 2 for t in got.tokens.values()), 300)
        eng.submit(ctx[2], greedy(max_tokens=32), got.emit(2))
        got.wait(3)
        m = eng.metrics()
        assert [got.tokens[i] for i in range(3)] == want
        assert m["preemptions"] > 0 and m["pages_used"] == 0
        assert m["accepted_draft_tokens"] > 0.7 * m["draft_tokens"], m
        # the next turn: its prompt holds the first context and its reply, so their full pages are
        # shared (the token after each matches too)
        nxt = ctx[0] + want[0] + ctx[1][-20:]
        again = Collect()
        eng.submit(nxt, greedy(), again.emit(0))
        again.wait(1)
        assert eng.metrics()["prefix_hit_tokens"] - m["prefix_hit_tokens"] == (len(ctx[0]) + 31) // PAGE * PAGE
        # its reference from the batch `want` came from, nxt in ctx[0]'s row (all under 256
        # tokens): the programs compiled for `want`, no new ones
        ref = demo().generate([nxt, *ctx[1:]], 32, temperature=0, stop_tokens=[])[0][:NEW]
        assert again.tokens[0] == ref
        hot = Sampling(max_tokens=12, temperature=0.9, top_p=0.9, seed=5)
        alone, mixed = Collect(), Collect()
        eng.submit(ctx[0], hot, alone.emit(0))
        alone.wait(1)
        for i in (1, 2):
            eng.submit(ctx[i], greedy(), mixed.emit(i))
        eng.submit(ctx[0], hot, mixed.emit(0))
        mixed.wait(3)
        assert mixed.tokens[0] == alone.tokens[0]
    finally:
        eng.stop(drain=False)
