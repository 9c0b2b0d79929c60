"""Sharded runs on 8 simulated CPU devices: results equal unsharded ones, every param and cache
has its intended sharding, no FP8 weight is all-gathered, no device holds all experts.

XLA_FLAGS must be set before jax starts, so the sharded checks run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from conftest import REPO, fixture_dir
from dsv32_jax.checkpoint.weights import abstract_params, flatten
from dsv32_jax.model.config import Config, preset
from sharding import RULES, fit, shard_shape
from sharding.expert_parallel import capacity
from sharding.mesh import parse_mesh
from sharding.rules import EVERY_DEVICE, mesh_axes

MESHES = [(1, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2), (1, 2, 4), (8, 1, 1)]
SHAPE = {"data": 2, "expert": 2, "tensor": 2}


def test_every_logical_axis_has_a_rule():
    known = {name for name, _ in RULES}
    for path, spec in flatten(abstract_params(Config())).items():
        assert len(spec.names) == len(spec.shape), path
        assert set(spec.names) <= known, (path, spec.names)
    with pytest.raises(KeyError, match="no entry"):
        mesh_axes(("nonsense",))


def test_released_layout_on_a_mesh():
    specs = flatten(abstract_params(Config()))
    mesh = {"data": 1, "expert": 8, "tensor": 1}
    w1 = specs[("moe_layers", "ffn", "experts", "w1_weight")]
    assert fit(w1.names, w1.shape, mesh) == (None, EVERY_DEVICE, None, None)
    assert shard_shape(w1.names, w1.shape, mesh) == (58, 32, 2048, 7168)  # 32 of 256 experts
    wq = specs[("dense_layers", "attn", "wq_b", "weight")]
    assert fit(wq.names, wq.shape, {"data": 1, "expert": 1, "tensor": 8}) == (None, "tensor", None)
    gate = specs[("moe_layers", "ffn", "gate_weight")]
    assert fit(gate.names, gate.shape, mesh) == (None, None, None)  # every device routes
    head = specs[("head", "weight")]
    assert shard_shape(head.names, head.shape, {"data": 1, "expert": 1, "tensor": 8}) == (16160, 7168)


def test_fit_replicates_what_the_mesh_does_not_divide():
    assert fit(("batch", "seq", "embed"), (2, 5, 7), SHAPE) == ("data", None, None)
    assert fit(("batch", "seq", "embed"), (1, 5, 7), SHAPE) == (None, None, None)  # batch 1
    assert fit(("vocab", "embed"), (1001, 16), SHAPE) == (None, None)  # vocab not divisible
    assert fit(("layers", "experts"), (3, 8), SHAPE) == (None, EVERY_DEVICE)
    assert fit(("layers", "experts"), (3, 4), SHAPE) == (None, None)


def test_capacity():
    assert capacity(64, 8, 32, 8, None) == 64 * 8  # exact: every pick may go to one device
    assert capacity(64, 8, 4, 64, None) == 64 * 4  # a device holds 4 experts: at most 4 picks
    assert capacity(64, 8, 32, 8, 1.0) == 64  # the mean load
    assert capacity(64, 8, 32, 8, 100.0) == 64 * 8  # never above the exact bound
    assert capacity(1, 8, 32, 8, 0.01) == 1


def test_parse_mesh():
    assert parse_mesh("1,8,1") == (1, 8, 1)
    for bad in ("8", "1,8", "a,b,c", "0,8,1"):
        with pytest.raises(ValueError, match="data,expert,tensor"):
            parse_mesh(bad)


SCRIPT = textwrap.dedent("""
    import dataclasses, json, re, sys
    import numpy as np, jax
    import dsv32_jax
    from dsv32_jax.checkpoint.weights import abstract_params, flatten
    from dsv32_jax.engine import generate as gen
    from dsv32_jax.model.cache import KVCache
    from dsv32_jax.model.transformer import init_cache
    from sharding import make_mesh, on_mesh
    from sharding.mesh import sharding_for

    path, tokens = sys.argv[1], np.array(json.loads(sys.argv[2]))
    meshes, checks = json.loads(sys.argv[3]), sys.argv[4].split(",")
    assert len(jax.devices()) == 8, jax.devices()
    exact = dict(dtype="float32", fp8_activations=False)
    prompts = [list(map(int, r[:20])) for r in tokens]
    lengths = np.full(len(tokens), tokens.shape[1], np.int32)

    def same(a, want):
        return a.sharding.is_equivalent_to(want, a.ndim)

    def on(m):
        n = int(np.prod(m))
        return make_mesh(*m, devices=jax.devices()[:n])

    base = dsv32_jax.load_model(path, **exact)
    ref = np.asarray(base.logits(tokens))
    greedy = base.generate(prompts, 6, temperature=0, stop_tokens=[])
    out = {"meshes": {}}
    for m in meshes:
        mesh = on(m)
        model = dsv32_jax.load_model(path, mesh=mesh, **exact)
        specs, params = flatten(abstract_params(model.config)), flatten(model.params)
        wrong = ["/".join(p) for p, a in params.items()
                 if not same(a, sharding_for(mesh, specs[p].names, specs[p].shape))]
        w1 = params[("moe_layers", "ffn", "experts", "w1_weight")]
        with on_mesh(model.params):
            cache = init_cache(model.config, len(tokens), 64)
        want = {g: {k: sharding_for(mesh, KVCache.AXES[k], getattr(c, k).shape) for k in KVCache.AXES}
                for g, c in cache.items()}
        fresh_ok = all(same(getattr(c, k), want[g][k]) for g, c in cache.items() for k in KVCache.AXES)
        logits = np.asarray(model.logits(tokens))
        out["meshes"][str(tuple(m))] = {
            "wrong_param_shardings": wrong,
            "experts_per_device": max(s.data.shape[1] for s in w1.addressable_shards),
            "cache_sharded_as_intended": bool(fresh_ok),
            "cache_spec": str(getattr(cache["moe_layers"].c.sharding, "spec", None)),
            "max_diff_over_std": float(np.abs(logits - ref).max() / ref.std()),
            "greedy_equal": model.generate(prompts, 6, temperature=0, stop_tokens=[]) == greedy}

    if "hlo" in checks:  # deployment numerics: bf16 + FP8 activations, FP8 weights
        hlo = {}
        for m in [(1, 8, 1), (2, 2, 2), (1, 2, 4)]:
            model = dsv32_jax.load_model(path, mesh=on(m))
            cfg, b = model.config, len(tokens)
            with on_mesh(model.params):
                cache = init_cache(cfg, b, 64)
                pos = np.broadcast_to(np.arange(16, dtype=np.int32), (b, 16))
                prefill = gen.forward.lower(model.params, tokens[:, :16], pos, cache, None,
                                            cfg=cfg).compile()
                decode = gen.forward.lower(model.params, tokens[:, :1], pos[:, :1], cache,
                                           np.zeros(b, np.int32), cfg=cfg).compile()
            res = {}
            for name, exe in (("prefill", prefill), ("decode", decode)):
                text = exe.as_text()
                ops = [l for l in text.splitlines() if re.search(r"= [^=]*all-gather[.(-]", l)]
                kept = exe.output_shardings[1]  # the cache the step returns: laid out as it came
                res[name] = {"fp8_all_gathers": sum("f8e4m3" in l for l in ops),
                             "all_to_alls": len(re.findall(r"all-to-all\\(", text)),
                             "cache_kept": all(kept[g].__dict__[k].is_equivalent_to(
                                 getattr(c, k).sharding, getattr(c, k).ndim)
                                 for g, c in cache.items() for k in KVCache.AXES)}
            hlo[str(m)] = res
        out["hlo"] = hlo

    if "capacity" in checks:  # a tight capacity drops picks, counted; the default drops none
        mesh = on((1, 8, 1))
        model = dsv32_jax.load_model(path, mesh=mesh, **exact)
        for factor in (None, 0.25):
            cfg = dataclasses.replace(model.config, ep_capacity_factor=factor)
            with on_mesh(model.params):
                cache = init_cache(cfg, len(tokens), tokens.shape[1])
                pos = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
                logits, _, inter = gen.forward(model.params, tokens, pos, cache, None, cfg=cfg,
                                               collect=True)
            dropped = int(np.asarray(inter["moe_layers"]["ffn"]["experts"]["moe_dropped"][0]).sum())
            out[f"capacity_{factor}"] = {
                "dropped": dropped,
                "max_diff_over_std": float(np.abs(np.asarray(logits) - ref).max() / ref.std())}
    print(json.dumps(out))
