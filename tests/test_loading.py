"""Loading synthetic checkpoints in the released HF layout: `load_model`, `hf.check`/`load_params`
and their errors. Synthetic data only (dsv32_jax.checkpoint.synthetic); no golden fixtures needed.

One checkpoint per kind is written per module; tests that corrupt a checkpoint work on a copy.
Only `test_logits_shape_dtype_finite` compiles the forward pass.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv32_jax
from dsv32_jax.checkpoint import hf
from dsv32_jax.model.config import Config, ConfigError, preset
from dsv32_jax.checkpoint.hf import CheckpointError, check, load_params
from dsv32_jax.engine.runner import load_model
from dsv32_jax.checkpoint.safetensors import (LazyTensor, SafetensorsError, SafetensorsFile, ShardedCheckpoint,
                                              write_safetensors)
from dsv32_jax.checkpoint.synthetic import tensor_specs, write_checkpoint
from dsv32_jax.checkpoint.weights import abstract_params, flatten, hf_names, is_mtp_tensor

INDEX = "model.safetensors.index.json"
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
CFG = preset("tiny")
LOAD = dict(dtype="float32", fp8_activations=False)
STORED = dict(LOAD, weights="narrow")  # the checkpoint's dtypes (`checkpoint.storage`)


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """tiny, FP8, seed 0, MTP layer included (the checkpoint most tests use)."""
    return write_checkpoint(CFG, tmp_path_factory.mktemp("ck") / "base", seed=0, n_shards=2)


@pytest.fixture(scope="module")
def model(base):
    return load_model(base, **STORED)


@pytest.fixture
def copy(base, tmp_path):
    """A private copy of `base` to corrupt."""
    return shutil.copytree(base, tmp_path / "copy")


# ---- helpers -------------------------------------------------------------------------------------
def _bits(params: dict) -> dict:
    """{path: (shape, dtype, raw bytes)} of a param tree, for bit-exact comparison."""
    out = {}
    for path, a in flatten(params).items():
        a = np.asarray(a)
        out[path] = (a.shape, a.dtype, a.tobytes())
    return out


def _index(ckdir) -> dict:
    with open(os.path.join(ckdir, INDEX)) as f:
        return json.load(f)


def _edit_shard(ckdir, name: str, *, drop: bool = False, new: np.ndarray | None = None,
                fix_index: bool = True) -> str:
    """Rewrite the shard that holds (or, for a new name, the first shard) so that tensor `name` is
    dropped or set to `new`; keep the index's weight_map in line unless fix_index=False.
    Returns the shard path."""
    index = _index(ckdir)
    wm = index["weight_map"]
    fname = wm.get(name, sorted(set(wm.values()))[0])
    path = os.path.join(ckdir, fname)
    with SafetensorsFile(path) as f:
        tensors = {n: np.array(f.get(n)) for n in f.keys()}
        meta = dict(f.metadata)
    if drop:
        assert name in tensors
        del tensors[name]
        if fix_index:
            del wm[name]
    else:
        tensors[name] = new
        if fix_index:
            wm[name] = fname
    write_safetensors(path, tensors, meta)
    with open(os.path.join(ckdir, INDEX), "w") as f:
        json.dump(index, f)
    return path


def _edit_config(ckdir, **changes) -> None:
    p = os.path.join(ckdir, "config.json")
    with open(p) as f:
        h = json.load(f)
    h.update(changes)
    with open(p, "w") as f:
        json.dump(h, f)


# ---- 1. load + logits + determinism --------------------------------------------------------------
def test_logits_shape_dtype_finite(model):
    assert model.config.dtype == "float32" and model.config.fp8_activations is False
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8))
    out = model.logits(tokens)
    assert out.shape == (2, 8, CFG.vocab_size)
    assert out.dtype == np.float32
    out = np.asarray(out)
    assert np.isfinite(out).all()
    # not degenerate: positions and batch rows give different distributions
    assert np.abs(out[0, 0] - out[0, 1]).max() > 1e-3
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_loaded_params_equal_checkpoint_tensors(base, model):
    """Every param slice is the bit-exact contents of the HF tensor hf_names maps it to."""
    flat = flatten(model.params)
    assert set(flat) == set(flatten(abstract_params(model.config)))
    n = 0
    with ShardedCheckpoint(base) as ckpt:
        for path, arr in flat.items():
            arr = np.asarray(arr)
            names = hf_names(model.config, path)
            for pos in np.ndindex(names.shape):
                want = ckpt.get(str(names[pos]))
                got = arr[pos]
                assert got.dtype == want.dtype and got.shape == want.shape, (path, pos)
                assert got.tobytes() == np.ascontiguousarray(want).tobytes(), (path, names[pos])
                n += 1
    assert n == len(tensor_specs(CFG, include_mtp=False))


@pytest.mark.parametrize("path, pos, name", [
    (("embed", "weight"), (), "model.embed_tokens.weight"),
    (("head", "weight"), (), "lm_head.weight"),
    (("dense_layers", "attn", "wkv_a", "weight"), (0,), "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"),
    (("dense_layers", "ffn", "w1", "weight"), (0,), "model.layers.0.mlp.gate_proj.weight"),
    (("dense_layers", "ffn", "w3", "weight"), (0,), "model.layers.0.mlp.up_proj.weight"),
    (("moe_layers", "attn", "wq_b", "scale"), (1,), "model.layers.2.self_attn.q_b_proj.weight_scale_inv"),
    (("moe_layers", "ffn", "experts", "w1_weight"), (1, 3), "model.layers.2.mlp.experts.3.gate_proj.weight"),
    (("moe_layers", "ffn", "experts", "w3_weight"), (0, 7), "model.layers.1.mlp.experts.7.up_proj.weight"),
    (("moe_layers", "ffn", "shared", "w1", "weight"), (0,), "model.layers.1.mlp.shared_experts.gate_proj.weight"),
    (("moe_layers", "ffn", "gate_bias"), (1,), "model.layers.2.mlp.gate.e_score_correction_bias"),
])
def test_param_to_tensor_mapping_spot_checks(base, model, path, pos, name):
    """Independent of hf_names: a few params against hand-written HF names."""
    got = np.asarray(flatten(model.params)[path])[pos]
    with ShardedCheckpoint(base) as ckpt:
        want = np.ascontiguousarray(ckpt.get(name))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def test_loading_is_deterministic(base, model, tmp_path):
    ref = _bits(model.params)
    # the same directory loaded again
    assert _bits(load_params(base, model.config)) == ref
    # an independent write with the same seed: identical files and identical params
    again = write_checkpoint(CFG, tmp_path / "again", seed=0)
    for f in os.listdir(base):
        with open(os.path.join(base, f), "rb") as a, open(os.path.join(again, f), "rb") as b:
            assert a.read() == b.read(), f
    assert _bits(load_params(again, model.config)) == ref
    # another seed: same layout, different values in every param
    other = _bits(load_params(write_checkpoint(CFG, tmp_path / "seed1", seed=1), model.config))
    assert other.keys() == ref.keys()
    for path in ref:
        assert other[path][:2] == ref[path][:2], path
        assert other[path][2] != ref[path][2], path


# ---- 2. MTP layer --------------------------------------------------------------------------------
def test_mtp_layer_written_and_skipped(base, model, monkeypatch):
    n = CFG.n_layers
    mtp = [k for k in ShardedCheckpoint(base).keys() if k.startswith(f"model.layers.{n}.")]
    assert CFG.n_mtp_layers == 1
    for suffix in ("eh_proj.weight", "eh_proj.weight_scale_inv", "enorm.weight", "hnorm.weight",
                   "shared_head.head.weight", "shared_head.norm.weight", "embed_tokens.weight",
                   "mlp.experts.0.gate_proj.weight", "self_attn.indexer.wk.weight"):
        assert f"model.layers.{n}.{suffix}" in mtp
    assert all(is_mtp_tensor(CFG, k) for k in mtp)
    assert not any(k.startswith(f"model.layers.{n + 1}.") for k in ShardedCheckpoint(base).keys())
    # check() accepts the checkpoint and maps no param to an MTP tensor
    with ShardedCheckpoint(base) as ckpt:
        sources = check(ckpt, CFG)
    used = {str(x) for names in sources.values() for x in names.reshape(-1)}
    assert not used & set(mtp)
    assert used == set(tensor_specs(CFG, include_mtp=False))


def test_checkpoint_without_mtp_loads_same_params(model, tmp_path):
    d = write_checkpoint(CFG, tmp_path / "nomtp", seed=0, include_mtp=False)
    keys = ShardedCheckpoint(d).keys()
    assert not any(is_mtp_tensor(CFG, k) for k in keys)
    assert set(keys) == set(tensor_specs(CFG, include_mtp=False))
    m = load_model(d, **STORED)
    # tensors are generated from (seed, name): the MTP layer's presence changes nothing loaded
    assert _bits(m.params) == _bits(model.params)


def test_bf16_checkpoint_loads(tmp_path):
    cfg = preset("tiny", weight_dtype="bf16", scale_fmt=None)
    d = write_checkpoint(cfg, tmp_path / "bf16", seed=0, n_shards=3)
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) == 3
    assert not any(k.endswith("weight_scale_inv") for k in ShardedCheckpoint(d).keys())
    c = Config.from_hf(d, **LOAD)
    assert c.weight_dtype == "bf16" and not c.quantized
    params = flatten(load_params(d, c))
    w = np.asarray(params[("dense_layers", "attn", "wq_b", "weight")])
    assert w.dtype == BF16 and np.isfinite(w.astype(np.float32)).all()


def _recast(src: str, dst: str, dtype_of) -> str:
    """Copy checkpoint `src` to `dst`, storing each bf16 tensor in `dtype_of(name)` (with our own
    writer; tensors are cast one at a time as they are written)."""
    shutil.copytree(src, dst)
    for fname in sorted({*_index(dst)["weight_map"].values()}):
        path = os.path.join(dst, fname)
        with SafetensorsFile(os.path.join(src, fname)) as f:
            tensors = {}
            for n in f.keys():
                dt = np.dtype(dtype_of(n)) if f.dtype(n) == BF16 else f.dtype(n)
                tensors[n] = LazyTensor(f.shape(n), dt, lambda n=n, dt=dt: np.asarray(f.get(n)).astype(dt))
            write_safetensors(path, tensors, f.metadata)
    return dst


BF16_CFG = preset("tiny", weight_dtype="bf16", scale_fmt=None)


@pytest.mark.parametrize("stored", ["float32", "float16", "mixed"])
def test_float32_and_float16_checkpoints_load_as_bf16(tmp_path, stored):
    d = write_checkpoint(BF16_CFG, tmp_path / "bf16", seed=1, n_shards=2)
    dtype_of = {"float32": lambda n: np.float32, "float16": lambda n: np.float16,
                "mixed": lambda n: (np.float32, np.float16, BF16)[len(n) % 3]}[stored]
    d2 = _recast(d, tmp_path / stored, dtype_of)
    with ShardedCheckpoint(d2) as ck:
        kinds = collections.Counter(ck.dtype(n).name for n in ck.keys())
    # (the router bias is float32 in every case)
    assert set(kinds) == {"float32": {"float32"}, "float16": {"float16", "float32"},
                          "mixed": {"float16", "float32", "bfloat16"}}[stored]
    want = flatten(load_params(d, Config.from_hf(d, **LOAD)))
    m = dsv32_jax.load_model(d2, **STORED)
    got = flatten(m.params)
    assert sorted(got) == sorted(want)
    with ShardedCheckpoint(d2) as ck:
        for path, a in got.items():
            a, w = np.asarray(a), np.asarray(want[path])
            assert a.dtype == w.dtype and a.shape == w.shape, path
            names = hf_names(BF16_CFG, path).reshape(-1)
            # the loaded param is the stored tensor cast to the param dtype (round to nearest even)
            stored_vals = np.stack([np.asarray(ck.get(str(n))) for n in names]).astype(np.float32)
            expect = stored_vals.astype(a.dtype).reshape(a.shape)
            assert np.array_equal(a.view(np.uint8), expect.view(np.uint8)), path
            if stored == "float32":  # bf16 values widened losslessly: exactly the bf16 checkpoint
                assert np.array_equal(a.view(np.uint8), w.view(np.uint8)), path
    if stored == "float16":  # float16 has less range: small bf16 values do change
        assert any(not np.array_equal(np.asarray(got[p]).view(np.uint8), np.asarray(want[p]).view(np.uint8))
                   for p in got)


def test_fp8_weights_and_scales_keep_strict_dtypes(copy):
    specs = abstract_params(CFG)
    for name, dt in [("model.layers.2.self_attn.q_b_proj.weight", np.float32),
                     ("model.layers.1.self_attn.q_b_proj.weight_scale_inv", np.float16),
                     ("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv", BF16)]:
        shape, _ = tensor_specs(CFG)[name]
        d = shutil.copytree(copy, f"{copy}-{name}")
        _edit_shard(d, name, new=np.zeros(shape, dt))
        with pytest.raises(CheckpointError, match=re.escape(repr(name)) + r" has dtype \w+, expected "
                                                  r"(float8_e4m3fn|float32)$"):
            check(ShardedCheckpoint(d), CFG, specs)
    # a non-FP8 param in an unsupported dtype names what is accepted
    name = "model.layers.0.input_layernorm.weight"
    _edit_shard(copy, name, new=np.zeros(tensor_specs(CFG)[name][0], np.float64))
    with pytest.raises(CheckpointError, match=r"has dtype float64, expected bfloat16 \(or float32/float16, "
                                              r"cast on load\)"):
        check(ShardedCheckpoint(copy), CFG, specs)


# ---- 2b. weight storage: float32 copies on a CPU host give the same logits -----------------------
def _logits(model, tokens) -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits of `tokens` (1, S) at every position, one decode step's after them) through
    the engine's forward."""
    from dsv32_jax.engine.generate import forward
    from dsv32_jax.model.transformer import init_cache

    cfg, s = model.config, tokens.shape[1]
    cache = init_cache(cfg, 1, 2 * s)
    pre, cache, _ = forward(model.params, jnp.asarray(tokens), jnp.arange(s)[None], cache, None,
                            cfg=cfg)
    step, _, _ = forward(model.params, jnp.asarray(tokens[:, -1:]), jnp.full((1, 1), s), cache,
                         jnp.zeros((1,), jnp.int32), cfg=cfg)
    return np.asarray(pre), np.asarray(step)


