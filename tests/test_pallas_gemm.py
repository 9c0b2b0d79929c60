"""The FP8 block-scaled linear and the grouped routed-expert kernels (interpreted on CPU) against
their jnp references and `quant.blockwise_matmul`, the model's routed rows and logits with
matmul_impl="pallas" against "xla", and both kernels' lowering for an H100 at released shapes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax.model.config import ConfigError, preset
from dsv32_jax.model.moe import routed_rows
from dsv32_jax.model.quant import act_quant, blockwise_matmul, weight_quant
from pallas_kernels.common import lower_for_gpu
from pallas_kernels.fp8_linear import DECODE, PREFILL, GemmBlocks, fp8_linear, fp8_linear_reference
from pallas_kernels.grouped_fp8 import grouped_fp8_matmul, grouped_fp8_reference

E4M3 = jnp.float8_e4m3fn
TOL = dict(rtol=0, atol=2e-6)  # relative to the output's std (f32 summation order)


def _weight(rng, n, k):
    q, s = weight_quant((rng.standard_normal((n, k)) * rng.uniform(0.1, 3.0)).astype(np.float32))
    return jnp.asarray(q), jnp.asarray(s)


def _acts(rng, m, k, fmt="ue8m0"):
    return act_quant(jnp.asarray(rng.standard_normal((m, k)) * 2.0, jnp.float32), fmt)


def _close(got, want):
    scale = float(jnp.std(want)) or 1.0
    np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, **TOL)


@pytest.mark.parametrize("m,n,k,blocks,fmt", [
    (1, 200, 256, None, "ue8m0"),  # decode: M padded to 16; N not a multiple of the tile nor 128
    (37, 300, 384, GemmBlocks(16, 64), None),  # odd M (shifted last tile), unrounded scales
    (64, 128, 128, PREFILL, "ue8m0"),  # one K block; block_m clipped to M
    (20, 576, 256, DECODE, "ue8m0"),  # 576 = the kv_a width: 9 tiles of 64
    # the released K (dim 7168, the o-projection's 16384): 56 / 128 promoted FP8 blocks summed,
    # decode (weight rows on the MMA's M side) and a 64-row tile (the wgmma path as written)
    (1, 128, 7168, DECODE, "ue8m0"),
    (64, 128, 16384, GemmBlocks(64, 64), "ue8m0"),
])
def test_fp8_linear_matches_blockwise_matmul(m, n, k, blocks, fmt):
    rng = np.random.default_rng(m + n)
    (xq, xs), (wq, ws) = _acts(rng, m, k, fmt), _weight(rng, n, k)
    got = fp8_linear(xq, xs, wq, ws, blocks=blocks)
    want = blockwise_matmul(xq, xs, wq, ws)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    _close(got, want)
    _close(fp8_linear_reference(xq, xs, wq, ws), want)


def test_fp8_linear_argument_errors():
    rng = np.random.default_rng(0)
    (xq, xs), (wq, ws) = _acts(rng, 4, 256), _weight(rng, 128, 256)
    with pytest.raises(ValueError, match="x_q must be float8_e4m3fn"):
        fp8_linear(xq.astype(jnp.float32), xs, wq, ws)
    with pytest.raises(ValueError, match="x_s must have shape"):
        fp8_linear(xq, xs[:, :1], wq, ws)
    with pytest.raises(ValueError, match="w_s must have shape"):
        fp8_linear(xq, xs, wq, ws[:, :1])
    with pytest.raises(ValueError, match="w_q must be float8_e4m3fn"):
        fp8_linear(xq, xs, wq.astype(jnp.bfloat16), ws)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_linear(xq[:, :200], xs[:, :1], wq[:, :200], ws[:, :1])
    with pytest.raises(ValueError, match="power of two"):
        fp8_linear(xq, xs, wq, ws, blocks=GemmBlocks(block_m=24))


def _stack(rng, lay, e, n, k):
    ws = [_weight(rng, n, k) for _ in range(lay * e)]
    q = jnp.stack([a for a, _ in ws]).reshape(lay, e, n, k)
    return q, jnp.stack([b for _, b in ws]).reshape(lay, e, -(-n // 128), k // 128)


def test_grouped_matches_reference_with_empty_and_partial_windows():
    rng = np.random.default_rng(1)
    wq, ws = _stack(rng, 2, 4, 200, 256)
    xq, xs = _acts(rng, 40, 256)
    # windows: partial (5 of 16 rows), full, two of one expert, the table's unused tail (0 rows,
    # start past the rows), the last rows of x (the padding keeps the block in bounds)
    table = [jnp.asarray(v, jnp.int32) for v in ([0, 2, 2, 3, 1, 0], [0, 5, 21, 30, 38, 99],
                                                 [5, 16, 9, 8, 2, 0])]
    got = grouped_fp8_matmul(xq, xs, wq, ws, *table, jnp.int32(1), block_rows=16)
    want = grouped_fp8_reference(xq, xs, wq, ws, *table, 1, block_rows=16)
    assert got.shape == (6, 16, 200)
    _close(got, want)
    assert not np.any(np.asarray(got[0, 5:])) and not np.any(np.asarray(got[5]))
    # row i of window 1 is x row 5 + i through expert 2 of layer 1: the plain FP8 linear
    _close(got[1], fp8_linear(xq[5:21], xs[5:21], wq[1, 2], ws[1, 2]))
    # one layer's (E, N, K) weights, no layer argument
    got0 = grouped_fp8_matmul(xq, xs, wq[0], ws[0], *table, block_rows=32)
    _close(got0, grouped_fp8_reference(xq, xs, wq[0], ws[0], *table, block_rows=32))


def test_grouped_argument_errors():
    rng = np.random.default_rng(2)
    wq, ws = _stack(rng, 1, 2, 128, 128)
    xq, xs = _acts(rng, 8, 128)
    t = [jnp.zeros((3,), jnp.int32)] * 3
    with pytest.raises(ValueError, match="pass layer="):
        grouped_fp8_matmul(xq, xs, wq, ws, *t, block_rows=16)
    with pytest.raises(ValueError, match=">= 16"):
        grouped_fp8_matmul(xq, xs, wq[0], ws[0], *t, block_rows=8)
    with pytest.raises(ValueError, match="rows must have shape"):
        grouped_fp8_matmul(xq, xs, wq[0], ws[0], t[0], t[1], t[2][:2], block_rows=16)


@pytest.mark.parametrize("tokens,k,dtype", [(1, 2, "float32"), (40, 2, "float32"),
                                            (9, 2, "bfloat16")])
def test_routed_rows_pallas_matches_xla(tokens, k, dtype):
    """Decode (one token: one row per expert) and prefill windows, picks with no expert (id E)."""
    cfg = preset("tiny", dtype=dtype)
    rng = np.random.default_rng(tokens)
    lay, e, d, i = 2, cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
    w, s = {}, {}
    for name, (n, kk) in {"w1": (i, d), "w3": (i, d), "w2": (d, i)}.items():
        w[name], s[name] = _stack(rng, lay, e, n, kk)
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32).astype(dtype)
    picks = jnp.asarray(rng.integers(0, e + (tokens > 1), tokens * k), jnp.int32)
    src = jnp.arange(tokens * k) // k
    args = (w, s, jnp.int32(1), x, src, picks, tokens * k)
    want = routed_rows(cfg, *args)
    got = routed_rows(dataclasses.replace(cfg, matmul_impl="pallas"), *args)
    assert got.dtype == want.dtype
    if dtype == "float32":
        _close(got, want)
    else:  # the same f32 sums rounded to bf16: at most one bf16 ulp apart
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=1e-2, atol=1e-2 * float(jnp.std(want.astype(jnp.float32))))
    assert not np.any(np.asarray(got[np.asarray(picks) == e], np.float32))


def test_matmul_impl_is_validated():
    with pytest.raises(ConfigError, match="matmul_impl must be one of"):
        preset("tiny", matmul_impl="triton")
    with pytest.raises(ConfigError, match="needs FP8 weights and fp8_activations=True"):
        preset("tiny", matmul_impl="pallas", fp8_activations=False)
    with pytest.raises(ConfigError, match="needs FP8 weights"):
        preset("tiny", matmul_impl="pallas", weight_dtype="bf16")


SD = jax.ShapeDtypeStruct


def _linear_avals(m, n, k):
    return (SD((m, k), E4M3), SD((m, k // 128), jnp.float32), SD((n, k), E4M3),
            SD((-(-n // 128), k // 128), jnp.float32))


@pytest.mark.parametrize("m,n,k", [(1, 1536, 7168), (64, 576, 7168), (4096, 24576, 1536),
                                   (16384, 7168, 16384)])
def test_fp8_linear_lowers_for_h100(m, n, k):
    """The Triton lowering at released widths (q_a, kv_a, q_b, the attention output)."""
    text = lower_for_gpu(lambda *a: fp8_linear(*a, interpret=False), *_linear_avals(m, n, k))
    assert "fp8_linear" in text and "triton" in text.lower()


@pytest.mark.parametrize("windows,block_rows,n,k", [(8, 16, 2048, 7168), (768, 64, 2048, 7168),
                                                     (768, 64, 7168, 2048)])
def test_grouped_lowers_for_h100(windows, block_rows, n, k):
    """Decode (8 windows) and prefill windows of one expert's w1 / w2 at released widths, from the
    58-layer, 256-expert stack (abstract: nothing allocated)."""
    w = SD((windows,), jnp.int32)
    text = lower_for_gpu(
        lambda xq, xs, wq, ws, e, st, r, l: grouped_fp8_matmul(
            xq, xs, wq, ws, e, st, r, l, block_rows=block_rows, interpret=False),
        SD((4096, k), E4M3), SD((4096, k // 128), jnp.float32), SD((58, 256, n, k), E4M3),
        SD((58, 256, n // 128, k // 128), jnp.float32), w, w, w, SD((), jnp.int32))
    assert "grouped_fp8_matmul" in text and "triton" in text.lower()
