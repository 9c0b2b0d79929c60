"""The Pallas indexer-logits kernel (interpreted on CPU) against its jnp reference, and its
lowering for an H100."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import page_table
from pallas_kernels import IndexerBlocks, index_logits, index_logits_reference
from pallas_kernels.common import PAGE, lower_for_gpu
from pallas_kernels.indexer import DECODE, PREFILL

E4M3 = jnp.float8_e4m3fn


def _inputs(seed, b, s, n, d, t, dtype):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32).astype(dtype)
    k = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((b, s, n)), jnp.float32)
    ks = jnp.asarray(rng.uniform(0.1, 2.0, (b, t)), jnp.float32)
    # ragged: each sequence's queries end at a different length
    end = rng.integers(s - 1, t, b)
    pos = jnp.asarray(end[:, None] - (s - 1) + np.arange(s)[None, :], jnp.int32)
    return q, w, k, ks, pos


@pytest.mark.parametrize("b,s,n,d,t,blocks,dtype,causal", [
    (2, 1, 4, 32, 40, IndexerBlocks(1, 16), E4M3, True),  # decode, T not a multiple of block_t
    (3, 2, 8, 16, 37, IndexerBlocks(2, 8), jnp.float32, True),  # two queries, odd T
    (2, 7, 4, 32, 50, IndexerBlocks(4, 16), E4M3, True),  # S not a multiple of block_q
    (1, 5, 4, 32, 24, IndexerBlocks(2, 64), jnp.float32, False),  # block_t > T: clipped
    (2, 3, 2, 64, 9, DECODE, jnp.bfloat16, False),
])
def test_index_logits_matches_reference(b, s, n, d, t, blocks, dtype, causal):
    q, w, k, ks, pos = _inputs(0, b, s, n, d, t, dtype)
    got = index_logits(q, w, k, ks, pos, causal=causal, blocks=blocks)
    want = index_logits_reference(q, w, k, ks, pos if causal else None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-6)
    if causal:
        future = np.arange(t)[None, None, :] > np.asarray(pos)[..., None]
        assert np.all(np.asarray(got)[future] == -np.inf) and np.all(np.isfinite(got[~future]))


def test_index_logits_reads_the_layer_stacked_cache_as_bits():
    """Layer-stacked keys stored as e4m3 bit patterns (the KVCache layout), read in place."""
    q, w, k, ks, pos = _inputs(1, 2, 2, 4, 32, 33, E4M3)
    other = jnp.zeros_like(k)
    stack = jax.lax.bitcast_convert_type(jnp.stack([other, k, other]), jnp.uint8)  # (L,B,T,d)
    ks_stack = jnp.stack([ks * 0, ks, ks * 0])
    got = jax.jit(lambda l: index_logits(q, w, stack, ks_stack, pos, l))(jnp.int32(1))
    np.testing.assert_allclose(got, index_logits_reference(q, w, k, ks, pos), rtol=2e-6,
                               atol=2e-6)


@pytest.mark.parametrize("b,s,p,n_pages,blocks,dtype,stacked,causal", [
    (2, 1, 3, 8, IndexerBlocks(1, 16), E4M3, True, True),  # decode, 4 tiles a page, stacked bits
    (3, 3, 3, 11, IndexerBlocks(2, 128), jnp.float32, False, True),  # tiles spanning two pages
    (2, 2, 2, 6, IndexerBlocks(2, 64), E4M3, False, False),  # raw scores: one tile a page
])
def test_index_logits_over_a_paged_pool(b, s, p, n_pages, blocks, dtype, stacked, causal):
    """Keys in a pool read through a page table (shuffled pages, a table shorter than the pool,
    ragged sequences whose unowned entries point at the scratch page, which holds NaN): the
    reference on the pool gathered through the table; causal scores never see the scratch page."""
    rng = np.random.default_rng(b + s + p)
    owned = [p] + rng.integers(1, p + 1, b - 1).tolist()
    table = page_table(rng, owned, p, n_pages)
    q, w, k, ks, _ = _inputs(4, b, s, 4, 32, n_pages * PAGE, dtype)
    k, ks = k[0].at[:PAGE].set(jnp.nan), ks[0].at[:PAGE].set(jnp.nan)  # the pool (N,d), (N,)
    end = np.array([rng.integers(s - 1, n * PAGE) for n in owned])
    pos = jnp.asarray(end[:, None] - (s - 1) + np.arange(s)[None, :], jnp.int32)
    if stacked:  # the engine's layout: (L,N,d) bit patterns, layer 1
        kk = jax.lax.bitcast_convert_type(jnp.stack([jnp.zeros_like(k), k]), jnp.uint8)
        got = index_logits(q, w, kk, jnp.stack([ks * 0, ks]), pos, 1, jnp.asarray(table),
                           causal=causal, blocks=blocks)
    else:
        got = index_logits(q, w, k, ks, pos, None, jnp.asarray(table), causal=causal,
                           blocks=blocks)
    want = index_logits_reference(q, w, k, ks, pos if causal else None, jnp.asarray(table))
    assert got.shape == (b, s, p * PAGE)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-6)
    if causal:
        future = np.arange(p * PAGE)[None, None, :] > np.asarray(pos)[..., None]
        assert np.all(np.isfinite(got[~future])) and np.all(np.asarray(got)[future] == -np.inf)


def test_index_logits_argument_errors():
    q, w, k, ks, pos = _inputs(2, 1, 2, 4, 32, 16, E4M3)
    with pytest.raises(ValueError, match="w must have shape"):
        index_logits(q, w[..., :2], k, ks, pos)
    with pytest.raises(ValueError, match="holds float32 values but q is float8_e4m3fn"):
        index_logits(q, w, k.astype(jnp.float32), ks, pos)
    with pytest.raises(ValueError, match="pos must have dtype"):
        index_logits(q, w, k, ks, pos.astype(jnp.float32))
    with pytest.raises(ValueError, match="power of two"):
        index_logits(q[:, :, :3], w[:, :, :3], k, ks, pos)
    with pytest.raises(ValueError, match="pass layer="):
        index_logits(q, w, k[None], ks[None], pos)
    pool, pks = jnp.zeros((3 * PAGE, 32), E4M3), jnp.zeros(3 * PAGE)
    table = jnp.ones((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="pages must have dtype"):
        index_logits(q, w, pool, pks, pos, None, table.astype(jnp.float32))
    with pytest.raises(ValueError, match="pages must have shape"):
        index_logits(q, w, pool, pks, pos, None, table[:, :, None])
    with pytest.raises(ValueError, match="whole pages of 64 rows"):
        index_logits(q, w, pool[:100], pks[:100], pos, None, table)
    with pytest.raises(ValueError, match=r"k \(a paged pool\) must be \(N,d\)"):
        index_logits(q, w, pool[:, :16], pks, pos, None, table)
    with pytest.raises(ValueError, match="k_s must have shape"):
        index_logits(q, w, pool, pks[:PAGE], pos, None, table)


@pytest.mark.parametrize("b,s,t,blocks,paged", [(8, 1, 131072, DECODE, False),
                                                (1, 512, 4096, PREFILL, False),
                                                (8, 1, 131072, DECODE, True)])
def test_index_logits_lowers_for_h100(b, s, t, blocks, paged):
    """The Triton lowering at the released indexer shapes (64 heads x 128, FP8), layer-stacked;
    or the serving engine's layer-stacked pool (rows of 9 x 128K slots) and page table."""
    sd = jax.ShapeDtypeStruct
    rows, table = ((9 * t,), (sd((b, t // PAGE), jnp.int32),)) if paged else ((b, t), ())
    text = lower_for_gpu(lambda q, w, k, ks, pos, l, *pages: index_logits(
        q, w, k, ks, pos, l, *pages, blocks=blocks, interpret=False),
        sd((b, s, 64, 128), E4M3), sd((b, s, 64), jnp.float32), sd((2, *rows, 128), jnp.uint8),
        sd((2, *rows), jnp.float32), sd((b, s), jnp.int32), sd((), jnp.int32), *table)
    assert "index_logits" in text and "triton" in text.lower()