@pytest.mark.parametrize("which, numerics",
                         [("tiny-fp8", {}), ("tiny-fp8", LOAD),
                          ("tiny-fp8", dict(dtype="float32", fp8_activations=True)),
                          ("demo-bf16", {})],
                         ids=["tiny-fp8-bf16+fp8", "tiny-fp8-f32", "tiny-fp8-f32+fp8",
                              "demo-bf16-bf16+fp8"])
def test_widened_weights_give_bit_equal_logits(base, which, numerics):
    """On the CPU, load_model's default storage keeps float32 copies of the bf16 weights and the
    FP8 ones dequantized, without their scales (`checkpoint.storage`); prefill and decode logits
    are bit-equal to the narrow weights' in the deployment numerics (bf16 + FP8 simulation) and in
    float32. With float32 FP8 linears (the blockwise order) the FP8 weights keep their e4m3
    values and their scales (`storage.dequantize_for`)."""
    from dsv32_jax.checkpoint.storage import dequantize_for, scale_name
    from dsv32_jax.model.quant import dequant
    from dsv32_jax.train.demo import DEMO_DIR

    path = base if which == "tiny-fp8" else DEMO_DIR
    narrow = load_model(path, weights="narrow", **numerics)
    wide = load_model(path, **numerics)
    deq = dequantize_for(wide.config)
    assert deq == (numerics != dict(dtype="float32", fp8_activations=True))
    flat_n, flat_w = flatten(narrow.params), flatten(wide.params)
    scale = {p: (*p[:-1], scale_name(p[-1])) for p in flat_n if flat_n[p].dtype == FP8}
    assert set(flat_w) == set(flat_n) - (set(scale.values()) if deq else set())
    widened = [p for p in flat_w if flat_w[p].dtype != flat_n[p].dtype]
    for p in widened:
        w = flat_w[p]
        assert w.dtype == np.float32 and w.shape == flat_n[p].shape, p
        want = np.asarray(flat_n[p]).astype(np.float32)
        if p in scale and deq:  # times its block scales
            want = dequant(want, np.asarray(flat_n[scale[p]]), np.float32, np)
        assert np.array_equal(np.asarray(w), want), p
    assert {flat_n[p].dtype for p in widened} == ({FP8, BF16} if which == "tiny-fp8"
                                                   else {BF16})
    assert flat_w["embed", "weight"].dtype == BF16  # read by rows: kept narrow
    tokens = np.random.default_rng(0).integers(0, narrow.config.vocab_size, (1, 12))
    for a, b in zip(_logits(narrow, tokens), _logits(wide, tokens)):
        assert a.dtype == b.dtype == np.float32 and np.isfinite(a).all()
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_weight_storage_choice(base):
    """"auto" widens on CPU devices only, the Pallas kernels keep e4m3, the native ones its bits,
    bad names fail early."""
    from dsv32_jax.checkpoint import storage

    params = load_params(base, CFG)
    assert storage.widths("auto", params) == "f32" and storage.widths("narrow", params) == "narrow"
    assert storage.widths("auto", params, pallas=True) == "narrow"
    assert storage.widths("auto", params, native=True) == "bits"
    with pytest.raises(ValueError, match="matmul_impl='pallas': its FP8 kernels read e4m3"):
        load_model(base, weights="f32", matmul_impl="pallas")
    with pytest.raises(ValueError, match=r"weight storage must be one of .*'wide'"):
        load_model(base, weights="wide")


