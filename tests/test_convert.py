"""`convert`: HF checkpoint -> Orbax, and `load_model` of the result.

- the golden fixtures converted in fp8 mode give bit-identical params and logits; in bf16 mode the
  weights are exactly the dequantized FP8 weights and the logits agree within bf16 rounding;
- the MTP layer, sharded restore, the Orbax metadata against what the installed Orbax writes;
- CLI, verify, --force, resume after an interruption;
- corrupt sources (truncated shard, missing tensor, wrong shape, wrong config) give clear errors
  and no output;
- memory: peak RSS of converting a ~1.2 GB synthetic checkpoint in a subprocess stays far below
  the checkpoint size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv32_jax
from convert import ConvertError, VerifyError, convert_checkpoint, verify_checkpoint
from convert.plan import SourceReader, plan_chunks
from dsv32_jax.model.config import Config, preset
from dsv32_jax.checkpoint.orbax_layout import (MTP_DIR, PARAMS_DIR, OrbaxCheckpointError, array_name, is_orbax_dir,
                                  load_config, read_manifest, restore_mtp, restore_params,
                                  write_tree_metadata)
from dsv32_jax.model.quant import dequant
from dsv32_jax.checkpoint.safetensors import INDEX_NAME, SafetensorsFile, ShardedCheckpoint, write_safetensors
from dsv32_jax.checkpoint.synthetic import tensor_specs, write_checkpoint
from dsv32_jax.checkpoint.weights import flatten

from conftest import REPO, fixture_dir, fixture_model, golden, row_cosine, row_error, xla_env

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
QUIET = dict(progress=False)


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _assert_bit_equal(tree_a: dict, tree_b: dict) -> None:
    fa, fb = flatten(tree_a), flatten(tree_b)
    assert sorted(fa) == sorted(fb)
    for p in fa:
        a, b = fa[p], fb[p]
        assert (a.shape, a.dtype) == (b.shape, b.dtype), p
        assert np.array_equal(_bits(a), _bits(b)), f"{'/'.join(p)} differs"


def _no_output(out) -> None:
    out = os.fspath(out)
    assert not os.path.exists(out), "an output directory was created"
    assert not os.path.exists(out + ".partial"), "a .partial directory was left for a bad source"


# ---- the golden fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{case: converted dir (fp8, MTP included)}, converted once per module."""
    root = tmp_path_factory.mktemp("conv")
    cache = {}

    def get(case: str) -> str:
        if case not in cache:
            out = root / case
            convert_checkpoint(fixture_dir(case) / "hf", out, include_mtp=True, **QUIET)
            cache[case] = str(out)
        return cache[case]

    return get


@pytest.mark.parametrize("case", ["tiny-fp8", "tiny-bf16"])
def test_fp8_mode_is_bit_identical(case, converted):
    out = converted(case)
    assert is_orbax_dir(out)
    hf_model = fixture_model(case, "bf16")
    model = dsv32_jax.load_model(out)  # default numerics, like the fixture model
    assert model.config == hf_model.config
    _assert_bit_equal(model.params, hf_model.params)
    leaf = jax.tree.leaves(model.params)[0]
    assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tokens = golden(case, "bf16")["tokens"]
    a, b = np.asarray(model.logits(tokens)), np.asarray(hf_model.logits(tokens))
    assert a.dtype == np.float32 and np.array_equal(a, b)


def test_fp8_mode_keeps_fp8_and_scales(converted):
    out = converted("tiny-fp8")
    m = read_manifest(out)
    assert m["options"]["weights"] == "fp8" and m["dsv32_jax_version"] == dsv32_jax.__version__
    dtypes = {tuple(leaf["path"]): leaf["dtype"] for leaf in m["params"]}
    assert dtypes[("moe_layers", "ffn", "experts", "w1_weight")] == "float8_e4m3fn"
    assert dtypes[("moe_layers", "ffn", "experts", "w1_scale")] == "float32"
    assert dtypes[("embed", "weight")] == "bfloat16"
    with open(fixture_dir("tiny-fp8") / "hf" / "config.json", "rb") as f, \
            open(os.path.join(out, "config.json"), "rb") as g:
        assert f.read() == g.read()  # copied unchanged
    hf_dir = fixture_dir("tiny-fp8") / "hf"
    sizes = {n: os.path.getsize(hf_dir / n) for n in os.listdir(hf_dir)}
    assert {n: v["size"] for n, v in m["source"]["files"].items()} == sizes
    with ShardedCheckpoint(hf_dir) as ck:
        assert m["tensor_count"] == len(ck.keys())  # every tensor, MTP included


