"""FP8 numerics: act_quant (ue8m0, 1e-4 floor, round-to-nearest-even, clamp), weight dequant with
partial edge blocks, the blockwise-sum matmul and the CPU's product of the dequantized weight, the
Hadamard rotation."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv32_jax.model import quant
from dsv32_jax.model.layers import fp8_linear
from dsv32_jax.model.quant import (act_quant, blockwise_matmul, dequant, dequant_matmul, hadamard,
                                   hadamard_matrix, pow2_ceil, quant_dequant, to_f32)

E4M3 = ml_dtypes.float8_e4m3fn


def test_pow2_ceil_exact():
    s = np.array([1.0, 0.75, 0.5000001, 3.0, 2.0**-20, 1e-4 / 448, 448.0], np.float32)
    got = np.asarray(pow2_ceil(jnp.asarray(s)))
    # reference from exact exponent arithmetic in float64
    want = np.array([2.0 ** np.ceil(np.log2(np.float64(v))) for v in s], np.float32)
    np.testing.assert_array_equal(got, want)
    assert got[0] == 1.0 and got[3] == 4.0  # exact powers stay, others round up


def test_act_quant_ue8m0_scales_and_values():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 256)) * rng.uniform(0.01, 100, (3, 1))).astype(np.float32)
    xq, s = act_quant(jnp.asarray(x), "ue8m0")
    xq, s = np.asarray(xq), np.asarray(s)
    assert xq.dtype == E4M3 and s.shape == (3, 2)
    amax = np.abs(x.reshape(3, 2, 128)).max(-1)
    np.testing.assert_array_equal(s, 2.0 ** np.ceil(np.log2(amax / 448.0)))  # a power of two
    assert np.all(s * 448 >= amax)  # no clipping needed
    # values: x / s rounded to nearest e4m3 (s is a power of two, so x / s is exact)
    want = (x.reshape(3, 2, 128) / s[..., None]).astype(E4M3).reshape(3, 256)
    np.testing.assert_array_equal(xq.view(np.uint8), want.view(np.uint8))


def test_act_quant_unrounded_scale_and_floor():
    x = np.zeros((2, 128), np.float32)
    x[1, 5] = 896.0
    xq, s = act_quant(jnp.asarray(x), None)
    s = np.asarray(s)
    np.testing.assert_allclose(s[0, 0], np.float32(1e-4) * np.float32(1 / 448), rtol=1e-7)  # floor
    assert s[1, 0] == np.float32(896.0) * np.float32(1 / 448)  # unrounded
    assert float(np.asarray(xq)[1, 5].astype(np.float32)) == 448.0
    assert np.all(np.asarray(xq)[0].astype(np.float32) == 0)


def test_act_quant_round_to_nearest_even_and_clamp():
    # with amax fixed at 448*2^-k the scale is exact; e4m3 spacing in [8, 16) is 1, so 8.5 -> 8 and
    # 9.5 -> 10 (ties to even mantissa); values beyond 448*s clamp to 448.
    x = np.zeros((1, 128), np.float32)
    x[0, :4] = [8.5, 9.5, -8.5, 448.0]
    xq, s = act_quant(jnp.asarray(x), "ue8m0")
    assert float(np.asarray(s)[0, 0]) == 1.0
    np.testing.assert_array_equal(np.asarray(xq)[0, :4].astype(np.float32), [8.0, 10.0, -8.0, 448.0])


def test_act_quant_rejects_partial_block():
    with pytest.raises(ValueError, match="multiple of the block size"):
        act_quant(jnp.ones((2, 100)), "ue8m0")


def test_quant_dequant_error_bound_and_idempotent():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 256)).astype(np.float32))
    y = quant_dequant(x, "ue8m0")
    rel = np.abs(np.asarray(y) - np.asarray(x)) / np.abs(np.asarray(x)).max()
    assert rel.max() <= 2.0**-4 and rel.max() > 0  # e4m3: 3 mantissa bits
    np.testing.assert_array_equal(np.asarray(quant_dequant(y, "ue8m0")), np.asarray(y))


@pytest.mark.parametrize("shape", [(192, 256), (200, 130), (128, 128), (5, 300)])
def test_dequant_partial_edge_blocks(shape):
    rng = np.random.default_rng(2)
    n, k = shape
    w = rng.standard_normal(shape).astype(E4M3)
    scale = rng.uniform(0.5, 2.0, (-(-n // 128), -(-k // 128))).astype(np.float32)
    got = np.asarray(dequant(jnp.asarray(w), jnp.asarray(scale), jnp.float32))
    want = np.empty(shape, np.float32)
    for i in range(n):
        for j in range(0, k, 64):
            want[i, j:j + 64] = w[i, j:j + 64].astype(np.float32) * scale[i // 128, j // 128]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("budget", [1, 200 * 5 * 4, 1 << 30])  # a group per block, 1, all at once
def test_blockwise_matmul_is_the_blockwise_sum(budget):
    xq, xs, wq, ws = _fp8_operands(5)
    got = np.asarray(blockwise_matmul(*map(jnp.asarray, (xq, xs, wq, ws)), budget))
    want = _blockwise_sum(xq, xs, wq, ws)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _fp8_operands(m: int, n: int = 200, k: int = 384):
    """act_quant-like x (m, k) e4m3 + (m, k/128) scales, an FP8 weight (n, k) (a partial last row
    block) + (ceil(n/128), k/128) scales, the scales in [0.1, 1)."""
    rng = np.random.default_rng(3)
    xq = rng.standard_normal((m, k)).astype(E4M3)
    xs = rng.uniform(0.1, 1, (m, k // 128)).astype(np.float32)
    wq = rng.standard_normal((n, k)).astype(E4M3)
    ws = rng.uniform(0.1, 1, (-(-n // 128), k // 128)).astype(np.float32)
    return xq, xs, wq, ws


def _blockwise_sum(xq, xs, wq, ws) -> np.ndarray:
    """The release's sum over K-blocks of scaled per-block products, in float64 (m, n)."""
    (m, k), n = xq.shape, wq.shape[0]
    xf, wf = xq.astype(np.float64), wq.astype(np.float64)
    want = np.zeros((m, n))
    for b in range(k // 128):
        part = xf[:, b * 128:(b + 1) * 128] @ wf[:, b * 128:(b + 1) * 128].T
        want += part * xs[:, b:b + 1] * np.repeat(ws[:, b], 128)[:n][None]
    return want


@pytest.mark.parametrize("m", [1, 5])  # a decode row (one row at a time on the CPU), a matrix
def test_dequant_matmul_is_the_blockwise_sum(m):
    """The CPU's FP8 linear, one float32 product of the dequantized activations and weight: the
    release's blockwise sum to float32 rounding."""
    xq, xs, wq, ws = _fp8_operands(m)
    w = dequant(jnp.asarray(wq), jnp.asarray(ws), jnp.float32)
    got = np.asarray(dequant_matmul(jnp.asarray(xq), jnp.asarray(xs), w))
    want = _blockwise_sum(xq, xs, wq, ws)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("m", [1, 5])
def test_dequant_matmul_by_blocks_of_rows(monkeypatch, m):
    """Over DEQUANT_ROWS rows (here 256: 712 rows are two blocks and a 200-row tail) the weight is
    taken a block of rows at a time: e4m3 + scales (dequantized per block) and the stored
    dequantized weight give the same bits, the blockwise sum to float32 rounding."""
    monkeypatch.setattr(quant, "DEQUANT_ROWS", 256)
    xq, xs, wq, ws = map(jnp.asarray, _fp8_operands(m, n=712))
    got = np.asarray(dequant_matmul(xq, xs, wq, ws))
    stored = np.asarray(dequant_matmul(xq, xs, dequant(wq, ws, jnp.float32)))
    np.testing.assert_array_equal(got.view(np.uint32), stored.view(np.uint32))
    want = _blockwise_sum(*map(np.asarray, (xq, xs, wq, ws)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_fp8_linear_on_the_cpu():
    """On the CPU a bf16 result is the dequantized weight's one product, with the same bits
    whether the weight comes as e4m3 + scales or stored dequantized (`checkpoint.storage`); a
    float32 result keeps the blockwise order, bit for bit."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 384)).astype(np.float32))
    _, _, wq, ws = map(jnp.asarray, _fp8_operands(1))
    xq, xs = act_quant(x.reshape(6, 384), "ue8m0")
    w = dequant(wq, ws, jnp.float32)
    bf16 = np.asarray(fp8_linear(x, wq, ws, "ue8m0", jnp.bfloat16)).view(np.uint16)
    want = dequant_matmul(xq, xs, w).astype(jnp.bfloat16).reshape(2, 3, 200)
    np.testing.assert_array_equal(bf16, np.asarray(want).view(np.uint16))
    np.testing.assert_array_equal(
        bf16, np.asarray(fp8_linear(x, w, None, "ue8m0", jnp.bfloat16)).view(np.uint16))
    np.testing.assert_array_equal(
        np.asarray(fp8_linear(x, wq, ws, "ue8m0", jnp.float32)).view(np.uint32),
        np.asarray(blockwise_matmul(xq, xs, wq, ws)).view(np.uint32).reshape(2, 3, 200))
    for impl in ("pallas", "native"):
        with pytest.raises(ValueError, match=f"impl '{impl}' reads e4m3 weights and their scales"):
            fp8_linear(x, w, None, "ue8m0", jnp.bfloat16, impl=impl)


def test_hadamard_sylvester_orthonormal():
    h = hadamard_matrix(8)
    np.testing.assert_allclose(h @ h.T, np.eye(8), atol=1e-6)
    h2 = np.sign(hadamard_matrix(2))
    np.testing.assert_array_equal(h2, [[1, 1], [1, -1]])
    # Sylvester order: H_2n = [[H, H], [H, -H]]
    h4 = np.sign(hadamard_matrix(4))
    np.testing.assert_array_equal(h4, np.block([[h2, h2], [h2, -h2]]))
    np.testing.assert_allclose(np.abs(hadamard_matrix(4)), 0.5)
    x = np.random.default_rng(4).standard_normal((3, 128)).astype(np.float32)
    y = np.asarray(hadamard(jnp.asarray(x)))
    np.testing.assert_allclose(y, x @ hadamard_matrix(128), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(96)


def test_e4m3_widening_by_bits_is_the_convert():
    """`quant.to_f32` (integer ops on e4m3 bits, the CPU's indexer-key widening) gives every one
    of the 256 e4m3 values as the convert does: normals, subnormals, signed zeros, NaN; and its
    gradient is the convert's."""
    import jax

    x = jnp.arange(256, dtype=jnp.uint8).view(E4M3)
    want = np.asarray(x.astype(jnp.float32))
    got = np.asarray(jax.jit(to_f32)(x))
    np.testing.assert_array_equal(got, want)  # NaN matches NaN
    assert np.array_equal(np.signbit(got), np.signbit(want))
    np.testing.assert_array_equal(jax.grad(lambda v: to_f32(v).sum())(jnp.ones(3, x.dtype)),
                                  np.ones(3, np.float32))
