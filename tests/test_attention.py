"""Sparse attention structure: O(S*k) cost, query chunking, layers compiled once."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.model.attention import MLA, dense_mla, select_topk, sparse_mla
from dsv32_jax.model.config import preset
from dsv32_jax.model.transformer import Transformer
from dsv32_jax.model.rope import rope_tables


def _flops(fn, *shapes) -> float:
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_sparse_attention_cost_is_linear_in_length():
    b, h, c, r, k, dn = 1, 4, 128, 64, 64, 64
    f32, i32 = jnp.float32, jnp.int32

    def sparse(s):
        return _flops(lambda *a: sparse_mla(*a, 0.1, f32), ((b, s, h, c), f32), ((b, s, h, r), f32),
                      ((b, s, c), f32), ((b, s, r), f32), ((b, s, k), i32), ((b, s, k), jnp.bool_))

    def dense(s):
        return _flops(lambda *a: dense_mla(*a, 0.1, f32), ((b, s, h, dn), f32), ((b, s, h, r), f32),
                      ((b, s, h, dn), f32), ((b, s, r), f32), ((b, s, h, dn), f32),
                      ((b, s, s), jnp.bool_))

    s1, s2 = sparse(512), sparse(2048)
    d1, d2 = dense(512), dense(2048)
    assert 3.5 < s2 / s1 < 4.5, (s1, s2)  # 4x the queries, same k per query: 4x the work
    assert d2 / d1 > 12, (d1, d2)  # the dense path grows quadratically
    assert s2 < d2 / 10


def test_select_topk_causal_and_validity():
    scores = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 6)), jnp.float32)
    pos = jnp.arange(6)[None]
    idx, valid = select_topk(scores, pos, 3)
    idx, valid = np.asarray(idx), np.asarray(valid)
    for s in range(6):
        chosen = set(idx[0, s][valid[0, s]])
        visible = np.asarray(scores)[0, s, : s + 1]
        assert chosen == set(np.argsort(-visible)[:3]) if s >= 2 else chosen == set(range(s + 1))
        assert all(t <= s for t in chosen)


def test_query_chunking_is_invisible():
    cfg = dataclasses.replace(preset("tiny"), dtype="float32", fp8_activations=False)
    b, s = 2, 40
    x = jax.random.normal(jax.random.key(1), (b, s, cfg.dim))
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin = rope_tables(cfg, pos)
    params = MLA(cfg).init(jax.random.key(0), x, pos, cos, sin)
    whole, _ = MLA(cfg, q_chunk=1024).apply(params, x, pos, cos, sin)
    chunked, _ = MLA(cfg, q_chunk=7).apply(params, x, pos, cos, sin)  # 6 chunks, last one padded
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-5, rtol=1e-5)


def test_layers_are_scanned_not_unrolled():
    def n_eqns(n_layers):
        cfg = dataclasses.replace(preset("tiny"), n_layers=n_layers)
        module = Transformer(cfg)
        tokens = jnp.zeros((1, 8), jnp.int32)
        params = jax.eval_shape(module.init, jax.random.key(0), tokens)
        jaxpr = jax.make_jaxpr(module.apply)(params, tokens)
        return len(jaxpr.jaxpr.eqns), str(jaxpr).count("\n")

    small, big = n_eqns(3), n_eqns(12)
    assert small == big, (small, big)
