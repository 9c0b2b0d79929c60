"""Expert/tensor sharding on 8 simulated CPU devices: sharded results equal unsharded ones.

XLA_FLAGS must be set before jax starts, so the check runs in a subprocess."""

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
from dsv32_jax.model.config import Config
from dsv32_jax.checkpoint.weights import abstract_params, flatten
from sharding import RULES, logical_specs

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    import dsv32_jax
    from sharding import make_mesh
    path, tokens = sys.argv[1], np.array(json.loads(sys.argv[2]))
    assert len(jax.devices()) == 8, jax.devices()
    base = dsv32_jax.load_model(path, dtype="float32", fp8_activations=True)
    sharded = dsv32_jax.load_model(path, dtype="float32", fp8_activations=True,
                                   mesh=make_mesh(expert=4, tensor=2))
    w = sharded.params["moe_layers"]["ffn"]["experts"]["w1_weight"]
    wq = sharded.params["dense_layers"]["attn"]["wq_b"]["weight"]
    a, b = np.asarray(base.logits(tokens)), np.asarray(sharded.logits(tokens))
    prompts = [list(map(int, r[:20])) for r in tokens]
    ga = base.generate(prompts, 6, temperature=0, stop_tokens=[])
    gb = sharded.generate(prompts, 6, temperature=0, stop_tokens=[])
    print(json.dumps({"expert_spec": str(w.sharding.spec), "n_shards": len(w.addressable_shards),
                      "shard_shape": list(w.addressable_shards[0].data.shape),
                      "wq_spec": str(wq.sharding.spec),
                      "max_diff_over_std": float(np.abs(a - b).max() / a.std()),
                      "greedy_equal": ga == gb}))
""")


def test_every_logical_axis_has_a_rule():
    known = {name for name, _ in RULES}
    specs = flatten(abstract_params(Config()))
    for path, spec in specs.items():
        assert len(spec.names) == len(spec.shape), path
        assert set(spec.names) <= known, (path, spec.names)
    pspecs = flatten(logical_specs(abstract_params(Config())))
    assert tuple(pspecs[("moe_layers", "ffn", "experts", "w1_weight")]) == (None, "expert", None, None)
    assert tuple(pspecs[("dense_layers", "attn", "wq_b", "weight")]) == (None, "tensor", None)


def test_sharded_equals_unsharded():
    case = fixture_dir("tiny-fp8")
    with np.load(case / "golden_fp32.npz") as z:
        tokens = z["tokens"].tolist()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(case / "hf"), json.dumps(tokens)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        pytest.fail(proc.stderr[-3000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["expert_spec"] == str(PartitionSpec(None, "expert", None, None))
    assert res["n_shards"] == 8 and res["shard_shape"][1] == 2  # 8 experts over 4 expert shards
    assert res["wq_spec"] == str(PartitionSpec(None, "tensor", None))
    assert res["max_diff_over_std"] < 1e-5, res
    assert res["greedy_equal"], res
