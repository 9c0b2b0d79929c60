"""dsv32_jax.engine.session.ChatSession (on the serving engine): a chat continued turn by turn gives the tokens
of re-prefilling the whole history, prefilling only the last partial page of it; compile time apart; argument
checks; interrupted calls; pool growth."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import interrupt_step

import dsv32_jax
from dsv32_jax.checkpoint.synthetic import write_checkpoint
from dsv32_jax.engine import session as session_mod
from dsv32_jax.engine.session import ChatSession
from dsv32_jax.model.cache import PAGE
from dsv32_jax.engine import core as engine_mod

TURNS = ([0, 2, 40, 41, 42, 3, 5], [1, 2, 50, 51, 3, 5], [2, 60, 61, 62, 63, 3])  # BOS/EOS/USER/... + text
REPLIES = (6, 5, 7)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_checkpoint(dsv32_jax.preset("tiny"), tmp_path_factory.mktemp("ckpt") / "tiny")
    return dsv32_jax.load_model(path)


def _chat(session, turns=TURNS, replies=REPLIES, **kw) -> tuple[list[int], list[bool]]:
    """Greedy turns through the session -> (the whole history, which positions were generated)."""
    history, generated = [], []
    for ids, n in zip(turns, replies):
        out = list(session.stream(ids, n, temperature=0, stop_tokens=[], **kw))
        assert len(out) == n
        history += ids + out
        generated += [False] * len(ids) + [True] * n
        assert session.tokens == history and session.length == len(history)
    return history, generated


def _reprefilled_greedy(model, history: list[int]) -> np.ndarray:
    """Re-prefill the whole history at once: the greedy next token after every position."""
    return np.asarray(model.logits(np.array([history]))).argmax(-1)[0]


def test_multi_turn_from_the_cache_equals_reprefilling_the_history(model):
    engine_mod._SEEN.clear()  # so that this process compiles the shapes here
    notices = []
    session = ChatSession(model, on_compile=lambda label, s: notices.append((label, s)))
    stats = {}
    history, generated = _chat(session, turns=TURNS[:1], replies=REPLIES[:1], stats=stats)
    # Compile time is reported apart, with a notice before each compile starts.
    assert stats["compiled"] == ["prefill step (1 sequences x 16 tokens, 2-page tables)",
                                 "decode step (1 sequences, 2-page tables)"]
    assert [label for label, s in notices] == [label for label in stats["compiled"] for _ in (0, 1)]
    assert [s is None for label, s in notices] == [True, False, True, False]
    assert stats["compile_s"] == pytest.approx(sum(s for _, s in notices if s is not None))
    assert stats["prefill_tokens"] == len(TURNS[0]) and stats["decode_steps"] == REPLIES[0]
    again = {}
    list(ChatSession(model).stream(TURNS[0], 2, temperature=0, stats=again))
    assert again["compiled"] == [] and again["compile_s"] == 0  # steady state: nothing compiles twice
    assert again["prefill_s"] > 0 and again["decode_s"] > 0

    session.reset()
    assert session.length == 0 and session.room == model.config.max_seq_len
    history, generated = _chat(session)
    want = _reprefilled_greedy(model, history)
    got = [history[i] for i in range(1, len(history)) if generated[i]]
    assert got == [int(want[i - 1]) for i in range(1, len(history)) if generated[i]]

    # A context that differs after the first turn: prepare() keeps the common prefix, the rest is prefilled.
    cut = len(TURNS[0]) + REPLIES[0]
    other = history[:cut] + [2, 70, 71, 72, 73, 3, 5]
    new = session.prepare(other)
    assert session.length == cut and new == other[cut:]
    out = list(session.stream(new, len(history) - len(other), temperature=0, stop_tokens=[]))
    alt = other + out
    assert len(alt) == len(history)  # the same shape as above: no new compile for the reference
    want = _reprefilled_greedy(model, alt)
    assert out == [int(t) for t in want[len(other) - 1:-1]]


def test_prepare_always_leaves_something_to_prefill(model):
    session = ChatSession(model)
    list(session.stream([0, 2, 40], 2, temperature=0))
    same = session.tokens
    assert session.prepare(same) == same[-1:] and session.length == len(same) - 1
    assert session.prepare([7]) == [7] and session.length == 0
    with pytest.raises(ValueError, match="at least one token"):
        session.prepare([])


def test_stop_tokens_end_the_reply_and_stay_in_the_cache(model):
    session = ChatSession(model)
    first = list(session.stream(TURNS[0], 4, temperature=0, stop_tokens=[]))
    session.reset()
    stop = first[1]
    out = list(session.stream(TURNS[0], 4, temperature=0, stop_tokens=[stop]))
    assert out == first[:first.index(stop) + 1] and session.tokens == TURNS[0] + out


def test_sampling_is_seeded(model):
    session = ChatSession(model)
    a = list(session.stream(TURNS[0], 6, temperature=1.0, top_p=0.9, seed=3, stop_tokens=[]))
    session.reset()
    b = list(session.stream(TURNS[0], 6, temperature=1.0, top_p=0.9, seed=3, stop_tokens=[]))
    session.reset()
    c = list(session.stream(TURNS[0], 6, temperature=1.0, top_p=0.9, seed=4, stop_tokens=[]))
    assert a == b and a != c


def test_interrupted_call_keeps_the_conversation(model, monkeypatch):
    reference = ChatSession(model)
    want, _ = _chat(reference, turns=TURNS[:2], replies=(3, 4))

    session = ChatSession(model)
    interrupt_step(monkeypatch, at=3)  # Ctrl-C while the third decode step runs
    got = []
    with pytest.raises(KeyboardInterrupt):
        for t in session.stream(TURNS[0], 6, temperature=0, stop_tokens=[]):
            got.append(t)
    assert session.tokens == TURNS[0] + got and len(got) == 3  # the prefill's token, two decodes
    assert session.capacity == 0  # the cache is gone: the next call rebuilds it from the tokens
    monkeypatch.undo()
    stats = {}
    list(session.stream(TURNS[1], 4, temperature=0, stop_tokens=[], stats=stats))
    assert session.tokens == want
    assert stats["prefill_tokens"] == len(TURNS[0]) + 3 + len(TURNS[1])  # re-prefilled


def test_closing_the_iteration_early_keeps_the_cache(model):
    session = ChatSession(model)
    prompt = list(range(1, PAGE + 10))
    it = session.stream(prompt, 8, temperature=0, stop_tokens=[])
    first = [next(it), next(it)]
    it.close()
    assert session.tokens == prompt + first and session.capacity > 0
    stats = {}
    list(session.stream([5], 1, temperature=0, stats=stats))
    # continued from its parked sequence: the last yielded token (its keys not written yet) and [5]
    assert stats["prefill_tokens"] == 2


def test_arguments_are_checked_before_any_work(model):
    session = ChatSession(model)
    cases = [
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=123), "exceeds the context of 128 positions; at most 122 new tokens fit"),
        (dict(new_ids=[]), "at least one token"),
        (dict(new_ids=[0, 2048]), r"outside \[0, 2048\)"),
        (dict(new_ids=[0, -1]), r"new_ids: token ids \[-1\] are outside \[0, 2048\)"),
        (dict(new_ids=[0, 1.0]), "new_ids must be integer token ids, got 1.0"),
        (dict(seed=1.5), "seed must be an integer"),
    ]
    for kw, match in cases:
        args = dict(new_ids=[0, 2, 40, 41, 42, 3], max_new_tokens=4) | kw
        with pytest.raises(ValueError, match=match):
            session.stream(**args)  # raises at the call, not at the first next()
    assert session.length == 0 and session.capacity == 0
    with pytest.raises(ValueError, match="max_len"):
        ChatSession(model, max_len=129)


def test_a_full_session_refuses_more_and_stays_usable(model):
    session = ChatSession(model)
    assert session.room == 128
    list(session.stream(list(range(16)), 100, temperature=0, stop_tokens=[]))
    assert session.length == 116 and session.room == 12
    with pytest.raises(ValueError, match="exceeds the context of 128 positions; at most 11 new tokens fit"):
        session.stream([5], 12)
    assert session.length == 116
    session.truncate(10)
    assert session.room == 118
    with pytest.raises(ValueError, match="cannot truncate"):
        session.truncate(11)
    assert len(list(session.stream([5], 117, temperature=0, stop_tokens=[]))) == 117 and session.room == 0


def test_growing_the_pool_keeps_the_conversation(model, monkeypatch):
    """A pool of 16 positions at first: a turn that needs more builds a larger engine (64), which
    prefills the conversation again; its replies are those of a session that never grew."""
    want, _ = _chat(ChatSession(model))
    monkeypatch.setattr(session_mod, "MIN_CAPACITY", 16)
    session = ChatSession(model)
    list(session.stream(TURNS[0], 2, temperature=0, stop_tokens=[]))
    assert session.capacity == 16
    session.truncate(0)
    got, _ = _chat(session)  # 13, then 24, then 37 positions
    assert got == want and session.capacity == 64