def test_bf16_mode_dequantizes(tmp_path):
    case = "tiny-fp8"
    out = tmp_path / "bf16"
    manifest = convert_checkpoint(fixture_dir(case) / "hf", out, weights="bf16", **QUIET)
    with open(out / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    # HF dir, fp32, FP8 weights dequantized in the forward; both in the stored dtypes
    ref = fixture_model(case, "exact", weights="narrow")
    model = dsv32_jax.load_model(out, dtype="float32", fp8_activations=False, weights="narrow")
    assert model.config.weight_dtype == "bf16"
    assert model.config.scale_fmt == ref.config.scale_fmt == "ue8m0"  # activation numerics kept
    fa, fb = flatten(ref.params), flatten(model.params)
    assert not any(p[-1].endswith("scale") for p in fb)
    n_fp8 = 0
    for p, b in fb.items():
        a = fa[p]
        if a.dtype == FP8:
            n_fp8 += 1
            a = dequant(a, fa[p[:-1] + (p[-1].replace("weight", "scale"),)], jnp.bfloat16)
        assert b.dtype == a.dtype and np.array_equal(_bits(a), _bits(b)), p
    assert n_fp8 > 10
    assert manifest["params_bytes"] > read_manifest(_fp8_dir(tmp_path, case))["params_bytes"]
    # logits: bf16-rounded weights vs exact FP8 weights; discrete top-k / expert choices may flip
    # for a few rows, so compare the bulk statistically
    tokens = golden(case, "exact")["tokens"]
    a, b = np.asarray(ref.logits(tokens)), np.asarray(model.logits(tokens))
    err = row_error(b, a)
    assert np.median(err) < 0.02 and np.percentile(err, 90) < 0.05
    assert np.median(row_cosine(b, a)) > 0.9999
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95


def _fp8_dir(tmp_path, case):
    out = tmp_path / "fp8-nomtp"
    if not out.exists():
        convert_checkpoint(fixture_dir(case) / "hf", out, **QUIET)
    return out


def test_mtp_layer(converted, tmp_path):
    case = "tiny-fp8"
    out = converted(case)
    cfg = fixture_model(case, "bf16").config
    mtp = restore_mtp(out)
    flat = flatten(mtp)
    p = f"model.layers.{cfg.n_layers}."
    with ShardedCheckpoint(fixture_dir(case) / "hf") as ck:
        names = [n for n in ck.keys() if n.startswith(p)]
        checked = 0
        for path, arr in flat.items():
            arr = np.asarray(arr)
            assert arr.shape[0] == cfg.n_mtp_layers == 1
            if path[:3] == ("block", "ffn", "experts"):
                proj = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}[path[3].split("_")[0]]
                leaf = "weight" if path[3].endswith("weight") else "weight_scale_inv"
                srcs = [f"{p}mlp.experts.{e}.{proj}.{leaf}" for e in range(cfg.n_routed_experts)]
                want = np.stack([np.asarray(ck.get(n)) for n in srcs])
                checked += len(srcs)
            elif path[0] == "block":
                continue  # mapped like moe_layers (tested through the model params)
            else:
                name = p + ".".join(path[:-1]) + "." + {"scale": "weight_scale_inv"}.get(path[-1], path[-1])
                want = np.asarray(ck.get(name))
                checked += 1
            assert np.array_equal(_bits(arr[0]), _bits(want)), path
        assert {"eh_proj", "enorm", "hnorm", "shared_head", "embed_tokens", "block"} <= set(mtp)
        assert read_manifest(out)["tensor_count"] == len(ck.keys())
        assert checked > 3 * cfg.n_routed_experts and len(names) > checked
    from dsv32_jax.engine.runner import load_mtp  # the HF loader's MTP tree: the same arrays

    hf_mtp = flatten(load_mtp(fixture_dir(case) / "hf", cfg))
    assert sorted(hf_mtp) == sorted(flat)
    for path, arr in flat.items():
        assert np.array_equal(_bits(np.asarray(arr)), _bits(np.asarray(hf_mtp[path]))), path
    _assert_bit_equal(load_mtp(out, cfg), mtp)  # a converted directory: restore_mtp
    plain = _fp8_dir(tmp_path, case)
    assert not os.path.exists(plain / MTP_DIR)
    with pytest.raises(OrbaxCheckpointError, match="include-mtp"):
        restore_mtp(plain)


def test_sharded_restore(converted):
    """load_model(converted, mesh=...) on 4 CPU devices equals the HF load with the same mesh."""
    case = "tiny-fp8"
    out, hf = converted(case), fixture_dir(case) / "hf"
    code = f"""
import numpy as np, jax, dsv32_jax
from sharding import make_mesh
mesh = make_mesh(expert=2, tensor=2)
a = dsv32_jax.load_model({str(hf)!r}, mesh=mesh)
b = dsv32_jax.load_model({str(out)!r}, mesh=mesh)
same = jax.tree.map(lambda x, y: x.sharding == y.sharding and np.array_equal(
    np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)), a.params, b.params)
w = b.params["moe_layers"]["ffn"]["experts"]["w1_weight"]
print("RESULT", all(jax.tree.leaves(same)), len(w.sharding.device_set),
      w.addressable_shards[0].data.shape[1], w.shape[1])
"""
    env = xla_env(4, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][0].split()
    assert line[1] == "True" and line[2] == "4"
    assert int(line[3]) * 4 == int(line[4])  # experts split over every device of the mesh


def test_metadata_matches_what_orbax_writes(tmp_path):
    """Our _METADATA / array layout equals what the installed orbax-checkpoint writes for the same
    tree with its non-OCDBT zarr v2 layout (catches format drift in new Orbax releases)."""
    import orbax.checkpoint as ocp

    tree = {"a": {"w": np.ones((2, 256, 128), FP8), "s": np.ones((2, 2, 1), np.float32)},
            "b": np.ones((8,), ml_dtypes.bfloat16)}
    tree = jax.tree.map(jnp.asarray, tree)
    theirs = tmp_path / "theirs"
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False))
    ckptr.save(theirs, args=ocp.args.PyTreeSave(tree))
    ckptr.close()
    ours = tmp_path / "ours"
    ours.mkdir()
    write_tree_metadata(ours, {p: a.shape for p, a in flatten(tree).items()})
    with open(theirs / "_METADATA") as f:
        t = json.load(f)
    with open(ours / "_METADATA") as f:
        o = json.load(f)
    assert set(o["tree_metadata"]) == set(t["tree_metadata"])
    for k, v in t["tree_metadata"].items():
        assert o["tree_metadata"][k]["key_metadata"] == v["key_metadata"]
        for field in ("value_type", "skip_deserialize"):
            assert o["tree_metadata"][k]["value_metadata"][field] == v["value_metadata"][field]
    for field in ("use_ocdbt", "use_zarr3"):
        assert o[field] == t[field]
    for path in flatten(tree):
        assert (theirs / array_name(path) / ".zarray").is_file()  # same array naming
        with open(theirs / array_name(path) / ".zarray") as f:
            zt = json.load(f)
        assert zt["dtype"] in ("float8_e4m3fn", "<f4", "bfloat16")