# ---- 3. checkpoint errors ------------------------------------------------------------------------
def test_missing_tensor(copy):
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    _edit_shard(copy, name, drop=True)
    with pytest.raises(CheckpointError) as e:
        load_model(copy, **LOAD)
    msg = str(e.value)
    assert "missing" in msg and repr(name) in msg
    assert str(tuple(tensor_specs(CFG)[name][0])) in msg  # the expected shape


def test_tensor_in_index_but_not_in_shard(copy):
    name = "model.layers.0.self_attn.q_b_proj.weight"
    shard = _edit_shard(copy, name, drop=True, fix_index=False)
    with pytest.raises(SafetensorsError, match=re.escape(repr(name))) as e:
        load_model(copy, **LOAD)
    assert shard in str(e.value)


def test_wrong_shape(copy):
    name = "model.layers.0.input_layernorm.weight"
    shard = _edit_shard(copy, name, new=np.ones((CFG.dim - 1,), BF16))
    with pytest.raises(CheckpointError) as e:
        load_model(copy, **LOAD)
    msg = str(e.value)
    assert repr(name) in msg and shard in msg
    assert f"({CFG.dim - 1},)" in msg and f"({CFG.dim},)" in msg


def test_wrong_dtype_fp8_weight_stored_as_bf16(copy):
    name = "model.layers.2.self_attn.q_b_proj.weight"
    shape, dtype = tensor_specs(CFG)[name]
    assert dtype == FP8
    _edit_shard(copy, name, new=np.zeros(shape, BF16))
    with pytest.raises(CheckpointError) as e:
        load_model(copy, **LOAD)
    msg = str(e.value)
    assert repr(name) in msg and "bfloat16" in msg and "float8_e4m3fn" in msg


