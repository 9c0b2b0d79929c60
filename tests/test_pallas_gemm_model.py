"""matmul_impl="pallas" (the FP8 linear and grouped expert kernels, interpreted on CPU) gives the
logits of matmul_impl="xla" on the tiny-fp8 fixture: float32 + FP8 simulation (a prefill in which
experts get several row windows) and the deployment numerics (bf16 + FP8) in decode steps."""

from __future__ import annotations

import dataclasses

import numpy as np

import dsv32_jax
from conftest import fixture_dir, fixture_model, golden
from dsv32_jax.model.moe import expert_window

PROMPT = 24  # tokens per sequence: 48 rows, windows of 16, and experts with more rows than that


def test_pallas_matmul_logits_match_xla():
    """fp32: every position's logits within 1e-5 * std of XLA's, in a prefill where an expert's
    rows span several windows of the grouped kernel."""
    ref = fixture_model("tiny-fp8", "fp32")
    model = dsv32_jax.load_model(fixture_dir("tiny-fp8") / "hf", dtype="float32",
                                 fp8_activations=True, matmul_impl="pallas")
    assert model.config.matmul_impl == "pallas"
    tokens = golden("tiny-fp8", "fp32")["tokens"][:, :PROMPT]
    want, inter = ref.logits_and_intermediates(tokens)
    rows = tokens.size
    window = max(16, expert_window(rows, rows * ref.config.n_activated_experts,
                                   ref.config.n_routed_experts))  # routed_rows_pallas's windows
    most = max(np.bincount(np.asarray(g).ravel()).max() for g in inter["gate_experts"])
    assert most > window, (most, window)  # the case has an expert over several windows
    want = np.asarray(want)
    got = np.asarray(model.logits(tokens))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * want.std())


def test_pallas_matmul_bf16_decode_matches_xla():
    """bf16 + FP8, decode: after an XLA prefill of 24 tokens, each teacher-forced decode step (one
    row per sequence: the kernels' smallest blocks, fewer tokens than experts) through the
    production forward with matmul_impl="pallas" gives XLA's logits. Measured: bit-equal."""
    import jax
    import jax.numpy as jnp

    from dsv32_jax.engine import generate as gen
    from dsv32_jax.model.transformer import init_cache

    ref = fixture_model("tiny-fp8", "bf16", weights="narrow")  # the kernels read e4m3 weights
    xla, pallas = ref.config, dataclasses.replace(ref.config, matmul_impl="pallas")
    tokens = golden("tiny-fp8", "bf16")["tokens"][:, :PROMPT + 3]
    b = tokens.shape[0]
    _, cache, _ = gen.prefill(ref.params, xla, "xla", tokens[:, :PROMPT], np.full(b, PROMPT),
                              init_cache(xla, b, 32))
    for j in range(PROMPT, tokens.shape[1]):
        step = jnp.asarray(tokens[:, j:j + 1]), jnp.full((b, 1), j, jnp.int32)
        got, _, _ = gen.forward(ref.params, *step, jax.tree.map(jnp.copy, cache),
                                jnp.zeros(b, jnp.int32), cfg=pallas)
        want, cache, _ = gen.forward(ref.params, *step, cache, jnp.zeros(b, jnp.int32), cfg=xla)
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * want.std(),
                                   err_msg=f"decode step at position {j}")
