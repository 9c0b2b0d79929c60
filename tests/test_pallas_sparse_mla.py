"""The Pallas sparse-MLA kernel (interpreted on CPU) against its jnp reference: FP8 latent rows,
invalid slots, split-k combine; and its lowering for an H100."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import page_table
from pallas_kernels import SparseMLABlocks, sparse_mla, sparse_mla_reference
from pallas_kernels.common import PAGE, lower_for_gpu
from pallas_kernels.sparse_mla import DECODE, PREFILL

E4M3 = jnp.float8_e4m3fn


def _inputs(seed, b, s, h, c, r, t, k, dtype, c_dtype):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q_c, q_pe = f(b, s, h, c).astype(dtype), f(b, s, h, r).astype(dtype)
    lat = f(b, t, c).astype(c_dtype)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, (b, t, c // 128)) if c_dtype == E4M3
                        else np.ones((b, t, c // 128)), jnp.float32)
    pe = f(b, t, r).astype(dtype)
    idx = jnp.asarray(rng.integers(-1, t + 3, (b, s, k)), jnp.int32)  # -1 and past T: invalid
    length = jnp.asarray(rng.integers(t // 2, t + 1, b), jnp.int32)  # ragged lengths
    return q_c, q_pe, idx, lat, scale, pe, length


@pytest.mark.parametrize("b,s,h,c,r,t,k,blocks,dtype,c_dtype", [
    (2, 1, 8, 256, 16, 40, 20, SparseMLABlocks(4, 8, 1), jnp.float32, E4M3),  # k % block_k != 0
    (2, 1, 8, 128, 16, 40, 37, SparseMLABlocks(8, 8, 3), jnp.float32, E4M3),  # split-k, ragged
    (1, 3, 4, 128, 8, 17, 32, SparseMLABlocks(4, 16, 2), jnp.float32, jnp.float32),  # k > T
    (2, 2, 16, 256, 32, 64, 16, DECODE, jnp.bfloat16, E4M3),
])
def test_sparse_mla_matches_reference(b, s, h, c, r, t, k, blocks, dtype, c_dtype):
    q_c, q_pe, idx, lat, scale, pe, length = _inputs(0, b, s, h, c, r, t, k, dtype, c_dtype)
    got = sparse_mla(q_c, q_pe, idx, lat, scale, pe, length, scale=0.1, blocks=blocks)
    want = sparse_mla_reference(q_c, q_pe, idx, lat, scale, pe, 0.1, length)
    assert got.shape == (b, s, h, c) and got.dtype == dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-6
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


def test_invalid_slots_contribute_nothing():
    """Replacing every invalid slot by any other invalid one (or garbage rows behind it) changes
    nothing; a query with no valid slot gets 0."""
    q_c, q_pe, idx, lat, scale, pe, length = _inputs(1, 2, 2, 4, 128, 8, 24, 12, jnp.float32,
                                                     E4M3)
    blocks = SparseMLABlocks(4, 4, 2)
    base = sparse_mla(q_c, q_pe, idx, lat, scale, pe, length, scale=0.2, blocks=blocks)
    invalid = (idx < 0) | (idx >= length[:, None, None])
    assert invalid.any()
    moved = jnp.where(invalid, -7, idx)
    np.testing.assert_array_equal(base, sparse_mla(q_c, q_pe, moved, lat, scale, pe, length,
                                                   scale=0.2, blocks=blocks))
    none = idx.at[1, 0].set(-1)
    out = sparse_mla(q_c, q_pe, none, lat, scale, pe, length, scale=0.2, blocks=blocks)
    assert np.all(np.asarray(out[1, 0]) == 0) and np.all(np.isfinite(out))


def test_sparse_mla_reads_the_layer_stacked_cache_as_bits():
    q_c, q_pe, idx, lat, scale, pe, length = _inputs(2, 1, 2, 4, 128, 64, 16, 8, jnp.bfloat16,
                                                     E4M3)
    bits = lambda x, u: jax.lax.bitcast_convert_type(  # noqa: E731
        jnp.stack([jnp.zeros_like(x), x]), u)
    got = jax.jit(lambda l: sparse_mla(q_c, q_pe, idx, bits(lat, jnp.uint8),
                                       jnp.stack([scale, scale]), bits(pe, jnp.uint16), length,
                                       l, scale=0.1))(jnp.int32(1))
    want = sparse_mla(q_c, q_pe, idx, lat, scale, pe, length, scale=0.1)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("b,s,h,c,r,p,n_pages,k,blocks,dtype,c_dtype,ragged", [
    (2, 1, 8, 128, 16, 3, 8, 37, SparseMLABlocks(8, 8, 3), jnp.float32, E4M3, True),  # split-k
    (3, 2, 4, 256, 8, 2, 9, 20, SparseMLABlocks(4, 16, 1, 2), jnp.float32, jnp.float32, True),
    (2, 2, 16, 256, 32, 2, 7, 16, DECODE, jnp.bfloat16, E4M3, False),  # length=None: T
])
def test_sparse_mla_over_a_paged_pool(b, s, h, c, r, p, n_pages, k, blocks, dtype, c_dtype, ragged):
    """The latent rows in a pool read through a page table (shuffled pages, a table shorter than
    the pool, the engine's layer-stacked bits), logical slots invalid when < 0, >= length or
    >= P x PAGE; the scratch page (where unowned entries point) holds NaN and is never read."""
    rng = np.random.default_rng(b + k)
    t, rows = p * PAGE, n_pages * PAGE
    owned = ([p] + rng.integers(1, p + 1, b - 1).tolist()) if ragged else [p] * b
    table = jnp.asarray(page_table(rng, owned, p, n_pages))
    q_c, q_pe, _, lat, scale, pe, _ = _inputs(5, 1, s, h, c, r, rows, k, dtype, c_dtype)
    q_c, q_pe = (jnp.tile(x, (b, 1, 1, 1)) for x in (q_c, q_pe))
    lat, scale, pe = (x[0].at[:PAGE].set(jnp.nan) for x in (lat, scale, pe))  # pool (N, ...)
    idx = jnp.asarray(rng.integers(-1, t + 3, (b, s, k)), jnp.int32)
    length = (jnp.asarray([rng.integers(n * PAGE // 2, n * PAGE + 1) for n in owned], jnp.int32)
              if ragged else None)
    bits = lambda x, u: jax.lax.bitcast_convert_type(  # noqa: E731  (L,N,...) bits, layer 1
        jnp.stack([jnp.zeros_like(x), x]), u)
    stacked = (bits(lat, jnp.uint8) if c_dtype == E4M3 else jnp.stack([lat * 0, lat]),
               jnp.stack([scale, scale]),
               bits(pe, jnp.uint16) if dtype == jnp.bfloat16 else jnp.stack([pe * 0, pe]))
    got = sparse_mla(q_c, q_pe, idx, *stacked, length, 1, table, scale=0.1, blocks=blocks)
    want = sparse_mla_reference(q_c, q_pe, idx, lat, scale, pe, 0.1, length, table)
    assert got.shape == (b, s, h, c) and np.all(np.isfinite(np.asarray(got, np.float32)))
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-6
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


def test_sparse_mla_argument_errors():
    q_c, q_pe, idx, lat, scale, pe, length = _inputs(3, 1, 1, 4, 128, 8, 16, 8, jnp.float32, E4M3)
    with pytest.raises(ValueError, match="idx must have dtype"):
        sparse_mla(q_c, q_pe, idx.astype(jnp.float32), lat, scale, pe, scale=0.1)
    with pytest.raises(ValueError, match="multiple of 128"):
        sparse_mla(q_c[..., :96], q_pe, idx, lat[..., :96], scale, pe, scale=0.1)
    with pytest.raises(ValueError, match="c_scale must have shape"):
        sparse_mla(q_c, q_pe, idx, lat, scale[:, :8], pe, scale=0.1)
    with pytest.raises(ValueError, match="k_pe must hold float32"):
        sparse_mla(q_c, q_pe, idx, lat, scale, pe.astype(jnp.bfloat16), scale=0.1)
    with pytest.raises(ValueError, match="heads H=3 must be a multiple"):
        sparse_mla(q_c[:, :, :3], q_pe[:, :, :3], idx, lat, scale, pe, scale=0.1)
    table = jnp.ones((1, 2), jnp.int32)
    pool = (jnp.zeros((3 * PAGE, 128), E4M3), jnp.ones((3 * PAGE, 1)), jnp.zeros((3 * PAGE, 8)))
    with pytest.raises(ValueError, match="pages must have shape"):
        sparse_mla(q_c, q_pe, idx, *pool, None, None, table[:, 0], scale=0.1)
    with pytest.raises(ValueError, match="whole pages of 64 rows"):
        sparse_mla(q_c, q_pe, idx, *(x[:65] for x in pool), None, None, table, scale=0.1)
    with pytest.raises(ValueError, match=r"c \(a paged pool\) is layer-stacked"):
        sparse_mla(q_c, q_pe, idx, lat, scale, pe, None, None, table, scale=0.1)
    with pytest.raises(ValueError, match="k_pe must have shape"):
        sparse_mla(q_c, q_pe, idx, *pool[:2], pool[2][:PAGE], None, None, table, scale=0.1)


@pytest.mark.parametrize("b,s,blocks,paged", [(8, 1, DECODE, False), (1, 256, PREFILL, False),
                                              (8, 1, DECODE, True)])
def test_sparse_mla_lowers_for_h100(b, s, blocks, paged):
    """128 heads, kv_lora 512 e4m3 + 4 scales + 64 bf16 rope, top-k 2048, layer-stacked bits; or
    the serving engine's layer-stacked pool (rows of 9 x 8K slots) and page table."""
    sd, bf, t = jax.ShapeDtypeStruct, jnp.bfloat16, 8192
    rows, table = ((9 * t,), (sd((b, t // PAGE), jnp.int32),)) if paged else ((b, t), ())
    text = lower_for_gpu(lambda *a: sparse_mla(*a, scale=0.1, blocks=blocks, interpret=False),
                         sd((b, s, 128, 512), bf), sd((b, s, 128, 64), bf),
                         sd((b, s, 2048), jnp.int32), sd((3, *rows, 512), jnp.uint8),
                         sd((3, *rows, 4), jnp.float32), sd((3, *rows, 64), jnp.uint16),
                         sd((b,), jnp.int32), sd((), jnp.int32), *table)
    assert "sparse_mla" in text
