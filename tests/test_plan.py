"""The memory planner (`sharding.plan`, `dsv32 plan`): its weight and cache bytes against what the
loader really allocates on 8 simulated devices, its activation/workspace estimate against XLA's
compiled temp memory, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from conftest import xla_env
from dsv32_jax.checkpoint.weights import abstract_params, flatten
from dsv32_jax.cli import main
from dsv32_jax.model.config import preset
from sharding.plan import H100, H200, meshes, parse_bytes, plan, search

# (mesh, batch): (1,1,8) puts 8 tensor shards on the tiny config's 4 heads (replicated fallback);
# batch 3 over 2 data groups is replicated too
LOADS = (((1, 8, 1), 2), ((1, 1, 8), 2), ((2, 2, 2), 3), ((2, 4, 1), 4))
CONTEXT = 128

LOAD_SCRIPT = textwrap.dedent("""
    import collections, json, sys
    import jax
    import dsv32_jax
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from dsv32_jax.model.config import preset
    from dsv32_jax.model.transformer import init_cache
    from sharding import make_mesh
    assert len(jax.devices()) == 8, jax.devices()
    path, loads, context = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    write_checkpoint(preset("tiny"), path)
    out = []
    for mesh_shape, batch in loads:
        mesh = make_mesh(*mesh_shape)
        model = dsv32_jax.load_model(path, mesh=mesh, weights="narrow")  # an accelerator's widths
        weights = collections.defaultdict(collections.Counter)
        for leaf in jax.tree.leaves(model.params):
            for sh in leaf.addressable_shards:
                weights[sh.device.id][str(sh.data.dtype)] += sh.data.nbytes
        with jax.set_mesh(mesh):
            cache = init_cache(model.config, batch, context)
        caches = collections.Counter()
        for leaf in jax.tree.leaves(cache):
            for sh in leaf.addressable_shards:
                caches[sh.device.id] += sh.data.nbytes
        out.append({"weights": {str(d): dict(c) for d, c in weights.items()},
                    "cache": {str(d): n for d, n in caches.items()}})
    print(json.dumps(out))
""")


def test_weights_and_cache_equal_what_the_loader_allocates(tmp_path):
    """A synthetic tiny checkpoint loaded with load_model(mesh=) on 8 simulated CPU devices: every
    device's param bytes (by dtype) and cache bytes equal the plan's, for four meshes."""
    env = xla_env(8)
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "ckpt"),
                           json.dumps(LOADS), str(CONTEXT)],
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode:
        pytest.fail(proc.stderr[-3000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = preset("tiny")
    names = {"float8_e4m3fn": "fp8", "bfloat16": "bf16", "float32": "f32"}
    for (mesh, batch), real in zip(LOADS, got):
        p = plan(cfg, mesh, CONTEXT, batch)
        assert sorted(real["weights"]) == [str(i) for i in range(8)]
        for dev, by_dtype in real["weights"].items():
            assert {names[k]: v for k, v in by_dtype.items()} == \
                {k: v for k, v in p.weights.items() if k != "total" and v}, (mesh, dev)
        assert set(real["cache"].values()) == {p.cache}, (mesh, batch, real["cache"])
    # the replicated fallback is exercised: 4 heads on 8 tensor shards stay whole
    full = sum(s.nbytes for s in flatten(abstract_params(cfg)).values())
    assert plan(cfg, (1, 1, 8), CONTEXT, 2).weights["total"] > full / 8


def _compiled_temp(cfg, context: int, batch: int, queries: int) -> int:
    from benchmarks.memory import abstract
    from dsv32_jax.engine.generate import forward
    from dsv32_jax.model.transformer import init_cache

    cache = jax.eval_shape(lambda: init_cache(cfg, batch, context))
    i32 = jax.ShapeDtypeStruct((batch, queries), jnp.int32)
    low = forward.lower(abstract(cfg), i32, i32, cache, jax.ShapeDtypeStruct((batch,), jnp.int32),
                        cfg=cfg)
    return int(low.compile().memory_analysis().temp_size_in_bytes)


def test_activation_estimate_against_compiled_temp():
    """The activations + workspace estimate against XLA's `temp_size_in_bytes` of the compiled
    forward (one device, `small` preset, context 4096, batch 2).

    XLA:CPU's temp is not the GPU's: it widens FP8 / bf16 operands to f32 per op (whole weight
    matrices included) and fuses differently, and the plan leaves out XLA's own small temporaries.
    So the check is a stated factor, not equality: for the prefill chunk (the phase the plan counts
    for every realistic shape) the estimate is within 0.98x..1.33x of the compiled temp (measured:
    1.154x; the bar leaves 15% either way). A decode step's compiled temp (measured 30 MB, mostly
    the widened weights and XLA scratch that do not scale with batch or context) must stay below
    the plan's peak, which is what the plan reserves."""
    cfg, context, batch = preset("small"), 4096, 2
    p = plan(cfg, (1, 1, 1), context, batch)
    assert p.phase == "prefill"
    estimate = p.phases["prefill"]["total"]
    temp = _compiled_temp(cfg, context, batch, 512)
    assert 0.98 <= estimate / temp <= 1.33, (estimate, temp)
    assert _compiled_temp(cfg, context, batch, 1) <= sum(p.activations.values()) + \
        sum(p.workspace.values())


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dsv32_jax.checkpoint.weights import abstract_params
    from dsv32_jax.engine.generate import forward
    from dsv32_jax.model.config import preset
    from dsv32_jax.model.transformer import init_cache
    from dsv32_jax.shardings import cache_shardings, param_shardings
    from sharding import make_mesh
    mesh_shape, batch, context, queries = json.loads(sys.argv[1])
    cfg, mesh = preset("small"), make_mesh(*mesh_shape)
    specs = abstract_params(cfg)
    params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), specs,
                          param_shardings(specs, mesh), is_leaf=lambda x: hasattr(x, "names"))
    with jax.set_mesh(mesh):
        cache = jax.eval_shape(lambda: init_cache(cfg, batch, context))
    cache = jax.tree.map(lambda c, s: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=s), cache,
                         cache_shardings(cache, mesh))
    rows = NamedSharding(mesh, P("data"))
    tok = jax.ShapeDtypeStruct((batch, queries), jnp.int32, sharding=rows)
    last = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    with jax.set_mesh(mesh):
        mem = forward.lower(params, tok, tok, cache, last, cfg=cfg).compile().memory_analysis()
    print(json.dumps({"args": int(mem.argument_size_in_bytes), "temp": int(mem.temp_size_in_bytes)}))