def test_wrong_dtype_scale(copy):
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
    shape, dtype = tensor_specs(CFG)[name]
    assert dtype == np.float32
    _edit_shard(copy, name, new=np.ones(shape, BF16))
    with pytest.raises(CheckpointError, match=re.escape(repr(name))) as e:
        load_model(copy, **LOAD)
    assert "bfloat16" in str(e.value) and "float32" in str(e.value)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.experts.8.gate_proj.weight",  # expert 8 of 8
                                  "model.rotary_emb.inv_freq"])
def test_unexpected_tensor(copy, name):
    _edit_shard(copy, name, new=np.zeros((4,), np.float32))
    with pytest.raises(CheckpointError) as e:
        load_model(copy, **LOAD)
    assert "unexpected" in str(e.value) and repr(name) in str(e.value)


_MTP = f"model.layers.{CFG.n_layers}."


@pytest.mark.parametrize("suffix,new,match", [
    ("something.new", np.zeros((3,), np.float32), "is not part of the MTP layer"),
    ("enorm.weight", np.zeros((1 << 20,), BF16), r"has shape \(1048576,\), expected \(256,\)"),
    ("shared_head.head.weight", np.zeros((CFG.vocab_size, CFG.dim), np.int32), "has dtype int32"),
    ("mlp.experts.1.up_proj.weight", np.zeros((CFG.moe_inter_dim, CFG.dim), BF16), "has dtype bfloat16"),
    ("eh_proj.weight_scale_inv", np.ones((2, 3), np.float32), r"has shape \(2, 3\), expected \(2, 4\)"),
])
def test_mtp_tensors_are_checked_though_skipped(copy, suffix, new, match):
    """The MTP layer is not loaded, but its tensors are checked all the same (by load_params and by
    convert without --include-mtp): a wrong name, shape or dtype is refused, naming the shard."""
    import convert.run as run
    from convert.plan import ConvertError

    shard = _edit_shard(copy, _MTP + suffix, new=new)
    with pytest.raises(CheckpointError, match=match) as e:
        load_params(copy, Config.from_hf(copy, **LOAD))
    assert shard in str(e.value) and repr(_MTP + suffix) in str(e.value)
    with pytest.raises(ConvertError, match=match):
        run._load_source(copy, "fp8", False, 1 << 20)


