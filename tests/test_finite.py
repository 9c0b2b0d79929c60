"""`checkpoint.finite` on the host (the converter's chunks): every NaN/Inf code is found wherever it
sits, block edges included, and the scan streams through a small buffer."""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from dsv32_jax.checkpoint.finite import HOST_BLOCK, nonfinite

FP8, BF16 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.bfloat16)
# bit patterns of NaN/Inf: FP8 e4m3fn has only the NaN codes 0x7f and 0xff; the others: +-Inf, NaNs
BAD = {FP8: (0x7F, 0xFF), BF16: (0x7F80, 0xFF80, 0x7FC0, 0xFF81),
       np.dtype(np.float16): (0x7C00, 0xFC00, 0x7E00), np.dtype(np.float32): (0x7F800000, 0xFFC00001)}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


@pytest.mark.parametrize("dtype", list(BAD), ids=lambda d: d.name)
def test_every_nonfinite_code_is_found_at_every_edge(dtype):
    step = HOST_BLOCK // dtype.itemsize
    n = 2 * step + step // 2 + 3  # two whole blocks and a ragged tail
    rng = np.random.default_rng(0)
    x = np.clip(rng.standard_normal(n, np.float32) * 100, -440, 440).astype(dtype)
    assert not nonfinite(x, xp=np) and not nonfinite(x[:0], xp=np)
    for at in (0, step - 1, step, 2 * step, n - 1):
        for code in BAD[dtype]:
            y = x.copy()
            y.view(UINT[dtype.itemsize])[at] = code
            assert nonfinite(y, xp=np), (at, hex(code))
            assert nonfinite(y.reshape(-1, 1)[::-1], xp=np)  # not contiguous: still found
    # the largest finite values are finite (FP8: 0x7e = 448 and 0xfe = -448 are not NaN)
    top = np.array([np.finfo(dtype).max, np.finfo(dtype).min], dtype)
    assert not nonfinite(np.tile(top, step), xp=np)


@pytest.mark.parametrize("dtype", [FP8, BF16], ids=lambda d: d.name)
def test_host_scan_makes_no_chunk_sized_temporary(dtype):
    """The converter checks each 32 MB chunk as it streams: whole-chunk temporaries (the bits
    masked, then compared: two fresh arrays of the chunk's size per chunk) made the check 4x
    slower (0.67-0.89 s instead of 0.17 s for a 1.67 GB checkpoint, one thread)."""
    x = np.zeros((32 << 20) // dtype.itemsize, dtype)
    tracemalloc.start()
    try:
        assert not nonfinite(x, xp=np)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 2 * HOST_BLOCK, peak
