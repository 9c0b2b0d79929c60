"""The Pallas radix-select top-k (interpreted on CPU): the same sets as one global lax.top_k
(ties to the lower slot), -1 where no visible key is left; and its lowering for an H100."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import TopkBlocks, topk, topk_reference
from pallas_kernels.common import lower_for_gpu


def _as_sets(a):
    return [sorted(r.tolist()) for r in np.asarray(a).reshape(-1, a.shape[-1])]


@pytest.mark.parametrize("r,t,k,block,ties", [
    (6, 40, 8, 16, True),  # many ties: only the lowest tied slots may be picked
    (5, 37, 4, 8, False),  # T not a multiple of the tile
    (4, 24, 50, 8, False),  # k > T: min(k, T) columns, -1 past the visible keys
    (3, 64, 64, 32, True),  # k == T
    (2, 300, 16, 64, False),  # several tiles, a tile shift at the end
])
def test_topk_matches_one_global_top_k(r, t, k, block, ties):
    rng = np.random.default_rng(r * t)
    s = rng.integers(-3, 3, (r, t)) if ties else rng.standard_normal((r, t))
    s = jnp.asarray(s, jnp.float32)
    pos = jnp.asarray(rng.integers(0, t, r), jnp.int32).at[0].set(t - 1)
    got = topk(s, pos, k=k, blocks=TopkBlocks(block))
    assert got.shape == (r, min(k, t)) and got.dtype == jnp.int32
    assert _as_sets(got) == _as_sets(topk_reference(s, pos, min(k, t)))
    # the kernel's order: picks by slot, then -1s
    for row in np.asarray(got):
        picks = row[row >= 0]
        assert np.all(np.diff(picks) > 0) and np.all(row[len(picks):] == -1)


def test_topk_invisible_and_minus_inf_are_never_picked():
    s = jnp.asarray([[1.0, -jnp.inf, 3.0, 2.0, 9.0, 9.0],
                     [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                     [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]], jnp.float32)
    pos = jnp.asarray([3, -1, 5], jnp.int32)  # row 1 sees nothing
    got = np.asarray(topk(s, pos, k=4, blocks=TopkBlocks(4)))
    np.testing.assert_array_equal(got, [[0, 2, 3, -1], [-1, -1, -1, -1], [0, 1, 2, 3]])


def test_topk_keeps_leading_axes_and_checks_arguments():
    s = jnp.zeros((2, 3, 16), jnp.float32)
    pos = jnp.full((2, 3), 15, jnp.int32)
    np.testing.assert_array_equal(topk(s, pos, k=2, blocks=TopkBlocks(8)),
                                  np.tile([0, 1], (2, 3, 1)))
    with pytest.raises(ValueError, match="pos must have shape"):
        topk(s, pos[:, :2], k=2)
    with pytest.raises(ValueError, match="scores must have dtype"):
        topk(s.astype(jnp.bfloat16), pos, k=2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk(s, pos, k=0)


def test_topk_lowers_for_h100():
    """64 rows x 128K keys, k = 2048: the released decode shape."""
    sd = jax.ShapeDtypeStruct
    text = lower_for_gpu(lambda s, p: topk(s, p, k=2048, interpret=False),
                         sd((64, 131072), jnp.float32), sd((64,), jnp.int32))
    assert "radix_topk" in text
