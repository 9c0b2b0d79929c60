"""Memory at the released widths (abstract params, nothing allocated): the gates of
`benchmarks/memory.py`, and no model object kept alive by compiled functions."""

from __future__ import annotations

import gc
import weakref

import jax
import numpy as np

from benchmarks.memory import decode_ideal_bytes, largest_tensors, lower, released_cut

GIB, MIB = 1 << 30, 1 << 20


def test_largest_op_result_at_released_widths_is_bounded():
    """No op of the lowered decode step (128K context) or 512-token prefill chunk (written at the
    end of a 128K cache) produces more than 0.25 GiB: no all-experts weights, no per-head indexer
    buffer over the context, no whole-head float32 copy (before: 3.5 GiB and 8 GiB)."""
    cfg = released_cut()
    for queries in (1, 512):
        text = lower(cfg, 131072, queries).as_text()
        top = largest_tensors(text)
        assert top[0][0] <= GIB // 4, (queries, top[:3])


def test_decode_temp_does_not_grow_with_context():
    """XLA:CPU's compiled temp of one decode step grows by at most 64 MiB from 32K to 128K slots:
    the cache is updated in place, the indexer works tile by tile (before: 546 MiB)."""
    cfg = released_cut()
    temp = [lower(cfg, t, 1).compile().memory_analysis().temp_size_in_bytes
            for t in (32768, 131072)]
    assert temp[1] - temp[0] <= 64 * MIB, [t / MIB for t in temp]


def test_largest_tensors_parser_counts_ops_and_skips_in_place_updates():
    text = """
    %0 = stablehlo.convert %arg0 : (tensor<4x8xf8E4M3FN>) -> tensor<4x8xf32>
    %1 = stablehlo.dynamic_update_slice %big, %0, %c, %c : (tensor<1024x1024xf32>, tensor<4x8xf32>, tensor<i32>, tensor<i32>) -> tensor<1024x1024xf32>
    %2:2 = stablehlo.while(%iterArg = %1, %x = %0) : tensor<1024x1024xf32>, tensor<4x8xf32>
    %3 = stablehlo.add %0, %0 : tensor<4x8xf32>
    """
    top = largest_tensors(text)
    assert [(b, op) for b, op, _ in top] == [(128, "convert"), (128, "add")]


def test_decode_ideal_bytes_counts_routed_experts_only():
    cfg = released_cut()
    ideal = decode_ideal_bytes(cfg, 131072)
    assert 3 * GIB < ideal < 4 * GIB  # 2 MoE layers read 8 of 256 experts, not 7 GiB of them


def test_deleting_a_model_frees_its_params():
    """Compiled functions are module-level with a static config: they keep no Model (and no
    param arrays) alive. (The fixture's config and token shape: the compiled forward is reused.)"""
    import dsv32_jax
    from conftest import fixture_model, golden
    from dsv32_jax.checkpoint.weights import init_params

    cfg, tokens = fixture_model("tiny-fp8", "exact").config, golden("tiny-fp8", "exact")["tokens"]
    before = {id(a) for a in jax.live_arrays()}
    model = dsv32_jax.Model(cfg, init_params(cfg))
    np.asarray(model.logits(tokens))
    ref = weakref.ref(model)
    mine = [weakref.ref(a) for a in jax.tree.leaves(model.params)]
    del model
    gc.collect()
    assert ref() is None
    assert all(r() is None for r in mine)
    left = [a for a in jax.live_arrays() if id(a) not in before and a.size > 1000]
    assert not left, [(a.shape, a.dtype) for a in left]
