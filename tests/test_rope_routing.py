"""YaRN rotary (both layouts) and the MoE router (group-limited top-k) against plain numpy."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax.model.config import Config, preset
from dsv32_jax.model.moe import route
from dsv32_jax.model.rope import apply_rope, rope_tables, yarn_inv_freq


def test_yarn_frequencies_formula():
    cfg = Config()  # released: factor 40, orig 4096, beta 32/1, R 64
    f = yarn_inv_freq(cfg)
    r = 64
    base = 10000.0 ** (-np.arange(0, r, 2) / r)
    corr = lambda n: r * math.log(4096 / (n * 2 * math.pi)) / (2 * math.log(10000.0))  # noqa: E731
    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), r - 1)
    ramp = np.clip((np.arange(r // 2) - low) / (high - low), 0, 1)
    want = base / 40 * ramp + base * (1 - ramp)
    np.testing.assert_allclose(f, want, rtol=1e-6)
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(base[-1] / 40, rel=1e-6)
    # no YaRN when the context does not exceed the original length
    plain = yarn_inv_freq(dataclasses.replace(cfg, max_seq_len=4096))
    np.testing.assert_allclose(plain, base, rtol=1e-6)


def _complex_rotate(pairs_re, pairs_im, pos, freqs):
    z = (pairs_re + 1j * pairs_im) * np.exp(1j * pos[..., None] * freqs)
    return z.real, z.imag


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_layouts(interleaved):
    cfg = preset("tiny")
    rng = np.random.default_rng(0)
    b, s, h, r = 2, 5, 3, cfg.qk_rope_head_dim
    x = rng.standard_normal((b, s, h, r)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [7, 9, 30, 64, 100]])
    cos, sin = rope_tables(cfg, jnp.asarray(pos))
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleaved))
    freqs = yarn_inv_freq(cfg).astype(np.float64)
    p = pos[:, :, None].astype(np.float64)
    if interleaved:  # pairs (x[2j], x[2j+1])
        re, im = _complex_rotate(x[..., 0::2], x[..., 1::2], p, freqs)
        want = np.stack([re, im], -1).reshape(x.shape)
    else:  # pairs (x[j], x[j + R/2])
        re, im = _complex_rotate(x[..., : r // 2], x[..., r // 2:], p, freqs)
        want = np.concatenate([re, im], -1)
    np.testing.assert_allclose(got, want, atol=2e-4)
    np.testing.assert_array_equal(got[0, 0], x[0, 0])  # position 0 is the identity
    # the two layouts really differ
    other = np.asarray(apply_rope(jnp.asarray(x), cos, sin, not interleaved))
    assert np.abs(other - got)[:, 1:].max() > 0.1


def _route_numpy(logits, bias, cfg):
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    biased = scores + bias
    n, e = biased.shape
    g = cfg.n_expert_groups
    out_w, out_i = [], []
    for row, srow in zip(biased, scores):
        if g > 1:
            groups = row.reshape(g, e // g)
            gs = np.sort(groups, -1)[:, -2:].sum(-1)
            keep = np.argsort(-gs, kind="stable")[: cfg.n_limited_groups]
            row = np.where(np.isin(np.arange(g), keep)[:, None], groups, -np.inf).reshape(e)
        idx = np.argsort(-row, kind="stable")[: cfg.n_activated_experts]
        w = srow[idx] / srow[idx].sum() * cfg.route_scale
        out_w.append(w), out_i.append(idx)
    return np.array(out_w), np.array(out_i)


@pytest.mark.parametrize("groups,limited", [(4, 2), (1, 1), (8, 3)])
def test_route_matches_numpy(groups, limited):
    cfg = dataclasses.replace(preset("tiny"), n_routed_experts=16, n_expert_groups=groups,
                              n_limited_groups=limited, n_activated_experts=4)
    rng = np.random.default_rng(groups)
    logits = rng.standard_normal((64, 16)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(16)).astype(np.float32)
    w, i = route(jnp.asarray(logits), jnp.asarray(bias), cfg)
    ww, wi = _route_numpy(logits, bias, cfg)
    np.testing.assert_array_equal(np.sort(np.asarray(i), -1), np.sort(wi, -1))
    order = np.argsort(np.asarray(i), -1), np.argsort(wi, -1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order[0], -1),
                               np.take_along_axis(ww, order[1], -1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w).sum(-1), cfg.route_scale, rtol=1e-5)


def test_route_group_limit_excludes_strong_expert_in_weak_group():
    # 4 groups of 2; group scores are top-2 sums, so a group with one huge and one tiny expert
    # loses to groups of two medium experts, and its huge expert is never picked.
    cfg = dataclasses.replace(preset("tiny"), n_routed_experts=8, n_expert_groups=4,
                              n_limited_groups=2, n_activated_experts=2)
    logits = np.full((1, 8), -10.0, np.float32)
    logits[0, [0, 1]] = [8.0, -8.0]  # group 0: 1.0 + 0.0003
    logits[0, [2, 3, 4, 5]] = 3.0  # groups 1, 2: 0.95 + 0.95
    _, i = route(jnp.asarray(logits), jnp.zeros(8), cfg)
    assert 0 not in np.asarray(i)
    # the correction bias steers the choice but weights use the unbiased scores
    bias = np.zeros(8, np.float32)
    bias[0] = 5.0
    w, i = route(jnp.asarray(logits), jnp.asarray(bias), cfg)
    assert 0 in np.asarray(i)
    s = 1 / (1 + np.exp(-logits[0, np.asarray(i)[0]].astype(np.float64)))
    np.testing.assert_allclose(np.asarray(w)[0], s / s.sum() * cfg.route_scale, rtol=1e-5)


def test_route_ties_pick_lowest_index():
    cfg = dataclasses.replace(preset("tiny"), n_routed_experts=8, n_expert_groups=2,
                              n_limited_groups=1, n_activated_experts=2)
    w, i = route(jnp.zeros((3, 8)), jnp.zeros(8), cfg)  # every score ties
    np.testing.assert_array_equal(np.sort(np.asarray(i), -1), [[0, 1]] * 3)
    np.testing.assert_allclose(np.asarray(w), cfg.route_scale / 2)


def test_route_single_group_is_plain_topk():
    cfg = dataclasses.replace(preset("tiny"), n_routed_experts=8, n_expert_groups=1,
                              n_limited_groups=1, n_activated_experts=3)
    logits = np.random.default_rng(5).standard_normal((10, 8)).astype(np.float32)
    _, i = route(jnp.asarray(logits), jnp.zeros(8), cfg)
    np.testing.assert_array_equal(np.sort(np.asarray(i), -1), np.sort(np.argsort(-logits, -1)[:, :3], -1))
