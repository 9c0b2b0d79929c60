"""The deployment numerics (bf16 compute + FP8 activation simulation) checked per layer and per
site against the bf16 goldens, with bars that the wrong numerics fail.

Each layer's attention and FFN/MoE are fed the golden inputs (`attn_in`, `ffn_in`), so errors do
not compound. Measured on the fixtures (relative Frobenius error of attn_out; share of ffn_out
elements bit-equal to the golden in bf16):

| numerics | tiny-fp8 attn_out | tiny-fp8 ffn_out equal | tiny-bf16 attn_out | tiny-bf16 ffn_out equal |
| --- | --- | --- | --- | --- |
| bf16 + FP8 simulation (right) | 0.016-0.017 | 0.9994-0.9998 | 0.0054-0.0056 | 1.000 |
| bf16, no FP8 simulation | 0.13-0.20 | 0.03-0.04 | 0.10-0.16 | 1.000 (no FP8 linears) |
| float32 + FP8 simulation | 0.11-0.15 | 0.13-0.16 | 0.05-0.10 | 0.39-0.43 |

So the bars: attn_out relative error <= 0.03 and ffn_out >= 99% bit-equal, in every layer.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import CASES, components, fixture_dir, golden

ATTN_REL = 0.03
FFN_EQUAL = 0.99


@functools.lru_cache(maxsize=None)
def _failures(case: str, dtype: str, fp8: bool) -> tuple[str, ...]:
    """Which (layer, site) bars the given numerics miss against the bf16 goldens."""
    import jax.numpy as jnp

    import dsv32_jax

    model = dsv32_jax.load_model(fixture_dir(case) / "hf", dtype=dtype, fp8_activations=fp8)
    z = golden(case, "bf16")
    failed = []
    for layer, r in enumerate(components(model, z)):
        g = z["attn_out"][layer].astype(np.float32)
        a = np.asarray(r["attn_out"], np.float32)
        rel = np.linalg.norm(a - g) / np.linalg.norm(g)
        if rel > ATTN_REL:
            failed.append(f"layer {layer} attn_out rel err {rel:.4f} > {ATTN_REL}")
        g = z["ffn_out"][layer].astype(np.float32)
        f = np.asarray(jnp.asarray(r["ffn_out"]).astype(jnp.bfloat16), np.float32)
        equal = np.mean(f == g)
        if equal < FFN_EQUAL:
            failed.append(f"layer {layer} ffn_out bit-equal {equal:.3f} < {FFN_EQUAL}")
    return tuple(failed)


@pytest.mark.parametrize("case", CASES)
def test_deployment_numerics_match_per_site(case):
    assert _failures(case, "bfloat16", True) == ()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,fp8", [("bfloat16", False), ("float32", True)],
                         ids=["no-fp8-simulation", "float32-compute"])
def test_wrong_numerics_fail_the_bars(case, dtype, fp8):
    failed = _failures(case, dtype, fp8)
    print(case, dtype, fp8, failed)
    assert failed, f"{case}: {dtype} with fp8_activations={fp8} passed the bf16 bars"
    assert any("attn_out" in f for f in failed)  # every wrong numerics shows in the attention