def test_partial_or_missing_mtp_layer_is_accepted(copy):
    """The loader needs no MTP tensor: a checkpoint with only part of the MTP layer (its eh_proj,
    which tells it from a decoder layer) or none of it passes the check."""
    mtp = sorted(n for n in _index(copy)["weight_map"] if n.startswith(_MTP))
    for name in [n for n in mtp if "eh_proj" not in n] + [None] + [n for n in mtp if "eh_proj" in n]:
        if name is None:
            check(ShardedCheckpoint(copy), CFG)
        else:
            _edit_shard(copy, name, drop=True)
    check(ShardedCheckpoint(copy), CFG)


def test_truncated_shard(copy):
    shard = os.path.join(copy, sorted(f for f in os.listdir(copy) if f.endswith(".safetensors"))[-1])
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(SafetensorsError) as e:
        load_model(copy, **LOAD)
    assert shard in str(e.value) and "truncated" in str(e.value)


def test_shard_missing_from_disk(copy):
    shard = sorted(f for f in os.listdir(copy) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(copy, shard))
    # is_hf_dir still holds (another shard remains); the index names a file that is gone
    with pytest.raises(SafetensorsError, match=re.escape(shard)):
        load_model(copy, **LOAD)


def test_config_hidden_size_inconsistent_with_tensors(copy):
    _edit_config(copy, hidden_size=384)
    with pytest.raises(CheckpointError) as e:
        load_model(copy, **LOAD)
    m = re.search(r"tensor '(model\.[^']+)' has shape (\([0-9, ]*\)), expected (\([0-9, ]*\))",
                  str(e.value))
    assert m, str(e.value)
    name, got, want = m.groups()
    assert got == str(tensor_specs(CFG)[name][0])
    assert "384" in want and "384" not in got


