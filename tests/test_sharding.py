"""Sharded runs on 8 simulated CPU devices: results equal unsharded ones, every param and cache
has its intended sharding, no FP8 weight is all-gathered, no device holds all experts.

XLA_FLAGS must be set before jax starts, so the sharded checks run in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from conftest import fixture_dir, xla_env
from dsv32_jax.checkpoint.synthetic import write_checkpoint
from dsv32_jax.checkpoint.weights import abstract_params, flatten
from dsv32_jax.model.config import Config, preset
from sharding import RULES, fit, shard_shape
from sharding.expert_parallel import capacity
from sharding.mesh import parse_mesh
from sharding.rules import EVERY_DEVICE, expert_axes, expert_layout, mesh_axes

MESHES = [(1, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2), (1, 2, 4), (8, 1, 1)]
SHAPE = {"data": 2, "expert": 2, "tensor": 2}


def test_every_logical_axis_has_a_rule():
    known = {name for name, _ in RULES}
    for path, spec in flatten(abstract_params(Config(), mtp=True)).items():
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
    assert fit(("heads",), (3,), SHAPE) == (None,)  # 3 heads on tensor 2


def test_experts_split_over_the_largest_part_of_the_mesh_that_divides_them():
    """E routed experts on a mesh whose device count does not divide E: split over the sub-tuple
    of mesh axes with the most devices that divides E (ties: fewer axes, then the innermost),
    replicated over the rest; never refused."""
    def shape(d, e, t):
        return {"data": d, "expert": e, "tensor": t}

    assert expert_axes(12, shape(2, 2, 2)) == ("expert", "tensor")  # 4 ways, 2 copies
    assert expert_axes(12, shape(1, 4, 2)) == ("expert",)
    assert expert_axes(12, shape(1, 2, 4)) == ("tensor",)
    assert expert_axes(12, shape(1, 1, 8)) == ()  # every device holds all 12
    assert expert_axes(256, shape(4, 3, 1)) == ("data",)  # 64 per device
    assert expert_axes(12, shape(4, 3, 1)) == EVERY_DEVICE  # 12 devices: 1 each
    assert expert_axes(256, shape(1, 8, 1)) == EVERY_DEVICE
    assert fit(("layers", "experts"), (3, 4), SHAPE) == (None, ("expert", "tensor"))
    assert shard_shape(("layers", "experts", "moe_mlp", "embed"), (2, 12, 16, 32),
                       shape(2, 2, 2)) == (2, 3, 16, 32)
    assert expert_layout(12, shape(2, 2, 2)) == ("12 routed experts over 8 devices: split 4 ways "
                                                 "over expert x tensor (3 per device), replicated "
                                                 "over data (2 copies)")
    assert expert_layout(7, shape(1, 1, 8)).endswith("every device holds all 7 (no part of the "
                                                     "mesh divides them)")
    assert expert_layout(256, shape(1, 8, 1)).endswith("split 8 ways over expert (32 per device)")


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
    greedy_on = json.loads(sys.argv[5])  # the meshes that also generate (all: null)
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
    generate = "logits_only" not in checks
    greedy = base.generate(prompts, 6, temperature=0, stop_tokens=[]) if generate else None
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
            "head_rows_per_device": max(s.data.shape[0] for s in
                                        params[("head", "weight")].addressable_shards),
            "cache_sharded_as_intended": bool(fresh_ok),
            "cache_spec": str(getattr(cache["moe_layers"].c.sharding, "spec", None)),
            "max_diff_over_std": float(np.abs(logits - ref).max() / ref.std()),
            "greedy_equal": (generate and (greedy_on is None or m in greedy_on) and
                             model.generate(prompts, 6, temperature=0, stop_tokens=[]) == greedy)}

    if "layout_line" in checks:  # what `dsv32 generate|chat --mesh` says after loading
        import argparse, contextlib, io
        from dsv32_jax.cli import common
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            args = argparse.Namespace(mesh=(2, 2, 2), dtype="float32", no_fp8=True, weights="auto",
                                      attention="xla")
            common.load_weights(path, args)
        out["layout_line"] = err.getvalue().splitlines()[-1]

    if "hlo" in checks:  # deployment numerics: bf16 + FP8 activations, FP8 weights
        hlo = {}
        for m in [(2, 2, 2), (1, 2, 4)]:  # expert, tensor and data axes; tensor 4
            model = dsv32_jax.load_model(path, mesh=on(m), weights="narrow")  # FP8 weights
            cfg, b = model.config, len(tokens)
            with on_mesh(model.params):
                cache = init_cache(cfg, b, 64)
                pos = np.broadcast_to(np.arange(16, dtype=np.int32), (b, 16))
                prefill = gen.forward.lower(model.params, tokens[:, :16], pos, cache, None,
                                            cfg=cfg).compile()
                decode = gen.forward.lower(model.params, tokens[:, :1], pos[:, :1], cache,
                                           np.zeros(b, np.int32), cfg=cfg).compile()
            # (out, in) of the FP8 weights: an all-gather of one (e4m3, or f16 as XLA:CPU widens
            # e4m3 for the collective) or a line that narrows its result back to e4m3 ends so
            # (FP8 activations, e.g. the indexer queries, end in their 128-wide blocks)
            w8 = {a.shape[-2:] for a in jax.tree.leaves(model.params)
                  if str(a.dtype) == "float8_e4m3fn"}

            def fp8_weight(line):
                out = re.search(r"= (.+?) [\\w-]+\\(", line).group(1)
                return any(dt in ("f8e4m3fn", "f16") and tuple(map(int, d.split(",")))[-2:] in w8
                           for dt, d in re.findall(r"(\\w+)\\[([\\d,]+)\\]", out))

            res = {}
            for name, exe in (("prefill", prefill), ("decode", decode)):
                text = exe.as_text()
                ops = [l for l in text.splitlines() if re.search(r"= [^=]*all-gather[.(-]", l)]
                coll = [l for l in text.splitlines() if re.search(
                    r"= [^=]*(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                    r"(-start)?\\(", l)]
                kept = exe.output_shardings[1]  # the cache the step returns: laid out as it came
                res[name] = {"fp8_all_gathers": sum(map(fp8_weight, ops)),
                             "indexer_collectives": sum("/index_topk/" in l for l in coll),
                             "all_to_alls": len(re.findall(r"all-to-all\\(", text)),
                             "cache_kept": all(kept[g].__dict__[k].is_equivalent_to(
                                 getattr(c, k).sharding, getattr(c, k).ndim)
                                 for g, c in cache.items() for k in KVCache.AXES)}
            hlo[str(m)] = res
        out["hlo"] = hlo

    if "paged" in checks:  # the serving engine's paged pools on a mesh, exact numerics
        from dsv32_jax.model.transformer import Transformer, variables
        from dsv32_jax.engine.step import pools
        from sharding.mesh import params_mesh
        b = len(tokens)

        def paged(model):  # 10 tokens (all positions < index_topk: the skip), then 30 (indexer)
            cfg, logits = model.config, []
            # the pool split over data: each group's sequences own pages 1, 2, ... of its block
            mesh = params_mesh(model.params)
            d = 1 if mesh is None else mesh.shape["data"]
            table = np.zeros((b, 4), np.int32)  # 4 pages: 256 logical slots > index_topk
            table[:, :2] = 1 + (np.arange(2 * b) % (2 * b // d)).reshape(b, 2)
            with on_mesh(model.params):
                pool = pools(cfg, d * (2 * b // d + 1))
                f = jax.jit(lambda p, t, pos, c: Transformer(cfg).apply(variables(p), t, pos, c))
                for lo, hi in ((0, 10), (10, 40)):
                    pos = np.broadcast_to(np.arange(lo, hi, dtype=np.int32), (b, hi - lo))
                    lg, c = f(model.params, tokens[:, lo:hi], pos,
                              {g: x.with_pages(table) for g, x in pool.items()})
                    pool = {g: x.with_pages(None) for g, x in c.items()}
                    logits.append(np.asarray(lg))
            return logits

        want = paged(base)
        out["paged"] = {}
        for m in [(2, 2, 2), (1, 2, 4)]:
            got = paged(dsv32_jax.load_model(path, mesh=on(m), **exact))
            out["paged"][str(m)] = [float(np.abs(g - w).max() / w.std()) for g, w in zip(got, want)]

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


def run_sharded(case: str, meshes, checks: str = "", greedy_on=None) -> dict:
    d = fixture_dir(case)
    with np.load(d / "golden_exact.npz") as z:
        tokens = z["tokens"].tolist()
    return run_on_meshes(d / "hf", tokens, meshes, checks, greedy_on)


def run_on_meshes(path, tokens, meshes, checks: str = "", greedy_on=None) -> dict:
    """`SCRIPT` on 8 simulated CPU devices: checkpoint `path`, token ids (B, S) as lists; greedy
    generation compared on the meshes `greedy_on` (None: all)."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), json.dumps(tokens),
                           json.dumps(meshes), checks, json.dumps(greedy_on)], capture_output=True,
                          text=True, env=xla_env(8), timeout=900)
    if proc.returncode:
        pytest.fail(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_sharded_equals_unsharded(case: str, meshes=MESHES, greedy_on=None) -> dict:
    """Exact numerics on each mesh: logits within 1e-5*std of one device, params and fresh caches
    laid out by the rules, each device holding 1 of the 8 experts; greedy tokens equal on the
    meshes `greedy_on` (None: all)."""
    res = run_sharded(case, meshes, greedy_on=greedy_on)
    generating = {str(tuple(m)) for m in (meshes if greedy_on is None else greedy_on)}
    for mesh, r in res["meshes"].items():
        assert r["wrong_param_shardings"] == [], (mesh, r)
        assert r["cache_sharded_as_intended"], (mesh, r)
        assert r["max_diff_over_std"] < 1e-5, (mesh, r)
        assert r["greedy_equal"] == (mesh in generating), (mesh, r)
        if mesh != "(1, 1, 1)":
            assert r["experts_per_device"] == 1, (mesh, r)  # never all 8 experts on one device
    assert res["meshes"]["(2, 2, 2)"]["cache_spec"] == str(PartitionSpec(None, "data"))
    return res


def test_sharded_equals_unsharded_fp8():
    """All six meshes; greedy decoding (a cache laid out on the mesh, prefill and decode steps) on
    two whose caches differ: whole (1,8,1), heads over tensor 4 (1,2,4). The third, the cache split
    over data on (2,2,2), decodes greedily in tests/test_multiprocess.py::
    test_two_processes_equal_the_reference (this checkpoint, exact numerics, mesh 2,2,2 over two
    processes: the golden greedy tokens) and tests/test_sharding_bf16.py (one process, bf16 weights)."""
    res = check_sharded_equals_unsharded("tiny-fp8", greedy_on=[[1, 8, 1], [1, 2, 4]])
    # tiny-bf16: tests/test_sharding_bf16.py
    assert res["meshes"]["(8, 1, 1)"]["cache_spec"] == str(PartitionSpec())  # batch 2 on 8: whole
    assert res["meshes"]["(1, 8, 1)"]["cache_spec"] == str(PartitionSpec())


def test_uneven_experts_heads_and_vocab_equal_one_device(tmp_path):
    """A checkpoint whose 12 routed experts 8 devices do not divide (once refused), 6 heads and
    an odd vocabulary (2051) loads on meshes of 8 and gives one device's logits (exact
    numerics): the experts split over the largest part of the mesh that divides 12
    (`rules.expert_axes`) and replicated over the rest, or held whole by every device; heads
    and vocabulary the tensor axis does not divide stay whole. The CLI says the layout."""
    cfg = preset("tiny", n_routed_experts=12, n_expert_groups=4, n_heads=6, vocab_size=2051,
                 n_layers=2)
    write_checkpoint(cfg, tmp_path / "ck")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).tolist()
    meshes = [(2, 2, 2), (1, 1, 8)]  # (1,4,2), split over expert alone: expert_axes' unit test
    res = run_on_meshes(tmp_path / "ck", tokens, meshes, "layout_line,logits_only")
    for m, per_device in zip(meshes, [3, 12]):
        r = res["meshes"][str(m)]
        assert r["wrong_param_shardings"] == [], (m, r)
        assert r["max_diff_over_std"] < 1e-5, (m, r)
        assert r["experts_per_device"] == per_device, (m, r)
        assert r["head_rows_per_device"] == cfg.vocab_size, (m, r)  # 2051: no tensor size divides
    tensor8 = {"data": 1, "expert": 1, "tensor": 8}
    assert fit(("batch", "seq", "heads", None), (2, 24, 6, 64), tensor8)[2] is None  # 6 heads on 8
    assert res["layout_line"] == ("12 routed experts over 8 devices: split 4 ways over expert x "
                                  "tensor (3 per device), replicated over data (2 copies)")


