"""Sparse attention structure: tiled top-k equals one global top-k, O(S*k) cost, query chunking,
routed-expert windows, layers compiled once."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax.model import attention
from dsv32_jax.model.attention import (dense_mla, index_scores, index_topk, key_tile_size,
                                       over_query_chunks, sparse_mla)
from dsv32_jax.checkpoint.weights import rngs
from dsv32_jax.model.config import preset
from dsv32_jax.model.layers import f32_matmul
from dsv32_jax.model.moe import Experts, expert_window
from dsv32_jax.model.transformer import Transformer, init_cache


def _flops(fn, *shapes) -> float:
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _rows(c, pe):
    """A `rows` callable gathering from plain (B,T,C) / (B,T,R) arrays."""
    def rows(idx):
        b = jnp.arange(idx.shape[0])[:, None, None]
        return c[b, jnp.maximum(idx, 0)], pe[b, jnp.maximum(idx, 0)]
    return rows


def test_sparse_attention_cost_is_linear_in_length():
    b, h, c, r, k, dn = 1, 4, 128, 64, 64, 64
    f32, i32 = jnp.float32, jnp.int32

    def sparse(s):
        return _flops(lambda q_c, q_pe, kc, kpe, idx: sparse_mla(q_c, q_pe, idx, _rows(kc, kpe), 0.1, f32),
                      ((b, s, h, c), f32), ((b, s, h, r), f32), ((b, s, c), f32), ((b, s, r), f32),
                      ((b, s, k), i32))

    def dense(s):
        return _flops(lambda *a: dense_mla(*a, 0.1, f32), ((b, s, h, dn), f32), ((b, s, h, r), f32),
                      ((b, s, h, dn), f32), ((b, s, r), f32), ((b, s, h, dn), f32),
                      ((b, s, s), jnp.bool_))

    s1, s2 = sparse(512), sparse(2048)
    d1, d2 = dense(512), dense(2048)
    assert 3.5 < s2 / s1 < 4.5, (s1, s2)  # 4x the queries, same k per query: 4x the work
    assert d2 / d1 > 12, (d1, d2)  # the dense path grows quadratically
    assert s2 < d2 / 10


def _indexer_inputs(seed, b, s, n, d, t, ties=False):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, s, n, d)).astype(np.float32)
    k = rng.standard_normal((b, t, d)).astype(np.float32)
    if ties:  # few distinct values: many equal scores, so tie-breaking matters
        q, k = np.round(q), np.round(k)
    w = rng.standard_normal((b, s, n)).astype(np.float32)
    ks = rng.uniform(0.5, 1.5, (b, t)).astype(np.float32)
    return map(jnp.asarray, (q, w, k, ks))


@pytest.mark.parametrize("t,tile,topk,ties", [(40, 8, 6, False), (37, 8, 6, False),
                                              (37, 16, 50, False), (64, 64, 16, False),
                                              (48, 8, 12, True)])
def test_tiled_topk_equals_global_topk(t, tile, topk, ties):
    """Top-k per key tile merged into a running top-k == one top-k over all keys: same slots in
    the same order (ties to the lower slot), -1 where no visible key is left; the collected raw
    scores are the untiled ones."""
    b, s, n, d = 2, 9, 3, 16
    q, w, k, ks = _indexer_inputs(0, b, s, n, d, t, ties)
    q_pos = jnp.asarray(np.random.default_rng(1).integers(0, t, (b, s)), jnp.int32)
    keys = lambda i, m: (jax.lax.dynamic_slice_in_dim(k, i, m, 1),  # noqa: E731
                         jax.lax.dynamic_slice_in_dim(ks, i, m, 1))
    idx, scores = jax.jit(lambda q, w, p: index_topk(q, w, p, keys, t, topk, tile, True))(q, w, q_pos)
    full = index_scores(q, w, k, ks)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(full), rtol=1e-6, atol=1e-6)
    visible = jnp.arange(t)[None, None] <= q_pos[..., None]
    vals, want = jax.lax.top_k(jnp.where(visible, full, -jnp.inf), min(topk, t))
    want = np.where(np.isfinite(np.asarray(vals)), np.asarray(want), -1)
    np.testing.assert_array_equal(np.asarray(idx), want)


def test_key_tile_size_is_bounded():
    assert key_tile_size(1, 1, 64, 131072) == 16384  # decode: capped, 8 tiles at 128K
    assert key_tile_size(1, 512, 64, 131072) == 512  # a prefill chunk: 64 MiB of dots per tile
    assert key_tile_size(1, 512, 64, 100) == 100
    assert key_tile_size(64, 4096, 64, 10) == 1


def test_query_chunking_is_invisible():
    rng = np.random.default_rng(2)
    b, s, h, c, r, t, k = 2, 40, 3, 32, 8, 50, 12
    q_c, q_pe = (jnp.asarray(rng.standard_normal(x), jnp.float32) for x in ((b, s, h, c), (b, s, h, r)))
    kc, kpe = (jnp.asarray(rng.standard_normal(x), jnp.float32) for x in ((b, t, c), (b, t, r)))
    idx = jnp.asarray(rng.integers(-1, t, (b, s, k)), jnp.int32)
    attend = lambda *a: sparse_mla(*a, _rows(kc, kpe), 0.2, jnp.float32)  # noqa: E731
    whole = attend(q_c, q_pe, idx)
    chunked = over_query_chunks(attend, 7, (q_c, q_pe, idx))  # 6 chunks, the last one padded
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-5, rtol=1e-5)


def test_invalid_picks_contribute_nothing():
    rng = np.random.default_rng(3)
    b, s, h, c, r, t = 1, 4, 2, 16, 8, 10
    q_c, q_pe = (jnp.asarray(rng.standard_normal(x), jnp.float32) for x in ((b, s, h, c), (b, s, h, r)))
    kc, kpe = (jnp.asarray(rng.standard_normal(x), jnp.float32) for x in ((b, t, c), (b, t, r)))
    idx = jnp.asarray([[[3, 5, -1, -1]] * s], jnp.int32)
    got = sparse_mla(q_c, q_pe, idx, _rows(kc, kpe), 0.3, jnp.float32)
    want = sparse_mla(q_c, q_pe, idx[..., :2], _rows(kc, kpe), 0.3, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_f32_matmul_widens_in_chunks_exactly():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((5000, 64)), jnp.bfloat16)  # 3 chunks, the last shifted
    h = jnp.asarray(rng.standard_normal((3, 2, 64)), jnp.float32)
    want = np.einsum("bsd,vd->bsv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(np.asarray(f32_matmul(h, w)), want, rtol=1e-5, atol=1e-4)


def test_index_scores_match_the_formula():
    """The indexer's scores (lowered for the CPU: key-major dots over e4m3 keys widened by bits)
    are k_s[t] * sum_h w[h] * relu(q[h] . k[t]), computed here in float64."""
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 128)) * 8, jnp.float8_e4m3fn)
    k = jnp.asarray(rng.standard_normal((2, 40, 128)) * 8, jnp.float8_e4m3fn)
    w, k_s = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 3, 4), (2, 40)))
    q64, k64, w64, s64 = (np.asarray(a, np.float64) for a in (q, k, w, k_s))
    want = np.einsum("bsht,bsh->bst", np.maximum(np.einsum("bshd,btd->bsht", q64, k64), 0),
                     w64) * s64[:, None, :]
    np.testing.assert_allclose(np.asarray(jax.jit(index_scores)(q, w, k, k_s)), want,
                               rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
@pytest.mark.parametrize("fp8_act", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_expert_windows_equal_every_expert_on_every_token(weights, fp8_act, tokens):
    """The routed-only expert loop == computing all experts on all tokens, picking and summing
    with the routing weights."""
    cfg = dataclasses.replace(preset("tiny"), dtype="float32", fp8_activations=fp8_act,
                              weight_dtype=weights, scale_fmt="ue8m0" if weights == "fp8" else None)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((tokens, cfg.dim)), jnp.float32)
    experts = jnp.asarray(np.stack([rng.choice(cfg.n_routed_experts, cfg.n_activated_experts,
                                               replace=False) for _ in range(tokens)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, experts.shape), jnp.float32)
    mod = Experts(cfg)
    layer = cfg.n_moe_layers - 1  # read from the stack of all MoE layers' experts
    params = mod.init(rngs(0), x, experts, weights, layer)
    got = jax.jit(mod.apply)(params, x, experts, weights, layer)

    def all_experts(m, x):
        from dsv32_jax.model.moe import expert_linear
        outs = []
        for e in range(cfg.n_routed_experts):
            lin = lambda n, v: expert_linear(  # noqa: E731
                cfg, m.w[n], m.s[n] if m.s else None, v, (layer, e))
            h = jax.nn.silu(lin("w1", x)) * lin("w3", x)
            outs.append(lin("w2", h))
        return jnp.stack(outs, 1)  # (N, E, D)

    every = mod.apply(params, x, method=all_experts)
    want = jnp.einsum("nkd,nk->nd", jnp.take_along_axis(every, experts[..., None], 1), weights,
                      precision="highest")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_expert_window_sizes():
    assert expert_window(1, 8, 256) == 1  # decode: one row per routed expert
    assert expert_window(512, 4096, 256) == 16  # prefill: about the rows per expert
    assert expert_window(512, 4096, 8) == 64  # capped
    assert expert_window(3, 6, 8) == 1


def test_layers_are_scanned_not_unrolled():
    def n_eqns(n_layers):
        cfg = dataclasses.replace(preset("tiny"), n_layers=n_layers)
        module = Transformer(cfg)
        tokens = jnp.zeros((1, 8), jnp.int32)
        params = jax.eval_shape(module.init, rngs(0), tokens)  # params + the experts stream
        jaxpr = jax.make_jaxpr(module.apply)(params, tokens)
        return len(jaxpr.jaxpr.eqns), str(jaxpr).count("\n")

    (eq3, lines3), (eq12, lines12) = n_eqns(3), n_eqns(12)
    assert eq3 == eq12, (eq3, eq12)  # unrolled layers would add equations per layer
    assert abs(lines12 - lines3) <= lines3 // 100, (lines3, lines12)  # (literal widths may differ)


def _tiny(**kw):
    return dataclasses.replace(preset("tiny"), dtype="float32", n_layers=1, **kw)  # one dense layer


def _jit(monkeypatch, skip, fn):
    """fn jitted afresh (jit caches by function) with the short-context skip on or off; it is
    traced at its first calls, so the switch stays set until the caller is done."""
    monkeypatch.setattr(attention, "SKIP_SHORT", skip)
    return jax.jit(lambda *a: fn(*a))


def test_short_context_skips_the_indexer(monkeypatch):
    """T <= index_topk: the indexer's top-k is every visible key, so the skip (no scores, no
    top-k in the compiled program) gives the indexer path's logits."""
    cfg = _tiny(index_topk=16)
    module = Transformer(cfg)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    params = module.init(rngs(0), tokens)
    fwd = lambda p, t: module.apply(p, t)[0]  # noqa: E731  a fresh cache of T = 12 slots

    def compiled(skip):
        exe = _jit(monkeypatch, skip, fwd).lower(params, tokens).compile()
        ops = [ln for ln in exe.as_text().splitlines()  # top-k / sort ops of the attention
               if ("TopK" in ln or " sort(" in ln) and "/attn/" in ln]
        return exe(params, tokens), ops

    (got, skipped), (want, picked) = compiled(True), compiled(False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6,
                               atol=1e-6 * float(jnp.abs(want).max()))
    assert picked, "the indexer path should hold a top-k"
    assert not skipped, skipped


