"""The Pallas indexer-logits kernel (interpreted on CPU) against its jnp reference, and its
lowering for an H100."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import IndexerBlocks, index_logits, index_logits_reference
from pallas_kernels.common import lower_for_gpu
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


@pytest.mark.parametrize("b,s,t,blocks", [(8, 1, 131072, DECODE), (1, 512, 4096, PREFILL)])
def test_index_logits_lowers_for_h100(b, s, t, blocks):
    """The Triton lowering at the released indexer shapes (64 heads x 128, FP8), layer-stacked."""
    sd = jax.ShapeDtypeStruct
    text = lower_for_gpu(lambda q, w, k, ks, pos, l: index_logits(
        q, w, k, ks, pos, l, blocks=blocks, interpret=False),
        sd((b, s, 64, 128), E4M3), sd((b, s, 64), jnp.float32), sd((2, b, t, 128), jnp.uint8),
        sd((2, b, t), jnp.float32), sd((b, s), jnp.int32), sd((), jnp.int32))
    assert "index_logits" in text and "triton" in text.lower()