EP_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, jax, jax.numpy as jnp
    from flax import linen as nn
    from dsv32_jax.checkpoint.weights import rngs
    from dsv32_jax.model.config import preset
    from dsv32_jax.model.moe import Experts
    from sharding import make_mesh
    from sharding.mesh import sharding_for

    AXES = ("layers", "experts", "moe_mlp", "embed")  # every routed-expert tensor's logical axes
    out = []
    for n_exp, k, shape, tokens, grad in json.loads(sys.argv[1]):
        cfg = preset("tiny", dim=32, moe_inter_dim=16, n_layers=3, n_dense_layers=1,
                     n_routed_experts=n_exp, n_activated_experts=k, n_expert_groups=1,
                     n_limited_groups=1, weight_dtype="bf16", scale_fmt=None, dtype="float32",
                     fp8_activations=False)
        rng = np.random.default_rng(n_exp)
        x = jnp.asarray(rng.standard_normal((tokens, cfg.dim)), jnp.float32)
        picks = jnp.asarray(np.stack([rng.choice(n_exp, k, replace=False) for _ in range(tokens)]),
                            jnp.int32)
        w = jnp.asarray(rng.uniform(0.1, 1.0, picks.shape), jnp.float32)
        mod, layer = Experts(cfg), 1  # the second MoE layer's experts of the stack
        params = jax.tree.map(lambda a: a.astype(jnp.float32),  # f32 master weights, as trained
                              nn.unbox(mod.init(rngs(0), x, picks, w, layer)))
        probe = jnp.asarray(rng.standard_normal((tokens, cfg.dim)), jnp.float32)

        def loss(params, x):
            return jnp.sum(mod.apply(params, x, picks, w, layer) * probe)

        run = jax.jit(lambda p, x: (mod.apply(p, x, picks, w, layer),
                                    jax.grad(loss, argnums=(0, 1))(p, x) if grad else None))
        ref, ref_g = run(params, x)
        mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        sharded = jax.tree.map(lambda a: jax.device_put(a, sharding_for(mesh, AXES, a.shape)),
                               params)
        with jax.set_mesh(mesh):
            y, g = run(sharded, x)
        w1 = sharded["experts"]["w1_weight"]
        scale = float(np.std(ref))

        def rel(a, b):
            return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())

        out.append({"case": [n_exp, shape], "max_diff_over_std": float(np.abs(y - ref).max()) / scale,
                    "experts_per_device": {s.data.shape[1] for s in w1.addressable_shards}.pop(),
                    "distinct_expert_blocks": len({s.index[1].start for s in w1.addressable_shards})})
        if grad:  # d/d(expert weights), d/dx
            out[-1]["grad_diff"] = [max(rel(a, b) for a, b in zip(jax.tree.leaves(g[0]),
                                                                  jax.tree.leaves(ref_g[0]))),
                                    rel(g[1], ref_g[1])]
    print(json.dumps(out))