# ---- CLI, verify, force, resume ------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    """A tiny synthetic FP8 checkpoint (MTP included) with a few tokenizer-like files."""
    d = write_checkpoint(preset("tiny"), tmp_path_factory.mktemp("synth") / "hf", seed=3, n_shards=3)
    for name, text in (("tokenizer.json", '{"model": {}}'), ("tokenizer_config.json", "{}"),
                       ("generation_config.json", '{"temperature": 0.6}')):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return d


@pytest.fixture
def copy(synth, tmp_path):
    return shutil.copytree(synth, tmp_path / "hf")


def test_cli_convert_and_verify(synth, tmp_path, capsys):
    from dsv32_jax.cli import main

    out = tmp_path / "out"
    assert main(["convert", synth, str(out), "--include-mtp", "--workers", "3", "--hash",
                 "--chunk-mb", "0.25", "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out
    m = read_manifest(out)
    assert m["options"] == {"weights": "fp8", "include_mtp": True, "workers": 3,
                            "chunk_bytes": int(0.25 * 2**20), "hash": True}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(synth, name)) as f, open(out / name) as g:
            assert f.read() == g.read()
        assert name in m["copied_files"]
    for name, info in m["source"]["files"].items():
        with open(os.path.join(synth, name), "rb") as f:
            assert info["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert m["tensor_count"] == len(tensor_specs(preset("tiny"), include_mtp=True))
    assert m["stats"]["chunks"] > len(m["params"])  # small chunks: big leaves are split
    assert not any(n.endswith((".partial", ".convert_progress")) for n in os.listdir(tmp_path))

    assert main(["convert", "--verify", str(out), synth, "--sample", "0.2", "--no-progress"]) == 0
    capsys.readouterr()
    # flip bytes of one stored chunk: verify names the array
    leaf = out / PARAMS_DIR / "moe_layers.ffn.experts.w2_weight"
    chunk = sorted(p for p in os.listdir(leaf) if not p.startswith("."))[-1]
    with open(leaf / chunk, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x41]))
    assert main(["convert", "--verify", str(out), synth, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "moe_layers.ffn.experts.w2_weight" in err and "1 chunk(s) differ" in err
    os.remove(leaf / chunk)  # a missing chunk file
    with pytest.raises(VerifyError, match="w2_weight"):
        verify_checkpoint(out, synth, **QUIET)


def test_bf16_mode_unaligned_row_chunks(synth, tmp_path):
    """bf16 output with chunks that split tensors at rows that are not 128-block aligned."""
    out = tmp_path / "out"
    convert_checkpoint(synth, out, weights="bf16", chunk_bytes=20000, workers=3, **QUIET)
    cfg = Config.from_hf(synth, fp8_activations=False)
    from dsv32_jax.checkpoint.hf import load_params

    src = flatten(load_params(synth, cfg))
    got = flatten(restore_params(out, load_config(out, fp8_activations=False)))
    assert max(leaf["chunks"][-2] for leaf in read_manifest(out)["params"]
               if len(leaf["chunks"]) >= 2) < 128
    for p, b in got.items():
        a = src[p]
        if a.dtype == FP8:
            a = dequant(a, src[p[:-1] + (p[-1].replace("weight", "scale"),)], jnp.bfloat16)
        assert a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b)), p
    verify_checkpoint(out, synth, sample=0.2, **QUIET)


