"""What the sharded program does, read off its compiled HLO on 8 simulated CPU devices (the
deployment numerics: bf16, FP8 weights and activations), and the expert-parallel capacity."""

from __future__ import annotations

from test_sharding import run_sharded


def test_compiled_sharded_forward():
    """Prefill and decode on meshes (2,2,2), (1,2,4): no FP8 weight is
    all-gathered, the routed experts are reached by all-to-all (rows and ids there, rows back),
    the indexer's top-k and its short-context skip (a 64-slot cache, index_topk 16: the
    `lax.cond`) run on each device's own sequences with no collective, and the cache comes back
    laid out as it went in. The paged cache (`dsv32 serve`) gives one device's logits on both
    meshes, below index_topk (the skip) and above it. A tight expert-parallel capacity drops
    picks and counts them; the default (exact) drops none and equals one device."""
    res = run_sharded("tiny-fp8", [], "hlo,capacity,paged,logits_only")
    for mesh, r in res["hlo"].items():
        for step in ("prefill", "decode"):
            assert r[step]["fp8_all_gathers"] == 0, (mesh, step, r)
            assert r[step]["indexer_collectives"] == 0, (mesh, step, r)
            assert r[step]["all_to_alls"] >= 3, (mesh, step, r)  # rows, ids there; rows back
            assert r[step]["cache_kept"], (mesh, step, r)
    for mesh, diffs in res["paged"].items():  # the serving engine's paged cache, on a mesh
        assert max(diffs) < 1e-5, (mesh, diffs)
    assert res["capacity_None"]["dropped"] == 0
    assert res["capacity_None"]["max_diff_over_std"] < 1e-5
    assert res["capacity_0.25"]["dropped"] > 0
    assert res["capacity_0.25"]["max_diff_over_std"] > 1e-3  # dropped picks change the result