def test_dynamic_skip_across_index_topk(monkeypatch):
    """T > index_topk: a prefill below index_topk, then decode steps crossing it, give the same
    logits with the skip (lax.cond on the largest position) as with the indexer throughout."""
    cfg = _tiny(index_topk=8)
    module = Transformer(cfg)
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    params = module.init(rngs(0), tokens[:, :5])
    fwd = lambda p, t, pos, c: module.apply(p, t, pos, c)  # noqa: E731
    args = params, tokens[:, :1], jnp.zeros((2, 1), jnp.int32), init_cache(cfg, 2, 24)
    def skip_conds(skip):  # conds but those of `platform_dependent` (each with its platform_index)
        text = str(_jit(monkeypatch, skip, fwd).trace(*args).jaxpr)
        return text.count(" cond[") - text.count("platform_index[")

    conds = {skip: skip_conds(skip) > 0 for skip in (True, False)}
    assert conds == {True: True, False: False}, conds  # the skip is decided at run time

    def logits(skip):
        step = _jit(monkeypatch, skip, fwd)  # traced twice: the prefill and one decode step
        cache = init_cache(cfg, 2, 24)  # T = 24 > index_topk
        pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
        lg, cache = step(params, tokens[:, :5], pos, cache)
        out = [lg]  # (B,5,V)
        for j in range(5, 12):  # positions 5..11: across index_topk = 8
            lg, cache = step(params, tokens[:, j:j + 1], jnp.full((2, 1), j, jnp.int32), cache)
            out.append(lg)  # (B,1,V)
        return np.concatenate([np.asarray(o) for o in out], 1)

    got, want = logits(True), logits(False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
