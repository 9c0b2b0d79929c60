"""matmul_impl="pallas" (the FP8 linear and grouped expert kernels, interpreted on CPU) gives the
logits of matmul_impl="xla" on the tiny-fp8 fixture in fp32 mode (float32 + FP8 simulation)."""

from __future__ import annotations

import numpy as np

import dsv32_jax
from conftest import fixture_dir, fixture_model, golden


def test_pallas_matmul_logits_match_xla():
    ref = fixture_model("tiny-fp8", "fp32")
    model = dsv32_jax.load_model(fixture_dir("tiny-fp8") / "hf", dtype="float32",
                                 fp8_activations=True, matmul_impl="pallas")
    assert model.config.matmul_impl == "pallas"
    tokens = golden("tiny-fp8", "fp32")["tokens"][:, :12]  # one short prefill
    want = np.asarray(ref.logits(tokens))
    got = np.asarray(model.logits(tokens))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * want.std())