""")

# (experts, top_k, mesh, tokens, gradients too): 16 experts on 2, 4 and 8 devices (local expert ids
# 0..7, 0..3, 0..1), the released 256 on 8 (32 per device) at tiny widths, and 12 experts that 8
# devices do not divide (split 4 ways over expert x tensor, replicated over data); 12 on (1,4,2)
# and (1,2,4) run end to end in `test_uneven_experts_heads_and_vocab_equal_one_device`
EP_CASES = [(16, 4, (1, 2, 1), 13, False), (16, 4, (2, 1, 2), 13, False),
            (16, 4, (2, 2, 2), 21, True), (256, 8, (1, 8, 1), 21, False),
            (12, 2, (2, 2, 2), 13, True)]


def test_expert_parallel_with_several_experts_per_device():
    """The routed experts alone (`moe.Experts`, tiny widths) on a mesh equal one device: output,
    and the gradients of the expert weights and of the input (the training path: experts
    replicated over an axis sum their replicas' gradients). Several experts per device, so a
    wrong local expert id inside the shard_map (a global id, or the wrong device's block) breaks
    it; token counts that the devices do not divide."""
    env = xla_env(8)
    proc = subprocess.run([sys.executable, "-c", EP_SCRIPT, json.dumps(EP_CASES)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        pytest.fail(proc.stderr[-4000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for (n_exp, *_, grad), want, r in zip(EP_CASES, [8, 4, 2, 32, 3], res):
        assert r["max_diff_over_std"] < 1e-5, r
        if grad:
            assert max(r["grad_diff"]) < 1e-5, r
        assert r["experts_per_device"] == want, r
        assert r["distinct_expert_blocks"] == n_exp // want, r  # the rest are replicas


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
