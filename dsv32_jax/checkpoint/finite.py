"""NaN and Inf in weights, found by their bits: a float whose exponent bits are all ones is Inf or
NaN; FP8 e4m3fn has no Inf, and its only NaN codes are 0x7f and 0xff. The same test runs on the
host (numpy: the converter's chunks) and on the devices (a loaded param tree, one jitted pass).

On the host the bits are scanned a block (`HOST_BLOCK`) at a time through one small buffer: the
whole-chunk temporaries of `(bits & mask) == mask` (two per 32 MB chunk, fresh memory each time)
made the test 4-5x slower and `dsv32 convert` 16% slower end to end (README)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import ml_dtypes
import numpy as np

from dsv32_jax.checkpoint.weights import Path, flatten
from sharding.distributed import to_host

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
_BITS = {FP8: (np.uint8, 0x7F), np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
         np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}
HOST_BLOCK = 1 << 20  # bytes per step of the host scan (its buffer stays in the CPU's cache)


def nonfinite(x, axis=None, xp=jax.numpy):
    """any(x is NaN or Inf) over `axis` (None: all of x); False for integer dtypes. xp: jax.numpy
    (inside jit) or numpy."""
    dt = np.dtype(x.dtype)
    if dt not in _BITS:
        axes = range(x.ndim) if axis is None else axis
        return xp.zeros(tuple(d for i, d in enumerate(x.shape) if i not in axes), bool)
    if xp is np and dt in (np.float32, np.float16):  # numpy's own isfinite: ~4x the bit test
        return ~np.isfinite(x).all(axis=axis)
    ut, mask = _BITS[dt]
    if xp is np and axis is None:
        return _all_ones_somewhere(x.reshape(-1).view(ut), ut(mask))
    bits = x.view(ut) if xp is np else jax.lax.bitcast_convert_type(x, ut)
    return xp.any((bits & ut(mask)) == ut(mask), axis=axis)


def _all_ones_somewhere(bits: np.ndarray, mask) -> bool:
    """any((bits & mask) == mask) over the flat numpy `bits`, HOST_BLOCK bytes at a time: the
    masked block's max is `mask` exactly when one of its values has every bit of `mask` set."""
    step = HOST_BLOCK // bits.itemsize
    buf = np.empty(min(step, bits.size), bits.dtype)
    for i in range(0, bits.size, step):
        part = bits[i:i + step]
        if np.bitwise_and(part, mask, out=buf[:part.size]).max() == mask:
            return True
    return False


def what_is_wrong(dtype) -> str:
    """The message tail for a tensor of `dtype` that holds NaN/Inf."""
    if np.dtype(dtype) == FP8:
        return "holds the FP8 e4m3 NaN code (byte 0x7f or 0xff); weights must be finite"
    return f"holds NaN or Inf (as {np.dtype(dtype).name}); weights and scales must be finite"


@partial(jax.jit, static_argnums=1)
def _flags(leaves: list, leads: tuple[int, ...]) -> list:
    return [nonfinite(x, tuple(range(lead, x.ndim))) for x, lead in zip(leaves, leads)]


def first_nonfinite(params: dict, leads: Mapping[Path, int]) -> tuple[Path, tuple[int, ...]] | None:
    """(path, index) of the first tensor holding a NaN/Inf, else None: params are stacked tensors
    (`leads[path]` leading stacked axes, e.g. (layer, expert)); the index is into those axes. One
    jitted pass over the whole tree, on the devices where the params are."""
    flat = flatten(params)
    paths = sorted(flat)
    flags = _flags([flat[p] for p in paths], tuple(leads[p] for p in paths))
    for p, f in zip(paths, flags):
        f = to_host(f)
        if f.any():
            return p, tuple(int(i) for i in np.argwhere(f)[0])
    return None
