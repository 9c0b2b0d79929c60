"""y (M, N) f32 = x (M, K) f32 . W (N, K)^T with W in its stored width (`gemv.cc`), beside
`gemv_reference`, the same product in jnp.

W is e4m3 (or its bits, uint8) with block scales s (ceil(N/128), ceil(K/128)) f32 (the release's
FP8 linears; the product is x . (W * s), with s folded into x per 128-row block), or bf16 with s
None (the head). W may be a stack (L..., N, K) (s (L..., ...)) with `index`, one int32 per
leading axis: the kernel reads W[index] in place, where a slice would be copied out first (the
routed experts' (layers, experts) stacks). For few rows only (at most GEMV_ROWS: a decode step's
batch, an expert window); a chunk of many rows is a matrix product, XLA's to do."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv32_jax.native import build

GEMV_ROWS = 32
BLOCK = 128
E4M3 = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.uint8))


def _check(x: jax.Array, w: jax.Array, s: jax.Array | None, index: tuple) -> None:
    lead = w.shape[:-2]
    if x.ndim != 2 or x.dtype != jnp.float32:
        raise TypeError(f"gemv: x must be (M, K) float32, got {x.shape} {x.dtype}")
    if w.ndim < 2 or w.shape[-1] != x.shape[1]:
        raise TypeError(f"gemv: W must be (..., N, K={x.shape[1]}), got {w.shape}")
    if len(index) != len(lead):
        raise TypeError(f"gemv: W {w.shape} needs {len(lead)} indices, got {len(index)}")
    if not 1 <= x.shape[0] <= GEMV_ROWS:
        raise ValueError(f"gemv: 1..{GEMV_ROWS} rows of x, got {x.shape[0]}")
    if jnp.dtype(w.dtype) in E4M3:
        want = (*lead, -(-w.shape[-2] // BLOCK), -(-w.shape[-1] // BLOCK))
        if s is None or s.shape != want or s.dtype != jnp.float32:
            raise TypeError(f"gemv: an e4m3 W needs float32 block scales {want}, got "
                            f"{None if s is None else (s.shape, s.dtype)}")
    elif w.dtype == jnp.bfloat16:
        if s is not None:
            raise TypeError("gemv: a bf16 W takes no scales")
    else:
        raise TypeError(f"gemv: W must be e4m3 (or its uint8 bits) or bf16, got {w.dtype}")


def gemv(x: jax.Array, w: jax.Array, s: jax.Array | None = None, index: tuple = ()) -> jax.Array:
    """x (M, K) f32 . W[index] (N, K)^T -> (M, N) f32 by the native kernel; an XLA:CPU program only
    (a custom call registered for the CPU). Raises `build.NativeUnavailable` when it is not built."""
    _check(x, w, s, index)
    build.require()
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[-2]), jnp.float32)
    idx = jnp.asarray(index, jnp.int32).reshape(len(index))
    if w.dtype == jnp.bfloat16:
        return jax.ffi.ffi_call("dsv32_gemv_bf16", out)(x, w, idx)
    if w.dtype != jnp.uint8:
        w = jax.lax.bitcast_convert_type(w, jnp.uint8)
    return jax.ffi.ffi_call("dsv32_gemv_e4m3", out)(x, w, s, idx)


def gemv_reference(x: jax.Array, w: jax.Array, s: jax.Array | None = None,
                   index: tuple = ()) -> jax.Array:
    """The same product in jnp: W[index] widened to float32 (times its block scales), one float32
    dot."""
    _check(x, w, s, index)
    w = w[tuple(index)]
    if w.dtype == jnp.uint8:
        w = jax.lax.bitcast_convert_type(w, jnp.float8_e4m3fn)
    wf = w.astype(jnp.float32)
    if s is not None:
        n, k = w.shape
        wf = wf * jnp.repeat(jnp.repeat(s[tuple(index)], BLOCK, 0), BLOCK, 1)[:n, :k]
    return jnp.einsum("mk,nk->mn", x, wf, precision=jax.lax.Precision.HIGHEST)