def test_python_m_convert_help():
    r = subprocess.run([sys.executable, "-m", "convert", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--weights" in r.stdout and "--verify" in r.stdout


def _tree(path) -> dict[str, bytes]:
    """{relative path: content} of every file below `path` (to prove nothing was touched)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def test_refuses_nonempty_output(synth, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConvertError, match="--force"):
        convert_checkpoint(synth, out, **QUIET)
    # --force replaces only a previous conversion: a directory of user files is never deleted
    with pytest.raises(ConvertError, match="not a checkpoint written by dsv32 convert.*nothing was deleted"):
        convert_checkpoint(synth, out, force=True, **QUIET)
    assert (out / "keep.txt").read_text() == "x" and not os.path.exists(str(out) + ".partial")
    os.remove(out / "keep.txt")
    convert_checkpoint(synth, out, **QUIET)  # an empty dir is fine
    assert is_orbax_dir(out)
    before = read_manifest(out)["created"], sorted(os.listdir(out))
    m = convert_checkpoint(synth, out, force=True, weights="bf16", **QUIET)  # a previous conversion
    assert is_orbax_dir(out) and read_manifest(out)["options"]["weights"] == "bf16" == m["options"]["weights"]
    assert sorted(os.listdir(out)) == before[1]
    assert [p for p in os.listdir(tmp_path) if p != "out"] == []  # no .partial, no .old-* left
    # a previous conversion with a user's file added: refused, and the file survives
    (out / "notes.txt").write_text("mine")
    (out / PARAMS_DIR / "mine.npy").write_text("mine too")
    with pytest.raises(ConvertError, match=r"files a conversion does not write: \['notes.txt', "
                                           r"'params/mine.npy'\].*nothing was deleted"):
        convert_checkpoint(synth, out, force=True, **QUIET)
    assert (out / "notes.txt").read_text() == "mine" and is_orbax_dir(out)


@pytest.mark.parametrize("layout", ["src_inside_out", "out_inside_src", "same", "symlink_to_src",
                                    "symlink_to_parent", "partial_holds_src"])
def test_output_may_not_overlap_source(synth, tmp_path, layout):
    """`dsv32 convert data/DeepSeek-V3.2 data --force` used to rename `data` aside and delete it."""
    data = tmp_path / "data"
    src = data / "hf"
    if layout == "partial_holds_src":
        src = tmp_path / "out.partial" / "hf"
    shutil.copytree(synth, src)
    (data if data.exists() else tmp_path).joinpath("other.txt").write_text("user data")
    out = {"src_inside_out": data, "out_inside_src": src / "converted", "same": src,
           "partial_holds_src": tmp_path / "out"}.get(layout)
    if layout.startswith("symlink"):
        out = tmp_path / "link"
        os.symlink(src if layout == "symlink_to_src" else data, out)
    before = _tree(tmp_path)
    for force in (False, True):
        with pytest.raises(ConvertError, match=r"overlap|symbolic link") as e:
            convert_checkpoint(src, out, force=force, **QUIET)
        assert str(out) in str(e.value) or str(out) + ".partial" in str(e.value)
    assert _tree(tmp_path) == before  # nothing deleted, nothing written
    # the CLI says the same and exits 1
    from convert.cli import main

    assert main([str(src), str(out), "--force", "--no-progress"]) == 1
    assert _tree(tmp_path) == before


def test_overlap_through_another_spelling(synth, tmp_path):
    """OUT given through a symlinked parent still resolves into the source."""
    src = shutil.copytree(synth, tmp_path / "data" / "hf")
    os.symlink(tmp_path / "data", tmp_path / "alias")
    (tmp_path / "data" / "x.txt").write_text("keep")
    before = _tree(tmp_path / "data")
    with pytest.raises(ConvertError, match="overlap"):
        convert_checkpoint(src, tmp_path / "alias" / "hf" / "out", force=True, **QUIET)
    with pytest.raises(ConvertError, match="overlap"):
        convert_checkpoint(tmp_path / "alias" / "hf", tmp_path / "data", force=True, **QUIET)
    assert _tree(tmp_path / "data") == before


def test_stale_partial_is_deleted_only_if_ours(synth, tmp_path):
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "precious.txt").write_text("not ours")
    with pytest.raises(ConvertError, match=r"out\.partial: exists but was not made by dsv32 convert"):
        convert_checkpoint(synth, out, **QUIET)
    assert (partial / "precious.txt").read_text() == "not ours" and not out.exists()
    shutil.rmtree(partial)
    partial.write_text("a file")
    with pytest.raises(ConvertError, match="not a directory made by dsv32 convert"):
        convert_checkpoint(synth, out, **QUIET)
    os.remove(partial)
    # our own stale .partial (other options) is replaced
    partial.mkdir()
    with open(partial / ".convert_state.json", "w") as f:
        json.dump({"format": "dsv32-jax-orbax", "weights": "other"}, f)
    convert_checkpoint(synth, out, **QUIET)
    assert is_orbax_dir(out) and not partial.exists()


def test_failed_final_rename_keeps_the_complete_partial(synth, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = str(out) + ".partial"
    real = os.replace

    def busy(a, b, *args, **kw):
        if os.fspath(a) == partial:
            raise OSError(16, "Device or resource busy", os.fspath(b))
        return real(a, b, *args, **kw)

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(synth, out, **QUIET)
    msg = str(e.value)
    assert "cannot move the finished conversion into place" in msg and "busy" in msg
    assert f"kept at {partial}" in msg and f"mv {partial} {out}" in msg
    assert is_orbax_dir(partial) and not out.exists()
    assert not os.path.exists(os.path.join(partial, ".convert_state.json"))
    monkeypatch.setattr(os, "replace", real)
    os.rename(partial, out)  # the advice works: the result is complete
    verify_checkpoint(out, synth, sample=0.2, **QUIET)
    # replacing a previous conversion: when the rename fails the previous output is put back
    created = read_manifest(out)["created"]
    (tmp_path / "marker").write_text("")
    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(ConvertError, match="kept at"):
        convert_checkpoint(synth, out, force=True, weights="bf16", **QUIET)
    monkeypatch.setattr(os, "replace", real)
    assert read_manifest(out)["created"] == created and read_manifest(out)["options"]["weights"] == "fp8"
    assert read_manifest(partial)["options"]["weights"] == "bf16"
    assert sorted(os.listdir(tmp_path)) == ["marker", "out", "out.partial"]  # no .old-* left behind
    # rerunning with the finished .partial in the way: it is ours, so it is redone and moved in
    convert_checkpoint(synth, out, force=True, weights="bf16", **QUIET)
    assert read_manifest(out)["options"]["weights"] == "bf16" and not os.path.exists(partial)


def test_output_written_durably(synth, tmp_path, monkeypatch):
    """Every file the finalization writes is fsynced before the rename, and the parent after it."""
    import convert.run as run

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", os.fspath(a)))
                        or real_replace(a, b))
    monkeypatch.setattr(run.os, "sync", lambda: events.append(("sync", "")))
    out = tmp_path / "out"
    convert_checkpoint(synth, out, **QUIET)
    partial = str(out) + ".partial"
    i = events.index(("replace", partial))
    synced_before = {p for kind, p in events[:i] if kind == "fsync"}
    assert ("sync", "") in events[:i]  # the chunks (written without per-chunk fsync)
    for name in ["manifest.json", "config.json", "tokenizer.json", "generation_config.json",
                 "params/_METADATA", "params/_CHECKPOINT_METADATA", "", "params"]:
        assert os.path.join(partial, name).rstrip("/") in synced_before, name
    assert ("fsync", str(tmp_path)) in events[i + 1:]


def test_resume_after_interruption(synth, tmp_path, monkeypatch):
    import convert.run as run

    out = tmp_path / "out"
    partial = str(out) + ".partial"
    real = run.read_unit
    calls = {"n": 0}

    def flaky(reader, unit, out=None):
        calls["n"] += 1
        if calls["n"] > 40:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of the conversion
        return real(reader, unit, out)

    opts = dict(workers=1, chunk_bytes=64 << 10, **QUIET)
    monkeypatch.setattr(run, "read_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(synth, out, **opts)
    monkeypatch.setattr(run, "read_unit", real)
    assert not out.exists() and os.path.isdir(partial)  # nothing complete-looking
    with open(os.path.join(partial, run.PROGRESS_FILE)) as f:
        logged = [ln.split() for ln in f]
    assert len(logged) == 40
    # damage one logged chunk: the resume must re-check and rewrite it
    group_leaf, idx, _ = logged[7]
    chunk = os.path.join(partial, group_leaf, idx)
    with open(chunk, "r+b") as f:
        f.write(b"\xff\xff\xff\xff")
    m = convert_checkpoint(synth, out, **opts)
    assert m["stats"]["resumed_chunks"] == 39
    assert m["stats"]["chunks"] > 40 and not os.path.exists(partial)
    verify_checkpoint(out, synth, **QUIET)
    # a stale .partial from other options is discarded, not mixed in
    shutil.rmtree(out)
    monkeypatch.setattr(run, "read_unit", flaky)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(synth, out, **opts)
    monkeypatch.setattr(run, "read_unit", real)
    m = convert_checkpoint(synth, out, **{**opts, "chunk_bytes": 128 << 10})
    assert m["stats"]["resumed_chunks"] == 0
    verify_checkpoint(out, synth, sample=0.1, **QUIET)


SLOW_CONVERT = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
import convert.run as run
real, gate = run.read_unit, sys.argv[3]
def gated(*args):  # every chunk waits for the test's go: a conversion that is still writing
    while not os.path.exists(gate):
        time.sleep(0.05)
    return real(*args)
run.read_unit = gated
run.convert_checkpoint(sys.argv[1], sys.argv[2], workers=1, progress=False)
"""


def test_concurrent_converts_into_one_out(synth, tmp_path):
    """A second `dsv32 convert` into the OUT_DIR a live one is writing (with other options, so its
    .partial looks stale) is refused with exit 1, naming the first one's pid; the first finishes
    with a sound result. (Before: the second deleted the first's .partial, both wrote, exit 0.)"""
    out, gate = tmp_path / "out", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, synth, str(out), str(gate)],
                             stderr=subprocess.PIPE, text=True)
    try:
        state = tmp_path / "out.partial" / ".convert_state.json"
        deadline = time.time() + 300
        while not state.exists():  # the first run has its .partial and waits in its first read
            assert first.poll() is None and time.time() < deadline, first.stderr and first.stderr.read()
            time.sleep(0.1)
        before = state.read_bytes()
        second = subprocess.run([sys.executable, "-m", "convert", synth, str(out), "--weights", "bf16",
                                 "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr
        assert second.stderr.count("\n") == 1 and (
            f"{out} is being written by pid {first.pid} (dsv32 convert)" in second.stderr)
        assert state.read_bytes() == before  # the first run's .partial was not touched
        gate.touch()
        assert first.wait(300) == 0, first.stderr.read()
    finally:
        first.kill()
    assert read_manifest(out)["options"]["weights"] == "fp8"
    verify_checkpoint(out, synth, **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["go", "out"]  # no lock file, no .partial left


def test_a_write_failure_keeps_the_partial_and_a_rerun_resumes(synth, tmp_path, monkeypatch):
    """A chunk write failing midway (a full disk, say) says that the .partial is kept and that the
    same command resumes; it does."""
    import convert.run as run

    real, calls = run.create_array, {"n": 0}

    class Full:  # output arrays whose 10th chunk write fails as tensorstore does on ENOSPC
        def __init__(self, arr):
            self.arr = arr

        def __getitem__(self, region):
            view = self.arr[region]
            if not hasattr(view, "write"):
                return view

            class View:
                def write(_, data, **kw):
                    calls["n"] += 1
                    if calls["n"] == 10:
                        raise ValueError("Error writing local file: [OS error 28: No space left on device]")
                    return view.write(data, **kw)

                def read(_):
                    return view.read()

            return View()

    monkeypatch.setattr(run, "create_array", lambda *a, **k: Full(real(*a, **k)))
    out, partial = tmp_path / "out", str(tmp_path / "out") + ".partial"
    opts = dict(workers=1, **QUIET)
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(synth, out, **opts)
    msg = str(e.value)
    assert msg.startswith(f"{partial}: writing ") and "No space left on device" in msg
    assert f"{partial} is kept with everything written so far" in msg
    assert "rerun the same command to resume" in msg
    monkeypatch.setattr(run, "create_array", real)
    m = convert_checkpoint(synth, out, **opts)
    assert m["stats"]["resumed_chunks"] == 9 and not os.path.exists(partial)
    verify_checkpoint(out, synth, sample=0.3, **QUIET)


def test_a_finalize_failure_names_the_output_file(synth, tmp_path, monkeypatch):
    """ENOSPC while copying tokenizer.json into the .partial at the end names that output file
    (not the source first), says the .partial is kept; the rerun resumes every chunk."""
    import errno

    real = shutil.copyfile
    out, partial = tmp_path / "out", str(tmp_path / "out") + ".partial"

    def full(src, dst, **kw):
        if os.path.basename(dst) == "tokenizer.json":  # as shutil reports it: source first
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src, None, dst)
        return real(src, dst, **kw)

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(synth, out, **QUIET)
    msg = str(e.value)
    assert msg.startswith(f"{partial}/tokenizer.json: cannot write it (No space left on device); "
                          f"{partial} is kept"), msg
    assert "rerun the same command to resume" in msg and os.path.join(synth, "tokenizer.json") not in msg
    monkeypatch.setattr(shutil, "copyfile", real)
    m = convert_checkpoint(synth, out, **QUIET)
    assert m["stats"]["resumed_chunks"] == m["stats"]["chunks"] and not os.path.exists(partial)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "argument --workers: expected an integer >= 1, got 0"),
    (["--chunk-mb", "-1"], "argument --chunk-mb: expected a finite number > 0, got -1"),
    (["--verify", "--sample", "0"], "argument --sample: expected a share of chunks in (0, 1], got 0.0"),
])
def test_cli_usage_errors_exit_2(synth, tmp_path, argv, message, capsys):
    from dsv32_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["convert", synth, str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert "chunk_bytes" not in err and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        convert_checkpoint(synth, tmp_path / "out", workers=0, **QUIET)


def test_load_model_checks_converted_tree(synth, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(synth, out, **QUIET)
    with open(out / "config.json") as f:
        cfg = json.load(f)
    cfg.pop("quantization_config")  # claims bf16 weights: the stored scales are unexpected
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(OrbaxCheckpointError, match="unexpected.*scale"):
        dsv32_jax.load_model(out)
    cfg2 = Config.from_hf(synth, fp8_activations=False)
    with pytest.raises(OrbaxCheckpointError, match=r"moe_layers/ffn/\S+ is stored as .*the config expects"):
        restore_params(out, dataclasses.replace(cfg2, moe_inter_dim=256))


def test_float32_and_float16_sources_convert_to_bf16(tmp_path, monkeypatch):
    """A non-FP8 checkpoint stored in float32/float16 converts; each tensor is cast to the param
    dtype chunk by chunk (CAST_BYTES made tiny so every tensor takes several steps)."""
    import convert.plan as plan

    monkeypatch.setattr(plan, "CAST_BYTES", 1000)
    cfg = preset("tiny", weight_dtype="bf16", scale_fmt=None)
    src = write_checkpoint(cfg, tmp_path / "bf16", seed=5, n_shards=2, include_tokenizer=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(src, mixed)
    with open(os.path.join(src, INDEX_NAME)) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    kinds = set()
    for fname in shards:
        with SafetensorsFile(os.path.join(src, fname)) as f:
            tensors = {}
            for n in f.keys():
                dt = (np.float32, np.float16)[len(n) % 2] if f.dtype(n) == BF16 else f.dtype(n)
                tensors[n] = np.asarray(f.get(n)).astype(dt)
                kinds.add(np.dtype(dt).name)
            write_safetensors(mixed / fname, tensors, f.metadata)
    assert kinds == {"float32", "float16"}
    out = tmp_path / "out"
    m = convert_checkpoint(mixed, out, include_mtp=True, chunk_bytes=50_000, workers=2, **QUIET)
    assert {leaf["source_dtype"] for leaf in m["params"]} >= {"float32", "float16"}
    got = flatten(restore_params(out, load_config(out, fp8_activations=False)))
    want = flatten(dsv32_jax.checkpoint.hf.load_params(mixed, Config.from_hf(mixed, fp8_activations=False)))
    assert sorted(got) == sorted(want)
    for p in got:  # the loader casts the same way: both equal bf16(stored value)
        a, b = np.asarray(got[p]), np.asarray(want[p])
        assert a.dtype == b.dtype and a.dtype in (BF16, np.float32), p
        assert np.array_equal(_bits(a), _bits(b)), p
    mtp = flatten(restore_mtp(out))
    assert all(np.asarray(v).dtype in (BF16, np.float32) for v in mtp.values())
    assert np.asarray(mtp[("enorm", "weight")]).dtype == BF16
    verify_checkpoint(out, mixed, **QUIET)


def test_restore_with_progress_gives_the_same_arrays(synth, tmp_path, capsys):
    from dsv32_jax.checkpoint.orbax_layout import _restore_groups

    out = tmp_path / "out"
    convert_checkpoint(synth, out, include_mtp=True, **QUIET)
    cfg = load_config(out)
    plain = flatten(restore_params(out, cfg))
    capsys.readouterr()
    shown = flatten(restore_params(out, cfg, progress=True))
    err = capsys.readouterr().err
    assert "restoring params:" in err and "B/s" in err
    assert sorted(plain) == sorted(shown)
    for p in plain:
        assert plain[p].sharding == shown[p].sharding, p
    _assert_bit_equal(plain, shown)
    _assert_bit_equal(restore_mtp(out), restore_mtp(out, progress=True))
    sizes = {p: int(np.prod(a.shape)) * a.dtype.itemsize for p, a in plain.items()}
    groups = _restore_groups(sizes)
    assert 8 < len(groups) <= 64 and sorted(p for g in groups for p in g) == sorted(sizes)


# ---- corrupt sources -----------------------------------------------------------------------------
def _shard_of(d, name):
    with open(os.path.join(d, INDEX_NAME)) as f:
        return os.path.join(d, json.load(f)["weight_map"][name])


def _rewrite_shard(path, edit):
    f = SafetensorsFile(path)
    tensors = {n: np.array(f.get(n)) for n in f.keys()}
    f.close()
    edit(tensors)
    write_safetensors(path, tensors, {"format": "pt"})


VICTIM = "model.layers.1.mlp.experts.3.down_proj.weight"


def test_truncated_shard(copy, tmp_path):
    shard = _shard_of(copy, VICTIM)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 1000)
    with pytest.raises(ConvertError, match=rf"{os.path.basename(shard)}.*truncated"):
        convert_checkpoint(copy, tmp_path / "out", **QUIET)
    _no_output(tmp_path / "out")


def test_missing_shard_file(copy, tmp_path):
    shard = _shard_of(copy, VICTIM)
    os.remove(shard)
    with pytest.raises(ConvertError, match=rf"{os.path.basename(shard)}.*does not exist"):
        convert_checkpoint(copy, tmp_path / "out", **QUIET)
    _no_output(tmp_path / "out")


def test_missing_tensor(copy, tmp_path):
    _rewrite_shard(_shard_of(copy, VICTIM), lambda t: t.pop(VICTIM))
    index = os.path.join(copy, INDEX_NAME)
    with open(index) as f:
        idx = json.load(f)
    del idx["weight_map"][VICTIM]
    with open(index, "w") as f:
        json.dump(idx, f)
    with pytest.raises(ConvertError, match=rf"missing tensor '{VICTIM}'"):
        convert_checkpoint(copy, tmp_path / "out", **QUIET)
    _no_output(tmp_path / "out")


def test_wrong_shape(copy, tmp_path):
    name = "model.layers.0.input_layernorm.weight"

    def edit(t):
        t[name] = np.concatenate([t[name], t[name][:1]])

    _rewrite_shard(_shard_of(copy, name), edit)
    with pytest.raises(ConvertError, match=rf"'{name}' has shape \(257,\), expected \(256,\)"):
        convert_checkpoint(copy, tmp_path / "out", **QUIET)
    _no_output(tmp_path / "out")


def test_wrong_config(copy, tmp_path):
    path = os.path.join(copy, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["moe_intermediate_size"] = 256
    with open(path, "w") as f:
        json.dump(cfg, f)
    shape_error = r"config\.json.*model\.layers\.1\.mlp\.\S+' has shape \(.*\), expected \(.*\) from config"
    with pytest.raises(ConvertError, match=shape_error):
        convert_checkpoint(copy, tmp_path / "out", **QUIET)
    _no_output(tmp_path / "out")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ConvertError, match="bad config.json"):
        convert_checkpoint(copy, tmp_path / "out", **QUIET)
    _no_output(tmp_path / "out")


@pytest.mark.parametrize("name, value, match", [
    ("model.layers.3.mystery.weight", np.zeros(4, BF16), r"MTP tensor 'model\.layers\.3\.mystery\.weight' is not "
                                                         r"part of the MTP layer"),
    # checked before any conversion with every tensor (hf.check), --include-mtp or not
    ("model.layers.3.enorm.weight", np.zeros(255, BF16), r"MTP tensor 'model\.layers\.3\.enorm\.weight' "
                                                         r"has shape \(255,\), expected \(256,\)"),
    ("model.layers.3.eh_proj.weight_scale_inv", np.zeros((2, 4), BF16), r"eh_proj\.weight_scale_inv' has "
                                                                        r"dtype bfloat16, expected float32"),
])
def test_mtp_tensors_are_checked(copy, tmp_path, name, value, match):
    """With --include-mtp every MTP-only tensor must be one the MTP layer has, in its shape and
    dtype; without it the MTP layer is not read (like the loader)."""
    with open(os.path.join(copy, INDEX_NAME)) as f:
        known = name in json.load(f)["weight_map"]
    shard = _shard_of(copy, name if known else "model.layers.3.enorm.weight")

    def edit(t):
        t[name] = value

    _rewrite_shard(shard, edit)
    index = os.path.join(copy, INDEX_NAME)
    with open(index) as f:
        idx = json.load(f)
    idx["weight_map"][name] = os.path.basename(shard)
    with open(index, "w") as f:
        json.dump(idx, f)
    with pytest.raises(ConvertError, match=match) as e:
        convert_checkpoint(copy, tmp_path / "out", include_mtp=True, **QUIET)
    assert os.path.basename(shard) in str(e.value)
    _no_output(tmp_path / "out")


def test_short_read_names_shard_and_tensor(copy):
    """A shard that shrinks after validation (e.g. a network filesystem) fails clearly mid-run."""
    with ShardedCheckpoint(copy) as ck:
        reader = SourceReader(ck)
        path, offset, size = reader.location(VICTIM)
        out = np.empty(ck.shape(VICTIM), ck.dtype(VICTIM))
        reader.read_into(VICTIM, 0, out)
        assert np.array_equal(_bits(out), _bits(ck.get(VICTIM)))
        with open(path, "r+b") as f:
            f.truncate(offset + size // 2)
        with pytest.raises(ConvertError, match=rf"{os.path.basename(path)}: tensor '{VICTIM}'.*truncated"):
            reader.read_into(VICTIM, 0, out)
        reader.close()


def test_plan_chunks():
    mb = 1 << 20
    # small per-expert tensors are grouped along experts (a power of two), then layers
    assert plan_chunks((58, 256), (2048, 7168), 1, 64 * mb) == (1, 4, 2048, 7168)
    assert plan_chunks((58, 256), (16, 56), 4, 64 * mb) == (58, 256, 16, 56)
    assert plan_chunks((61,), (7168,), 2, 64 * mb) == (61, 7168)
    # big tensors are split into 128-row blocks
    assert plan_chunks((), (129280, 7168), 2, 64 * mb) == (4608, 7168)
    assert plan_chunks((3,), (18432, 7168), 1, 64 * mb) == (1, 9344, 7168)
    assert plan_chunks((2,), (300, 10), 4, 1000) == (1, 25, 10)


# ---- memory --------------------------------------------------------------------------------------
def _peak_rss_child(code: str) -> tuple[int, str]:
    """Run `code` in a fresh interpreter; returns (its peak RSS in bytes, stdout). The child reports
    VmHWM of its own address space (ru_maxrss would include the forked parent's RSS)."""
    wrapped = code + (
        "\nimport re, resource\ntry:\n"
        "    kb = int(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "except (OSError, AttributeError):\n"
        "    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print('PEAK_KB', kb)\n")
    r = subprocess.run([sys.executable, "-c", wrapped], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    kb = int([ln for ln in r.stdout.splitlines() if ln.startswith("PEAK_KB")][0].split()[1])
    return kb * 1024, r.stdout


def test_conversion_memory_is_bounded(tmp_path):
    """Convert a ~1.2 GB checkpoint (many experts) in a subprocess: its peak RSS stays far below the
    checkpoint size (< size/3 above the baseline of a child that does everything but the copy)."""
    cfg = preset("tiny", weight_dtype="bf16", dim=1024, q_lora_rank=256, inter_dim=512,
                 moe_inter_dim=512, n_routed_experts=192, n_expert_groups=4)
    hf = tmp_path / "hf"
    t = time.time()
    write_checkpoint(cfg, hf, n_shards=4, include_mtp=False)
    t_write = time.time() - t
    size = sum(os.path.getsize(hf / f) for f in os.listdir(hf) if f.endswith(".safetensors"))
    assert size > 1.0e9
    out = tmp_path / "out"
    baseline, _ = _peak_rss_child(
        "import convert.run as r\n"
        f"cfg, ck, leaves = r._load_source({str(hf)!r}, 'fp8', False, r.DEFAULT_CHUNK_BYTES)")
    t = time.time()
    peak, stdout = _peak_rss_child(
        f"from convert import convert_checkpoint\n"
        f"m = convert_checkpoint({str(hf)!r}, {str(out)!r}, workers=2, progress=False)\n"
        f"print('MBS', m['stats']['write_mb_per_s'])")
    t_conv = time.time() - t
    mbs = float([ln for ln in stdout.splitlines() if ln.startswith("MBS")][0].split()[1])
    print(f"\nmemory test: checkpoint {size / 1e9:.2f} GB written in {t_write:.1f}s; conversion child "
          f"peak RSS {peak / 1e6:.0f} MB (baseline child {baseline / 1e6:.0f} MB, "
          f"+{(peak - baseline) / 1e6:.0f} MB), {t_conv:.1f}s wall incl. startup, {mbs:.0f} MB/s")
    assert peak - baseline < size / 3, (peak, baseline, size)
    assert peak < size / 2
    r = verify_checkpoint(out, hf, sample=0.05, **QUIET)
    assert r["chunks_checked"] >= r["leaves"]


def _set(name, fn):
    return lambda t: t.__setitem__(name, fn(t[name]))


def _fp8_nan(a):
    b = a.view(np.uint8).copy()
    b[3, 5] = 0xFF
    return b.view(a.dtype)


def _put(value):
    def fn(a):
        a = a.copy()
        a.reshape(-1)[1] = value
        return a
    return fn


_NORM = "model.layers.0.input_layernorm.weight"
NONFINITE = [(VICTIM, _fp8_nan, "holds the FP8 e4m3 NaN code"),
             (VICTIM + "_scale_inv", _put(np.inf), r"holds NaN or Inf \(as float32\)"),
             (_NORM, _put(np.nan), r"holds NaN or Inf \(as bfloat16\)")]


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
@pytest.mark.parametrize("name,fn,match", NONFINITE, ids=["fp8-nan-byte", "inf-scale", "nan-norm"])
def test_nonfinite_source_is_refused(copy, tmp_path, weights, name, fn, match):
    """NaN/Inf in a weight, a scale or a norm: convert stops with the shard and the tensor (the
    check runs on each chunk as it streams through; no complete OUT_DIR is left)."""
    shard = _shard_of(copy, name)
    _rewrite_shard(shard, _set(name, fn))
    with pytest.raises(ConvertError, match=match) as e:
        convert_checkpoint(copy, tmp_path / "out", weights=weights, **QUIET)
    assert f"{shard}: tensor '{name}'" in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_verify_and_load_refuse_nonfinite_data(copy, tmp_path):
    """`convert --verify` refuses a source that went non-finite after the conversion, and loading
    a converted directory whose stored chunk holds NaN names the param, the layer and the tensor."""
    out = tmp_path / "out"
    convert_checkpoint(copy, out, **QUIET)
    shard = _shard_of(copy, _NORM)
    _rewrite_shard(shard, _set(_NORM, _put(np.nan)))  # same size: verify reads it
    with pytest.raises(ConvertError, match=rf"{shard}: tensor '{_NORM}' holds NaN or Inf"):
        verify_checkpoint(out, copy, **QUIET)
    leaf = out / PARAMS_DIR / "dense_layers.attn_norm.weight"  # (layers, dim) bf16, raw chunks
    chunk = sorted(p for p in os.listdir(leaf) if not p.startswith("."))[0]
    with open(leaf / chunk, "r+b") as f:
        f.write(np.array([np.nan], ml_dtypes.bfloat16).tobytes())
    with pytest.raises(OrbaxCheckpointError, match=r"param dense_layers/attn_norm/weight \[0\] "
                       rf"\(converted from '{_NORM}'\) holds NaN or Inf"):
        dsv32_jax.load_model(out, dtype="float32", fp8_activations=False)