def test_config_more_experts_than_checkpoint(copy):
    _edit_config(copy, n_routed_experts=16)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.8\."):
        load_model(copy, **LOAD)


def test_config_fewer_layers_than_checkpoint(copy):
    _edit_config(copy, num_hidden_layers=CFG.n_layers - 1)
    with pytest.raises(CheckpointError, match="num_hidden_layers=2"):
        load_model(copy, **LOAD)


@pytest.mark.parametrize("changes, field", [
    (dict(n_group=3), "n_group"),  # 8 routed experts not divisible into 3 groups
    (dict(index_head_dim=96), "index_head_dim"),
    (dict(hidden_size=0), "dim"),
])
def test_invalid_config(copy, changes, field):
    _edit_config(copy, **changes)
    with pytest.raises(ConfigError, match=field):
        load_model(copy, **LOAD)


def test_invalid_config_messages():
    h = CFG.to_hf()
    with pytest.raises(ConfigError, match=r"n_routed_experts=8 is not divisible by n_group=3"):
        Config.from_hf({**h, "n_group": 3})
    with pytest.raises(ConfigError, match=r"index_head_dim=96 must be a power of two"):
        Config.from_hf({**h, "index_head_dim": 96}, fp8_activations=False)
    with pytest.raises(ConfigError, match=r"missing required field 'hidden_size'"):
        Config.from_hf({k: v for k, v in h.items() if k != "hidden_size"})
    assert Config.from_hf(h) == CFG


def test_load_model_fp8_activations_false_accepts_non_fp8_indexer(tmp_path):
    cfg = preset("tiny", index_head_dim=64, fp8_activations=False)  # valid only without FP8 acts
    d = write_checkpoint(cfg, tmp_path / "ihd64", seed=0, include_mtp=False)
    m = load_model(d, **LOAD)
    assert m.config.index_head_dim == 64


# ---- 4. load_model argument errors ---------------------------------------------------------------
def test_load_model_argument_errors(base, tmp_path):
    assert load_model(base, attention_impl="pallas", **LOAD).attention_impl == "pallas"
    with pytest.raises(ValueError, match="bogus"):
        load_model(base, attention_impl="bogus", **LOAD)
    with pytest.raises(TypeError, match="mesh"):
        load_model(base, mesh=object(), **LOAD)
    with pytest.raises(ValueError, match="float16"):
        load_model(base, dtype="float16")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "does-not-exist", **LOAD)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
        load_model(empty, **LOAD)
    shutil.copy(os.path.join(base, "config.json"), empty)  # config.json but no shards
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
        load_model(empty, **LOAD)


def test_dsv32_jax_exports_load_model():
    assert dsv32_jax.load_model is load_model


