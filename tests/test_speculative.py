"""Speculative sampling's acceptance rule (`engine.speculative`): the tokens it lets out have the
target's distribution whatever the drafts, and at temperature 0 they are the target's greedy tokens.

A toy language model stands in for both models: a token depends on the previous one only (a V x V
table of logits), the target's table and the draft's differ. Many sequences of two speculative
rounds (k drafts chained from the draft table, verified against the target table) give the first
two output tokens; their frequencies are compared with the exact two-token distribution of the
target by a chi-square test. The bug the test must catch, a draft picked greedily that reports the
softmax it did not sample from, is run too and fails it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax.engine.generate import NONFINITE
from dsv32_jax.engine.speculative import draft, probs, verify

V, N = 6, 40_000  # vocabulary, sampled sequences
X0 = 2  # the context: one token


def tables(seed: int = 0):
    rng = np.random.default_rng(seed)
    target = rng.normal(0, 1.5, (V, V)).astype(np.float32)
    drafter = (target + rng.normal(0, 1.0, (V, V))).astype(np.float32)  # close, not equal
    return jnp.asarray(target), jnp.asarray(drafter)


def rounds(target, drafter, key, k, temperature, top_p, greedy_bug=False):
    """Two speculative rounds from X0 -> the first two output tokens."""
    t, tp = jnp.float32(temperature), jnp.float32(top_p)

    def one_round(prev, key):
        keys = jax.random.split(key, k + 1)
        ds, qs, x = [], [], prev
        for j in range(k):  # chained drafts
            d, q = draft(drafter[x], keys[j], t, tp)
            if greedy_bug:  # the bug: the argmax drafted, the softmax claimed as q
                d = jnp.argmax(q).astype(jnp.int32)
            ds.append(d)
            qs.append(q)
            x = d
        drafts = jnp.stack(ds)
        logits = target[jnp.concatenate([prev[None], drafts])]  # after the context, after each draft
        n, tokens = verify(logits, drafts, jnp.stack(qs), keys[k], t, tp)
        return n, tokens

    def seq(key):
        k1, k2 = jax.random.split(key)
        n1, t1 = one_round(jnp.int32(X0), k1)
        n2, t2 = one_round(t1[n1], k2)
        first = t1[0]
        second = jnp.where(n1 >= 1, t1[jnp.minimum(1, k)], t2[0])
        return first, second, n1

    return jax.jit(jax.vmap(seq))(jax.random.split(key, N))


def expected(target, temperature, top_p):
    p = np.asarray(jax.vmap(probs, (0, None, None))(target, jnp.float32(temperature), jnp.float32(top_p)))
    return p[X0][:, None] * p  # P(x1, x2) = p(x1 | X0) p(x2 | x1)


def chi2(first, second, want):
    counts = np.zeros((V, V))
    np.add.at(counts, (np.asarray(first), np.asarray(second)), 1)
    mask = want > 0
    assert counts[~mask].sum() == 0, "a token outside the target's nucleus came out"
    e = want[mask] * N
    return float(((counts[mask] - e) ** 2 / e).sum()), int(mask.sum()) - 1


def critical(df: int, z: float = 3.719) -> float:
    """The chi-square value with tail probability 1e-4 (z of the normal), Wilson-Hilferty."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("temperature,top_p,k", [(1.0, 1.0, 1), (1.0, 1.0, 3), (0.7, 0.9, 2)])
def test_output_has_the_target_distribution(temperature, top_p, k):
    target, drafter = tables()
    first, second, n1 = rounds(target, drafter, jax.random.key(1), k, temperature, top_p)
    stat, df = chi2(first, second, expected(target, temperature, top_p))
    assert stat < critical(df), (stat, critical(df))
    accepted = float(np.mean(np.asarray(n1) >= 1))
    assert 0.2 < accepted < 1.0  # the drafts are neither always right nor never


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_a_greedy_draft_claiming_its_softmax_fails(temperature, top_p):
    target, drafter = tables()
    first, second, _ = rounds(target, drafter, jax.random.key(1), 2, temperature, top_p, greedy_bug=True)
    stat, df = chi2(first, second, expected(target, temperature, top_p))
    assert stat > 10 * critical(df), stat


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_is_the_targets_argmax_chain(k):
    target, drafter = tables()
    first, second, n1 = rounds(target, drafter, jax.random.key(3), k, 0.0, 1.0)
    x1 = int(jnp.argmax(target[X0]))
    x2 = int(jnp.argmax(target[x1]))
    assert set(np.asarray(first).tolist()) == {x1} and set(np.asarray(second).tolist()) == {x2}
    d1 = int(jnp.argmax(drafter[X0]))
    assert set(np.asarray(n1 >= 1).tolist()) == {d1 == x1}  # accepted exactly when it was the argmax


def test_tokens_layout_and_nonfinite():
    target, drafter = tables()
    drafts = jnp.array([int(jnp.argmax(target[X0])), 0, 0], jnp.int32)
    q = jax.nn.one_hot(drafts, V)
    logits = target[jnp.array([X0, drafts[0], 0, 0])]
    n, tokens = verify(logits, drafts, q, jax.random.key(0), jnp.float32(0), jnp.float32(1))
    want1 = int(jnp.argmax(target[drafts[0]]))
    assert int(n) == (1 if want1 != 0 else 2) and int(tokens[0]) == int(drafts[0])
    assert np.asarray(tokens[int(n) + 1:]).tolist() == [-1] * (3 - int(n))
    bad = logits.at[1, 3].set(jnp.nan)  # the logits after the first (accepted) draft
    n, tokens = verify(bad, drafts, q, jax.random.key(0), jnp.float32(0), jnp.float32(1))
    assert int(n) == 1 and np.asarray(tokens).tolist() == [int(drafts[0]), NONFINITE, -1, -1]