""")


def test_sharded_estimate_against_compiled_temp():
    """The same check on a mesh (data 2 x expert 4, 8 simulated devices, `small`, batch 4, context
    1024, a 512-token prefill chunk), where the expert-parallel buffers and the data split count:
    XLA's per-device argument bytes are exactly the plan's weights + cache plus the step's inputs
    (tokens, positions, last), and the prefill estimate is within 1.12x..1.51x of the per-device
    compiled temp (measured: 1.317x, jax 0.10.2; the bar leaves 15% either way, as above; the
    estimate sums buffers that XLA does not hold all at once, and omitting the expert-parallel
    buffers (1.083x) fails it. XLA:CPU caveats as above)."""
    mesh, batch, context, queries = (2, 4, 1), 4, 1024, 512
    env = xla_env(8)
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT,
                           json.dumps([mesh, batch, context, queries])],
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode:
        pytest.fail(proc.stderr[-3000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    p = plan(preset("small"), mesh, context, batch)
    local = batch // mesh[0]
    inputs = 2 * local * queries * 4 + local * 4
    assert got["args"] == p.weights["total"] + p.cache + inputs
    assert 1.12 <= p.phases["prefill"]["total"] / got["temp"] <= 1.51, (p.phases["prefill"], got)


def test_parse_bytes_and_meshes():
    assert parse_bytes("141GB") == 141 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("141e9") == 141 * 10**9
    assert parse_bytes("1.5 TB") == 15 * 10**11
    assert parse_bytes("512") == 512
    for bad in ("", "GB", "-1GB", "12XB", "1e-9", "nan", "inf"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)
    assert len(meshes(8)) == 10 and all(d * e * t == 8 for d, e, t in meshes(8))


def test_experts_a_mesh_does_not_divide_are_planned_not_refused():
    """256 experts on 3, 6 or 12 devices: never a problem, the experts split over the largest part
    of the mesh that divides them and replicated over the rest, and the plan counts those bytes
    (none of these fits an H200: at best 64 experts per device) and says the layout."""
    cfg = preset("671b")
    specs = flatten(abstract_params(cfg))
    experts = sum(s.nbytes for p, s in specs.items() if "experts" in p)
    for n in (3, 6, 12):
        assert all(not p.problems and not p.fits for p in search(cfg, n, 4096, 1, int(H200)))
    for mesh, ways in (((1, 3, 1), 1), ((2, 3, 1), 2), ((4, 3, 1), 4), ((1, 4, 1), 4)):
        p = plan(cfg, mesh, 4096, 1, int(H200))
        assert not p.problems
        assert experts / ways <= p.weights["total"] < experts / ways + 30e9, (mesh, p.weights)
    assert plan(cfg, (4, 3, 1), 4096, 1).experts == (
        "256 routed experts over 12 devices: split 4 ways over data (64 per device), replicated "
        "over expert (3 copies)")


def test_cli_says_the_expert_layout(capsys, tmp_path):
    """`dsv32 plan` on a checkpoint config with 12 experts and a mesh of 8: the layout, no refusal."""
    (tmp_path / "config.json").write_text(json.dumps(
        preset("tiny", n_routed_experts=12, n_expert_groups=4).to_hf()))
    rc, out, _ = run_cli(capsys, "--config", str(tmp_path), "--mesh", "2,2,2", "--context", "128",
                         "--device-memory", "1GiB")
    assert rc == 0 and "FITS" in out and "cannot run" not in out
    assert ("12 routed experts over 8 devices: split 4 ways over expert x tensor (3 per device), "
            "replicated over data (2 copies)") in out
    rc, out, _ = run_cli(capsys, "--config", str(tmp_path), "--mesh", "2,2,2", "--context", "128",
                         "--json")
    assert json.loads(out)["plan"]["experts"].startswith("12 routed experts over 8 devices: split 4")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, message", [
    (("--device-memory", "lots"), "memory size 'lots'"),
    (("--device-memory", "0GB"), "at least 1 byte"),
    (("--mesh", "1,2"), "three integers"),
    (("--mesh", "2,2,2", "--devices", "4"), "has 8 devices"),
    (("--batch", "0"), "--batch must be"),
    (("--context", "-5"), "--context must be"),
    (("--headroom", "1.5"), "--headroom"),
    (("--capacity-factor", "0"), "--capacity-factor"),
])
def test_cli_argument_errors_are_one_line_exit_2(capsys, argv, message):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("dsv32 plan: error:")


def test_cli_xla_gpu_needs_the_gpu_venv_and_the_released_config(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DSV32_GPU_VENV", str(tmp_path / "missing"))
    rc, out, err = run_cli(capsys, "--mesh", "1,1,8", "--context", "4096", "--xla-gpu")
    assert rc == 1 and out == "" and err.count("\n") == 1 and "make gpu-venv" in err
    rc, out, err = run_cli(capsys, "--config", "tiny", "--devices", "2", "--xla-gpu")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "--config 671b" in err


def test_cli_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--devices", "eight"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_bad_config_path_is_a_user_error(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--config", str(tmp_path / "missing"))
    assert rc == 1 and err.count("\n") == 1 and "no such file" in err


def test_cli_671b_on_8_h200_fits_and_on_8_h100_does_not(capsys):
    """Derived from the byte counts: the FP8 experts alone are (all FP8 params minus the non-expert
    ones) / 8 devices; on an H100 that exceeds 90% of 80 GB, on an H200 the whole plan fits."""
    cfg = preset("671b")
    specs = flatten(abstract_params(cfg))
    experts = sum(s.nbytes for p, s in specs.items() if "experts" in p)
    assert experts / 8 > 0.9 * H100  # 655 GB of routed experts: no 8 x H100 mesh can fit them

    common = ("--config", "671b", "--devices", "8", "--context", "131072", "--batch", "1", "--json")
    rc, out, _ = run_cli(capsys, *common, "--device-memory", "141GB")
    assert rc == 0
    res = json.loads(out)
    best = res["plan"]
    assert best["fits"] and best["devices"] == 8 and best["total"] <= 0.9 * H200
    assert best["weights"]["total"] >= experts / 8 and best["cache"] > 0
    assert best["total"] == (best["weights"]["total"] + best["cache"] + best["activations_total"]
                             + best["workspace_total"])
    assert [m["mesh"] for m in res["meshes"]][0] == [best["mesh"][k] for k in ("data", "expert",
                                                                             "tensor")]
    assert res["smallest"]["H200"]["devices"] == 8
    assert res["smallest"]["H100"]["devices"] == 16  # 8 cannot hold the experts (above)

    rc, out, _ = run_cli(capsys, *common, "--device-memory", "80GB")
    res = json.loads(out)
    assert rc == 0 and not res["plan"]["fits"] and not any(m["fits"] for m in res["meshes"])


def test_cli_table_and_fixed_mesh(capsys):
    rc, out, _ = run_cli(capsys, "--config", "671b", "--mesh", "1,8,1", "--context", "131072",
                         "--device-memory", "141GB")
    assert rc == 0
    for word in ("weights FP8", "cache", "activations", "workspace", "total", "FITS"):
        assert word in out
    assert "smallest H100" not in out  # a fixed mesh: no search
    rc, out, _ = run_cli(capsys, "--config", "tiny", "--devices", "4", "--context", "128",
                         "--device-memory", "1GiB")
    assert rc == 0 and "smallest H100" in out and "meshes of 4 devices" in out


def test_search_ranks_fitting_meshes_by_free_memory():
    cfg = preset("671b")
    ranked = search(cfg, 8, 131072, 1, int(H200))
    fitting = [p for p in ranked if p.fits]
    assert fitting and fitting[0].free == max(p.free for p in fitting)
    # batch 32 with exact expert-parallel capacity: the send buffers hold every pick of the chunk
    p = plan(cfg, (8, 1, 1), 131072, 32)
    assert p.workspace["expert_parallel"] > 6 * 32 * 512 * cfg.n_activated_experts * cfg.dim * 2