# ---- 5. Model.logits input validation (raised before any compile) ---------------------------------
@pytest.mark.parametrize("tokens, match", [
    (np.arange(4), r"shape \(batch, seq\)"),
    (np.zeros((1, 4), np.float32), "int array"),
    (np.array([[0, 1, CFG.vocab_size]]), rf"\[0, {CFG.vocab_size}\)"),
    (np.array([[0, -1, 2]]), rf"\[0, {CFG.vocab_size}\)"),
    (np.zeros((1, CFG.max_seq_len + 1), np.int32), "max_position_embeddings"),
])
def test_logits_input_validation(model, tokens, match):
    with pytest.raises(ValueError, match=match):
        model.logits(tokens)


# ---- 6. lazy, bounded-memory reading -------------------------------------------------------------
def _record_gets(monkeypatch) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    orig = ShardedCheckpoint.get

    def get(self, name):
        counts[name] += 1
        out = orig(self, name)
        assert isinstance(out, np.memmap)  # a view of the mapped file, not a copy
        return out

    monkeypatch.setattr(ShardedCheckpoint, "get", get)
    return counts


def test_check_reads_headers_only(base, monkeypatch):
    counts = _record_gets(monkeypatch)
    with ShardedCheckpoint(base) as ckpt:
        check(ckpt, CFG)
    assert not counts


def test_every_tensor_read_once_mtp_never(base, model, monkeypatch):
    counts = _record_gets(monkeypatch)
    params = load_params(base, model.config)
    jax.block_until_ready(params)
    expected = set(tensor_specs(CFG, include_mtp=False))
    assert set(counts) == expected  # all used tensors, no MTP tensor
    # the first tensor of a stacked param may be viewed once more (for its slice shape); no more
    stacked = sum(hf_names(model.config, p).ndim > 0 for p in flatten(params))
    assert max(counts.values()) <= 2
    assert sum(counts.values()) - len(expected) <= stacked


def test_reader_reads_only_the_requested_slice(base, monkeypatch):
    path = ("moe_layers", "ffn", "experts", "w1_weight")
    spec = flatten(abstract_params(CFG))[path]
    names = hf_names(CFG, path)
    assert names.shape == (CFG.n_moe_layers, CFG.n_routed_experts)
    counts = _record_gets(monkeypatch)
    with ShardedCheckpoint(base) as ckpt:
        read = hf._reader(ckpt, names, spec)
        part = read((slice(1, 2), slice(2, 4), slice(0, 64)))
        assert part.shape == (1, 2, 64, CFG.dim) and part.dtype == FP8
        assert set(counts) == {f"model.layers.2.mlp.experts.{e}.gate_proj.weight" for e in (2, 3)}
        full = np.asarray(ckpt.get("model.layers.2.mlp.experts.3.gate_proj.weight"))
        assert part[0, 1].tobytes() == np.ascontiguousarray(full[:64]).tobytes()


def test_host_memory_bounded_by_largest_param(base, model):
    """numpy allocations while loading stay a few params wide (one param at a time), far below the
    checkpoint size. On the CPU, JAX may keep an aligned numpy buffer as the device array's storage
    (no copy), so what is still allocated when loading ends is the params themselves: it is counted
    apart (at most their bytes) and the bound is on the transient part, the peak above it."""
    total = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base))
    leaves = flatten(abstract_params(model.config)).values()
    largest = max(s.nbytes for s in leaves)
    assert total > 8 * largest
    load_params(base, model.config)  # warm up caches (tracing of abstract_params etc.)
    tracemalloc.start()
    try:
        params = load_params(base, model.config)
        jax.block_until_ready(params)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held <= sum(s.nbytes for s in leaves) + largest, (held, peak)
    assert peak - held < min(4 * largest, total / 2), (peak, held, total, largest)


