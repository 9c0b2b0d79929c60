"""benchmarks/kernels.py runs: the --quick table on CPU, and the GPU session's --gpu-all script
on tiny shapes (checks pass, files written)."""

from __future__ import annotations

import json

from benchmarks import kernels


def test_quick_table_prints(capsys):
    assert kernels.main(["--quick", "--repeats", "1", "--only", "topk", "sparse_mla"]) == 0
    out = capsys.readouterr().out
    assert "INTERPRETED" in out and "| sparse_mla | decode |" in out and "xla lax.top_k" in out


def test_gpu_all_script_on_tiny_shapes(tmp_path):
    assert kernels.main(["--quick", "--gpu-all", "--repeats", "1", "--only", "topk",
                         "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "kernels.json").read_text())
    assert len(res["checks"]) == 9 and all(c["ok"] for c in res["checks"])
    assert res["table"] and all(r["kernel"] == "topk" for r in res["table"])
    assert "Block sweep" in (tmp_path / "kernels.md").read_text()


def test_session_plan_fits_its_budget(capsys):
    """The one device call's released plan (not run): stable unique names, most valuable first,
    and its core rows' estimated H100 cost inside the default budget -- the dry run exits 1 when
    they are not (a row added to the core without room fails here)."""
    from benchmarks import session

    rows = session.plan(quick=False, repeats=5)
    names = [r.name for r in rows]
    assert len(set(names)) == len(names)
    groups = [n.split("/")[0] for n in names]
    first = {g: groups.index(g) for g in ("check", "model", "sparse_mla", "fp8_linear", "sweep")}
    assert list(first.values()) == sorted(first.values())
    assert "model/3L/decode/B=1 T=131072/attention=pallas matmul=pallas" in names
    core = sum(r.est_s for r in rows if r.core) + session.ESTIMATE["start"]
    assert core <= 390 and sum(r.est_s for r in rows) > 390  # the extras are what gets skipped
    assert session.main(["--dry-run"]) == 0
    assert session.main(["--dry-run", "--budget-s", str(core - 1)]) == 1
    assert "deviceless: sparse_mla/DECODE/B=1 S=1 T=131072" in capsys.readouterr().out


def test_session_skips_what_does_not_fit(tmp_path):
    """With no budget left every row is recorded as skipped (nothing runs), the file is complete."""
    from benchmarks import session

    rows = session.plan(quick=True, repeats=1)
    res = session.run(rows, session.Budget(0.0), tmp_path, "test")
    saved = json.loads((tmp_path / "session.json").read_text())
    assert saved["complete"] and list(saved["rows"]) == [r.name for r in rows]
    assert all("skipped" in r and "s" not in r for r in res["rows"].values())


def test_session_quick_runs_model_and_kernel_rows(tmp_path):
    """The one-call script on CPU at tiny shapes: the model's decode rows run the Pallas
    attention and matmul path end to end and match the all-XLA logits on the same random cache;
    a kernel row is timed. (The check rows are the functions test_gpu_all_script_on_tiny_shapes
    runs.)"""
    from benchmarks import session

    rows = session.plan(quick=True, repeats=1)
    keep = [r for r in rows if r.name.startswith("model/3L/decode") and r.core
            or r.name == "sparse_mla/DECODE/B=2 S=1 T=64"]
    assert len(keep) == 3
    res = session.run(keep, session.Budget(600.0), tmp_path, "test")["rows"]
    pallas = res["model/3L/decode/B=1 T=256/attention=pallas matmul=pallas"]
    assert "error" not in pallas and pallas["logits_err_vs_xla"] < 0.05, pallas
    assert res["sparse_mla/DECODE/B=2 S=1 T=64"]["pallas_ms"] > 0
    assert "| model/3L/decode" in (tmp_path / "session.md").read_text()


def test_device_inputs_are_valid():
    """Inputs made on the device: FP8 from random bytes is never NaN (every byte pattern drawn
    at this size), a slab repeats over the leading dims, top-k slots are distinct and in range."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = kernels.random_fp8(jax.random.key(0), (4, 64, 128)).astype(jnp.float32)
    assert not bool(jnp.any(jnp.isnan(x))) and float(jnp.max(jnp.abs(x))) < 2
    w = kernels.random_fp8(jax.random.key(1), (3, 8, 16), slab=2)
    assert bool(jnp.all(w == w[0])) and not bool(jnp.all(w[0] == w[0, 0]))
    idx = np.asarray(kernels.mla_inputs(kernels.TINY, 2, 3, 40)[2])
    assert idx.shape == (2, 3, 16) and idx.min() >= 0 and idx.max() < 40
    assert all(len(set(r)) == 16 for r in idx.reshape(-1, 16))
