"""attention_impl="pallas" (the kernels interpreted on CPU) matches the golden fixtures like the
XLA path: exact mode, same top-k sets, logits within 1e-4 * std; prefill and decode."""

from __future__ import annotations

import chex
import numpy as np

from conftest import fixture_model, golden, topk_agreement
from test_generate import _teacher_forced


def test_pallas_exact_prefill():
    model, z = fixture_model("tiny-fp8", "exact", "pallas"), golden("tiny-fp8", "exact")
    logits, inter = model.logits_and_intermediates(z["tokens"])
    g = z["prefill_logits"]
    chex.assert_trees_all_close(np.asarray(logits), g, atol=1e-4 * g.std(), rtol=0)
    for layer in range(model.config.n_layers):
        gl = z["index_scores"][layer]
        chex.assert_trees_all_close(np.asarray(inter["index_scores"][layer]), gl,
                                    atol=1e-4 * gl.std(), rtol=0, custom_message=f"layer {layer}")
    assert topk_agreement(inter["topk"], z["prefill_topk"]) == 1.0
    # without intermediates the indexer kernel runs causal (tile skipping): same logits
    chex.assert_trees_all_close(np.asarray(model.logits(z["tokens"])), g, atol=1e-4 * g.std(),
                                rtol=0)


def test_pallas_exact_decode():
    """Decode steps (one query per sequence: the kernels' decode blocks, split-k)."""
    model, z = fixture_model("tiny-fp8", "exact", "pallas"), golden("tiny-fp8", "exact")
    logits, picks = _teacher_forced(model, z["tokens"], int(z["prompt_len"]))
    g = z["decode_logits"]
    chex.assert_trees_all_close(logits, g, atol=1e-4 * g.std(), rtol=0)
    ours = picks.transpose(0, 2, 1, 3).reshape(-1, picks.shape[-1])
    gold = z["decode_topk"].transpose(0, 2, 1, 3).reshape(-1, picks.shape[-1])
    assert all(set(o) == set(gg) for o, gg in zip(ours, gold))