# ---- the synthetic writer deletes only its own leftovers and writes durably ----------------------
def test_synthetic_writer_partial_dir(tmp_path, monkeypatch):
    cfg = preset("tiny", n_layers=1, n_dense_layers=1, vocab_size=512)
    out = tmp_path / "ck"
    partial = tmp_path / "ck.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("not the writer's")
    with pytest.raises(FileExistsError, match=r"ck\.partial: exists and was not left by write_checkpoint"):
        write_checkpoint(cfg, out, include_tokenizer=False)
    assert (partial / "mine.txt").read_text() == "not the writer's" and not out.exists()
    os.remove(partial / "mine.txt")
    (partial / ".dsv32_synthetic_partial").write_text("")  # an interrupted write_checkpoint
    (partial / "half.safetensors").write_bytes(b"junk")
    out.mkdir()  # an empty directory is replaced
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append((os.fspath(a), len(synced)))
                        or real_replace(a, b))
    write_checkpoint(cfg, out, include_tokenizer=True)
    assert not partial.exists()
    files = sorted(os.listdir(out))
    assert "half.safetensors" not in files and ".dsv32_synthetic_partial" not in files
    assert "tokenizer.json" in files and "config.json" in files
    n_before = dict(replaced)[str(partial)]
    names = {os.path.basename(s) for s in synced[:n_before] if os.path.dirname(s) == str(partial)}
    for f in files:  # shards are fsynced under their temporary name, before their own rename
        assert f in names or any(n.startswith(f".{f}.") and n.endswith(".tmp") for n in names), f
    assert str(partial) in synced[:n_before] and synced[-1] == str(tmp_path)
    with pytest.raises(FileExistsError, match="not an empty directory"):
        write_checkpoint(cfg, out, include_tokenizer=False)


def _with(name: str, index, value, view=None):
    """The tensor `name` of `base` as stored, with element `index` set (through a `view` dtype)."""
    def edit(ckdir):
        with ShardedCheckpoint(ckdir) as ck:
            a = np.array(ck.get(name))
        b = a.view(view) if view else a
        b[index] = value
        return b.view(a.dtype) if view else b
    return edit


@pytest.mark.parametrize("name,edit,match", [
    ("model.layers.1.mlp.experts.2.gate_proj.weight_scale_inv", _with(
        "model.layers.1.mlp.experts.2.gate_proj.weight_scale_inv", (0, 1), np.inf), r"NaN or Inf \(as float32\)"),
    ("model.layers.1.mlp.experts.2.gate_proj.weight_scale_inv", _with(
        "model.layers.1.mlp.experts.2.gate_proj.weight_scale_inv", (0, 0), np.nan), r"NaN or Inf \(as float32\)"),
    ("model.layers.2.self_attn.q_b_proj.weight", _with(
        "model.layers.2.self_attn.q_b_proj.weight", (7, 9), 0x7F, np.uint8), "FP8 e4m3 NaN code"),
    ("model.layers.0.mlp.gate_proj.weight", _with(
        "model.layers.0.mlp.gate_proj.weight", (0, 0), 0xFF, np.uint8), "FP8 e4m3 NaN code"),
    ("model.norm.weight", _with("model.norm.weight", 5, np.nan), r"NaN or Inf \(as bfloat16\)"),
    ("model.layers.1.mlp.gate.e_score_correction_bias", _with(
        "model.layers.1.mlp.gate.e_score_correction_bias", 3, -np.inf), r"NaN or Inf \(as float32\)"),
    # stored as float32, finite, but past bfloat16's range: Inf once cast to the param dtype
    ("model.layers.0.input_layernorm.weight", lambda ckdir: np.full(CFG.dim, 3.4e38, np.float32),
     r"NaN or Inf \(as bfloat16\)"),
])
def test_nonfinite_weights_are_refused(copy, name, edit, match):
    """A NaN/Inf scale, an FP8 NaN byte (0x7f / 0xff), a NaN norm or bias, or a float32 value that
    is Inf in bfloat16: load_params refuses the checkpoint naming the shard and the tensor."""
    shard = _edit_shard(copy, name, new=edit(copy))
    with pytest.raises(CheckpointError, match=match) as e:
        load_params(copy, Config.from_hf(copy, **LOAD))
    assert str(e.value).startswith(f"{shard}: tensor {name!r} holds")


def test_abstract_params_traced_once_per_config_each_caller_its_own_tree(monkeypatch):
    """Loading, planning and converting all ask for a config's param specs: the model's init is
    traced once per config, and what one caller does to its tree never reaches the next."""
    traced, eval_shape = [], jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a: traced.append(1) or eval_shape(*a))
    cfg = dataclasses.replace(preset("tiny"), vocab_size=1031)  # a config no other test asks for
    first = abstract_params(cfg)
    assert traced
    traced.clear()
    first["embed"]["weight"] = None
    second = abstract_params(cfg)
    assert not traced
    assert second["embed"]["weight"].shape == (1031, cfg.dim)
    assert second == abstract_params(cfg) and second is not abstract_params(cfg)
