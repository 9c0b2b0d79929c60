"""FP8 dots on Hopper's FP8 tensor cores (wgmma), with the release's accumulation rule.

Triton compiles an e4m3 x e4m3 -> f32 dot to FP8 wgmma on sm_90 only when the `tt.dot` carries
`maxNumImpreciseAcc` >= 32: how many K products the tensor core may add in its reduced-precision
accumulator before the partial sum is promoted to a full float32 register. Triton's own front end
sets it; jax's Pallas-Triton lowering (0.10 - 0.12) never does, so every FP8 dot of our kernels
compiled to FP8 -> f16 converts + `mma.sync` (visible in the PTX: `benchmarks/deviceless.py`).
jax offers no supported route (the lowering refuses the `lax.DotAlgorithmPreset` FP8 presets), so
this module wraps the lowering rule of `dot_general`, at this one place, and sets the attribute on
the `tt.dot` it emits for FP8 operands: `PROMOTE` = 128, the release's (and DeepGEMM's) rule of a
float32 promotion every 128 of K. Every FP8 dot of this project has K = 128 (one scale block), so
each is promoted exactly where its block scales are applied, as in the release.

Scope: dots whose two operands are 8-bit floats, in any Pallas-Triton kernel of the process; other
dots are untouched, and interpret mode (no Triton) is unaffected. If jax's lowering stops emitting
a `tt.dot` this can find, lowering fails loudly here rather than compiling the slow path. Remove
this module once jax sets the attribute itself (tests/test_pallas_gemm.py checks the attribute).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.pallas.triton import lowering

PROMOTE = 128  # K products per float32 promotion (the release's FP8 GEMM accumulation rule)


def _is_fp8(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.floating) and jnp.dtype(aval.dtype).itemsize == 1


def _dot_op(value):
    """The tt.dot behind the lowered dot's result (the result itself, or a cast of it)."""
    op = value.owner
    for _ in range(2):
        if op.name == "tt.dot":
            return op
        if not op.operands:
            break
        op = op.operands[0].owner
    raise RuntimeError("pallas_kernels.triton_fp8: jax's Triton lowering of an FP8 dot_general "
                       f"no longer ends in a tt.dot (found {op.name}); the FP8 promotion shim "
                       "needs updating for this jax version")


def _with_promotion(rule):
    def fp8_rule(ctx, a, b, **params):
        out = rule(ctx, a, b, **params)
        if all(_is_fp8(v) for v in ctx.avals_in):
            _dot_op(out).attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(
                ir.IntegerType.get_signless(32), PROMOTE)
        return out

    fp8_rule.wraps = rule
    return fp8_rule


def install() -> None:
    """Wrap the Triton lowering rule of dot_general (idempotent)."""
    rules = lowering.triton_lowering_rules
    if not hasattr(rules[lax.dot_general_p], "wraps"):
        rules[lax.dot_general_p] = _with_promotion(rules[lax.dot_general_p])
