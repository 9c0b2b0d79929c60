"""Parity against the official reference's golden outputs (../shared/fixtures), three numerics.

exact: float32, no FP8 activation simulation -> element-wise within 1e-4 * std.
fp32:  float32 with FP8 simulation. An e4m3 rounding of a value within ~1e-6 of a rounding boundary
       can go either way under a different float32 summation order; one flipped element of a shared
       latent key or indexer key then moves every row that reads it by up to ~1e-2 * std, and can
       flip a top-k or expert choice downstream. So: per-layer components fed the golden inputs, the
       bulk (median row) at float32 rounding level, every row within a flip's reach, near-all
       selections equal.
bf16:  the deployment numerics (the reference even runs scores/softmax in bf16): statistical.
"""

from __future__ import annotations

import chex
import numpy as np
import pytest

from conftest import (CASES, components, fixture_model, golden, row_cosine, row_error,
                      topk_agreement)


def _components(case: str, mode: str):
    """Per layer, our MLA / FFN outputs and intermediates given the golden attn_in / ffn_in."""
    model, z = fixture_model(case, mode), golden(case, mode)
    return model.config, z, components(model, z)


@pytest.mark.parametrize("case", CASES)
def test_exact_prefill(case):
    model, z = fixture_model(case, "exact"), golden(case, "exact")
    logits, inter = model.logits_and_intermediates(z["tokens"])
    g = z["prefill_logits"]
    chex.assert_trees_all_close(np.asarray(logits), g, atol=1e-4 * g.std(), rtol=0)
    for name in ("attn_in", "attn_out", "ffn_in", "ffn_out", "index_scores"):
        for layer in range(model.config.n_layers):
            gl = z[name][layer]
            chex.assert_trees_all_close(np.asarray(inter[name][layer]), gl, atol=1e-4 * gl.std(),
                                        rtol=0, custom_message=f"{name} layer {layer}")
    assert topk_agreement(inter["topk"], z["prefill_topk"]) == 1.0
    np.testing.assert_array_equal(np.asarray(inter["gate_experts"]), z["prefill_gate_experts"])


@pytest.mark.parametrize("case", CASES)
def test_exact_components(case):
    cfg, z, out = _components(case, "exact")
    for layer, r in enumerate(out):
        for name in ("attn_out", "ffn_out", "index_scores"):
            g = z[name][layer]
            chex.assert_trees_all_close(np.asarray(r[name]), g, atol=1e-4 * g.std(), rtol=0,
                                        custom_message=f"{name} layer {layer}")
        assert topk_agreement(r["topk"][None], z["prefill_topk"][layer][None]) == 1.0
        if "gate_experts" in r:
            np.testing.assert_array_equal(np.asarray(r["gate_experts"]),
                                          z["prefill_gate_experts"][layer - cfg.n_dense_layers])


@pytest.mark.parametrize("case", CASES)
def test_fp32_components(case):
    cfg, z, out = _components(case, "fp32")
    for layer, r in enumerate(out):
        for name in ("attn_out", "ffn_out"):
            err = row_error(r[name], z[name][layer])
            cos = row_cosine(r[name], z[name][layer])
            assert np.median(err) < 2e-5, (name, layer, np.median(err))  # bulk: fp32 rounding
            assert np.mean(err < 1e-2) >= 0.97, (name, layer, np.mean(err < 1e-2))  # flips only
            assert cos.min() > 0.9999, (name, layer, cos.min())
        g = z["index_scores"][layer]
        elem = np.abs(np.asarray(r["index_scores"]) - g) / g.std()
        assert np.mean(elem < 1e-3) >= 0.95, (layer, np.mean(elem < 1e-3))
        assert np.median(elem) < 1e-5, (layer, np.median(elem))
        assert topk_agreement(r["topk"][None], z["prefill_topk"][layer][None]) >= 0.9
        if "gate_experts" in r:
            gold = z["prefill_gate_experts"][layer - cfg.n_dense_layers]
            assert np.mean((np.asarray(r["gate_experts"]) == gold).all(-1)) >= 0.97


@pytest.mark.parametrize("case", CASES)
def test_fp32_prefill(case):
    model, z = fixture_model(case, "fp32"), golden(case, "fp32")
    logits, inter = model.logits_and_intermediates(z["tokens"])
    g = z["prefill_logits"]
    err, cos = row_error(logits, g), row_cosine(logits, g)
    argmax = np.mean(np.asarray(logits).argmax(-1) == g.argmax(-1))
    # End to end a flip reaches every later row of its sequence (the bulk check at float32
    # rounding is `test_fp32_components`'). Seen on an AVX-512 CPU: a latent key at position 9
    # of tiny-bf16's first sequence flips in layer 0; its later rows move by 1e-4 to 1e-3, three
    # by ~0.1 (their top-k changed); median row 1.5e-4. Without the flip the median is 2e-6.
    assert np.median(err) < 1e-3, np.median(err)
    assert np.mean(err < 1e-2) >= 0.9, np.mean(err < 1e-2)
    assert np.median(cos) > 0.99999 and argmax >= 0.98, (np.median(cos), argmax)
    assert topk_agreement(inter["topk"], z["prefill_topk"]) >= 0.9
    assert np.mean(np.asarray(inter["gate_experts"]) == z["prefill_gate_experts"]) >= 0.95


@pytest.mark.parametrize("case", CASES)
def test_bf16_prefill_statistical(case):
    model, z = fixture_model(case, "bf16"), golden(case, "bf16")
    logits = np.asarray(model.logits(z["tokens"]))
    g = z["prefill_logits"]
    cos = np.median(row_cosine(logits, g))
    argmax = np.mean(logits.argmax(-1) == g.argmax(-1))
    print(f"{case} bf16: median per-position cosine {cos:.6f}, argmax agreement {argmax:.4f}")
    # measured: cosine 0.99958 / 0.99998, argmax 0.969 / 0.969 (tiny-fp8 / tiny-bf16)
    assert cos >= 0.999 and argmax >= 0.93, (cos, argmax)


def test_sparse_equals_dense_path():
    """The gathered top-k path and the dense masked path compute the same attention."""
    z = golden("tiny-fp8", "exact")
    sparse = fixture_model("tiny-fp8", "exact").logits(z["tokens"])
    dense = fixture_model("tiny-fp8", "exact", "xla_dense").logits(z["tokens"])
    g = z["prefill_logits"]
    chex.assert_trees_all_close(np.asarray(sparse), np.asarray(dense), atol=1e-4 * g.std(), rtol=0)