""")


def run_sharded(case: str, meshes, checks: str = "") -> dict:
    d = fixture_dir(case)
    with np.load(d / "golden_exact.npz") as z:
        tokens = z["tokens"].tolist()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(d / "hf"), json.dumps(tokens),
                           json.dumps(meshes), checks], capture_output=True, text=True, env=env,
                          timeout=900)
    if proc.returncode:
        pytest.fail(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_sharded_equals_unsharded(case: str) -> None:
    """Exact numerics on every mesh: logits within 1e-5*std of one device, greedy tokens equal,
    params and fresh caches laid out by the rules, each device holding 1 of the 8 experts."""
    res = run_sharded(case, MESHES)
    for mesh, r in res["meshes"].items():
        assert r["wrong_param_shardings"] == [], (mesh, r)
        assert r["cache_sharded_as_intended"], (mesh, r)
        assert r["max_diff_over_std"] < 1e-5, (mesh, r)
        assert r["greedy_equal"], (mesh, r)
        if mesh != "(1, 1, 1)":
            assert r["experts_per_device"] == 1, (mesh, r)  # never all 8 experts on one device
    assert res["meshes"]["(2, 2, 2)"]["cache_spec"] == str(PartitionSpec(None, "data"))
    assert res["meshes"]["(8, 1, 1)"]["cache_spec"] == str(PartitionSpec())  # batch 2 on 8: whole
    assert res["meshes"]["(1, 8, 1)"]["cache_spec"] == str(PartitionSpec())


def test_sharded_equals_unsharded_fp8():
    check_sharded_equals_unsharded("tiny-fp8")  # tiny-bf16: tests/test_sharding_bf16.py


def test_mesh_axes_are_checked(tmp_path):
    import jax

    import dsv32_jax
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from sharding import make_mesh

    cfg = preset("tiny")
    write_checkpoint(cfg, tmp_path / "ck")
    mesh = make_mesh(devices=jax.devices()[:1])
    wrong = jax.sharding.Mesh(mesh.devices.reshape(1, 1), ("expert", "tensor"))
    with pytest.raises(ValueError, match="mesh axes"):
        dsv32_jax.load_model(tmp_path / "ck", mesh=wrong)
