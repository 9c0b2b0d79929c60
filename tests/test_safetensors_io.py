"""Tests for dsv32_jax.checkpoint.safetensors (numpy + ml_dtypes only; optional cross-check with `safetensors`)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

from dsv32_jax.checkpoint.safetensors import (
    DTYPES,
    LazyTensor,
    SafetensorsError,
    SafetensorsFile,
    ShardedCheckpoint,
    TensorNotFoundError,
    dtype_name,
    write_safetensors,
)


def _sample(dt: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bit patterns of dtype ``dt`` (bools restricted to 0/1)."""
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    if dt == np.bool_:
        raw &= 1
    return raw.view(dt).reshape(shape)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _raw_file(path, header: dict, data: bytes = b"", n: int | None = None) -> str:
    """Write a hand-made safetensors file (``n`` overrides the header length field)."""
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(h) if n is None else n).to_bytes(8, "little") + h + data)
    return str(path)


def test_dtype_table():
    assert DTYPES["F8_E4M3"] == np.dtype(ml_dtypes.float8_e4m3fn)
    assert DTYPES["BF16"] == np.dtype(ml_dtypes.bfloat16)
    for name, dt in DTYPES.items():
        assert dtype_name(dt) == name
    assert dtype_name(np.float32) == "F32"
    with pytest.raises(ValueError, match="not supported"):
        dtype_name(np.complex64)
    with pytest.raises(ValueError):
        dtype_name(np.dtype(">f4"))


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_round_trip_every_dtype_bit_exact(tmp_path, name):
    dt = DTYPES[name]
    tensors = {"a.weight": _sample(dt, (3, 5), 1), "b": _sample(dt, (7,), 2), "scalar": _sample(dt, (), 3),
               "empty": _sample(dt, (0, 4), 4)}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors)
    with SafetensorsFile(path) as f:
        assert f.keys() == sorted(tensors)
        for k, v in tensors.items():
            assert f.shape(k) == v.shape and f.dtype(k) == dt and f.nbytes(k) == v.nbytes
            got = f.get(k)
            assert got.shape == v.shape and got.dtype == dt
            assert _bits(got) == _bits(v)


def test_zero_d_and_empty_and_no_tensors(tmp_path):
    path = tmp_path / "z.safetensors"
    tensors = {"s": np.float32(2.5), "e": np.zeros((0,), np.int64), "e2": np.zeros((2, 0, 3), np.float16)}
    write_safetensors(path, tensors)
    f = SafetensorsFile(path)
    assert f.get("s").shape == () and float(f.get("s")) == 2.5
    assert f.get("e").shape == (0,) and f.get("e2").shape == (2, 0, 3)
    write_safetensors(tmp_path / "none.safetensors", {})
    assert SafetensorsFile(tmp_path / "none.safetensors").keys() == []


def test_metadata_round_trip_and_layout(tmp_path):
    path = tmp_path / "m.safetensors"
    meta = {"format": "np", "note": "ünïcode"}
    write_safetensors(path, {"b": np.ones(3, np.float32), "a": np.arange(4, dtype=np.int8)}, metadata=meta)
    f = SafetensorsFile(path)
    assert f.metadata == meta
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0
    assert [k for k in header if k != "__metadata__"] == ["a", "b"]  # sorted by name in the file
    assert header["a"]["data_offsets"] == [0, 4] and header["b"]["data_offsets"] == [4, 16]  # contiguous
    assert len(raw) == 8 + n + 16
    assert SafetensorsFile(_raw_file(tmp_path / "nometa.safetensors", {})).metadata == {}
    with pytest.raises(ValueError, match="metadata"):
        write_safetensors(tmp_path / "bad.safetensors", {}, metadata={"k": 1})


def test_get_is_zero_copy_memmap(tmp_path):
    path = tmp_path / "mm.safetensors"
    write_safetensors(path, {"w": np.zeros((4, 4), np.float32)})
    f = SafetensorsFile(path)
    w = f.get("w")
    assert isinstance(w, np.memmap) and not w.flags.owndata and not w.flags.writeable
    # Writing the file through another handle is visible through the mapping: no copy was made.
    n = int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as fh:
        fh.seek(8 + n + 4 * 5)
        fh.write(np.float32(7.0).tobytes())
    assert w[1, 1] == 7.0
    f.close()
    assert w[1, 1] == 7.0  # views outlive close()
    with pytest.raises(TensorNotFoundError, match="nope"):
        f.get("nope")


def _two_shards(d, with_index: bool) -> dict[str, np.ndarray]:
    s1 = {"model.embed": _sample(DTYPES["BF16"], (4, 3)), "model.l0.w": _sample(DTYPES["F8_E4M3"], (2, 8))}
    s2 = {"model.l0.scale_inv": np.ones((1, 1), np.float32), "lm_head": _sample(DTYPES["BF16"], (3, 4))}
    write_safetensors(d / "model-00001-of-00002.safetensors", s1)
    write_safetensors(d / "model-00002-of-00002.safetensors", s2)
    if with_index:
        wm = {k: "model-00001-of-00002.safetensors" for k in s1} | {k: "model-00002-of-00002.safetensors" for k in s2}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    return s1 | s2


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_checkpoint(tmp_path, with_index):
    tensors = _two_shards(tmp_path, with_index)
    with ShardedCheckpoint(tmp_path) as ckpt:
        assert ckpt.keys() == sorted(tensors)
        assert "lm_head" in ckpt and "missing" not in ckpt
        assert ckpt.file_of("lm_head") == os.path.join(str(tmp_path), "model-00002-of-00002.safetensors")
        for k, v in tensors.items():
            assert ckpt.shape(k) == v.shape and ckpt.dtype(k) == v.dtype
            got = ckpt.get(k)
            assert isinstance(got, np.memmap) and _bits(got) == _bits(v)
        for method in (ckpt.get, ckpt.shape, ckpt.dtype, ckpt.file_of):
            with pytest.raises(KeyError) as ei:
                method("missing")
            assert "missing" in str(ei.value) and str(tmp_path) in str(ei.value)


def test_single_file_checkpoint_without_index(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"x": np.arange(3, dtype=np.int32)})
    assert ShardedCheckpoint(tmp_path).get("x").tolist() == [0, 1, 2]
    with pytest.raises(SafetensorsError, match="no .*safetensors"):
        ShardedCheckpoint(tmp_path / "nothing_here")


def test_index_names_missing_shard(tmp_path):
    _two_shards(tmp_path, with_index=True)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(SafetensorsError, match="model-00002-of-00002.safetensors.*does not exist"):
        ShardedCheckpoint(tmp_path)


def test_index_lists_tensor_absent_from_shard(tmp_path):
    _two_shards(tmp_path, with_index=True)
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(SafetensorsError, match="'ghost'.*missing from this shard"):
        ShardedCheckpoint(tmp_path).get("ghost")


def test_duplicate_tensor_across_shards_without_index(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1, np.float32)})
    write_safetensors(tmp_path / "b.safetensors", {"x": np.zeros(1, np.float32)})
    with pytest.raises(SafetensorsError, match="'x' is in both"):
        ShardedCheckpoint(tmp_path)


def test_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": np.ones(10, np.float32), "b": np.ones(10, np.float32)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(SafetensorsError, match=r"t\.safetensors: tensor 'b'.*truncated"):
        SafetensorsFile(path)
    path.write_bytes(raw[:5])
    with pytest.raises(SafetensorsError, match="shorter than"):
        SafetensorsFile(path)
    path.write_bytes(raw[:20])
    with pytest.raises(SafetensorsError, match="header length .* exceeds"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "header_bytes, match",
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"[1, 2]", "JSON list, expected an object"),
        (b'{"a": 1}', "'a'.*expected an object"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "duplicate key 'a'"),
        (b'{"__metadata__": {"k": 1}}', "__metadata__ must map str to str"),
    ],
)
def test_corrupt_header(tmp_path, header_bytes, match):
    path = tmp_path / "c.safetensors"
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + b"\0" * 8)
    with pytest.raises(SafetensorsError, match=match) as ei:
        SafetensorsFile(path)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"dtype": "F4", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype 'F4'"),
        ({"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "negative or inverted"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "negative or inverted"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "span 8 bytes, expected 12"),
        ({"dtype": "BF16", "shape": [2], "data_offsets": [0, 8]}, "span 8 bytes, expected 4"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}, "data section has only 16 bytes"),
    ],
)
def test_bad_tensor_entry(tmp_path, entry, match):
    path = _raw_file(tmp_path / "e.safetensors", {"w": entry}, b"\0" * 16)
    with pytest.raises(SafetensorsError, match=match) as ei:
        SafetensorsFile(path)
    assert path in str(ei.value) and "'w'" in str(ei.value)


def test_overlapping_tensors_rejected(tmp_path):
    e = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    path = _raw_file(tmp_path / "o.safetensors", {"a": e, "b": {**e, "data_offsets": [4, 12]}}, b"\0" * 16)
    with pytest.raises(SafetensorsError, match="'a' and 'b' overlap"):
        SafetensorsFile(path)


def test_streaming_writer_with_lazy_tensors(tmp_path):
    produced: list[str] = []

    def make(name: str, value: np.ndarray):
        def fn() -> np.ndarray:
            produced.append(name)
            return value
        return LazyTensor(value.shape, value.dtype, fn)

    big = _sample(DTYPES["BF16"], (64, 32))
    small = np.arange(6, dtype=np.int16).reshape(2, 3)
    tensors = {"z": make("z", big), "a": make("a", small), "eager": np.ones(2, bool)}
    path = tmp_path / "lazy.safetensors"
    write_safetensors(path, tensors)
    assert produced == ["a", "z"]  # produced once each, in file order, only at write time
    f = SafetensorsFile(path)
    assert _bits(f.get("z")) == _bits(big) and f.get("a").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert f.get("eager").tolist() == [True, True]


@pytest.mark.parametrize(
    "produced, match",
    [
        (np.zeros((2, 3), np.float32), r"'w' produced shape \(2, 3\).*declared shape \(3, 2\)"),
        (np.zeros((3, 2), np.float16), "'w' produced .* dtype float16, declared .* dtype float32"),
    ],
)
def test_declared_vs_produced_mismatch_leaves_no_file(tmp_path, produced, match):
    path = tmp_path / "bad.safetensors"
    tensors = {"a": np.ones(4, np.float32), "w": LazyTensor((3, 2), np.float32, lambda: produced)}
    with pytest.raises(ValueError, match=match):
        write_safetensors(path, tensors)
    assert not path.exists() and not (tmp_path / "bad.safetensors.tmp").exists()


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "fail.safetensors"

    def boom() -> np.ndarray:
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        write_safetensors(path, {"a": np.ones(3, np.float32), "b": LazyTensor((1,), np.float32, boom)})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not supported"):
        write_safetensors(path, {"c": np.ones(2, np.complex64)})
    with pytest.raises(TypeError, match="'l'"):
        write_safetensors(path, {"l": [1, 2]})
    assert list(tmp_path.iterdir()) == []


def test_cross_check_with_safetensors_package(tmp_path):
    import safetensors as st  # the test extra installs it (no torch needed): never skipped
    tensors = {name.lower(): _sample(dt, (2, 3), i) for i, (name, dt) in enumerate(sorted(DTYPES.items()))}
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, tensors, metadata={"k": "v"})
    theirs = dict(st.deserialize(ours.read_bytes()))
    assert sorted(theirs) == sorted(tensors)
    for k, v in tensors.items():
        assert theirs[k]["dtype"] == dtype_name(v.dtype) and list(theirs[k]["shape"]) == list(v.shape)
        assert bytes(theirs[k]["data"]) == _bits(v)
    specs = {k: st.TensorSpec(dtype=v.dtype.name, shape=list(v.shape), data_ptr=v.ctypes.data, data_len=v.nbytes)
             for k, v in tensors.items()}
    ref = tmp_path / "ref.safetensors"
    st.serialize_file(specs, str(ref), metadata={"k": "v"})
    f = SafetensorsFile(ref)
    assert f.metadata == {"k": "v"}
    for k, v in tensors.items():
        assert f.dtype(k) == v.dtype and _bits(f.get(k)) == _bits(v)


# ---- the one header parser: cap, tiling, strict entries ------------------------------------------
def test_header_length_over_the_cap_is_refused_before_reading(tmp_path, monkeypatch):
    import dsv32_jax.checkpoint.safetensors as st

    path = _raw_file(tmp_path / "big.safetensors", {}, n=st.MAX_HEADER_BYTES + 1)
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
    with pytest.raises(SafetensorsError, match=rf"big\.safetensors: header length {st.MAX_HEADER_BYTES + 1} "
                                               "exceeds the limit"):
        SafetensorsFile(path)
    assert reads == [8]  # only the length field was read
    # the cap holds even where the file is big enough to hold such a header (sparse file)
    with open(path, "r+b") as f:
        f.truncate(st.MAX_HEADER_BYTES + 100)
    reads.clear()
    with pytest.raises(SafetensorsError, match="exceeds the limit"):
        st.read_header(path)
    assert reads == [8]


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\0" * 12, r"12 bytes but its tensors end at byte 8 \(4 trailing bytes"),
    ],
)
def test_trailing_bytes_refused(tmp_path, data, match):
    e = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    path = _raw_file(tmp_path / "t.safetensors", {"a": e}, data)
    with pytest.raises(SafetensorsError, match=match):
        SafetensorsFile(path)


def test_gap_between_tensors_refused(tmp_path):
    e = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    path = _raw_file(tmp_path / "g.safetensors", {"a": e, "b": {**e, "data_offsets": [8, 12]}}, b"\0" * 12)
    with pytest.raises(SafetensorsError, match=r"g\.safetensors: bytes \[4, 8\) .*before tensor 'b'.*gap"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "header, match",
    [
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}},
         r"'w': unknown header entry keys \['extra'\]"),
        ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "'w': unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "'w': shape"),
        ({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, "'w': shape"),
    ],
)
def test_strict_entries(tmp_path, header, match):
    path = _raw_file(tmp_path / "s.safetensors", header, b"\0" * 4)
    with pytest.raises(SafetensorsError, match=match):
        SafetensorsFile(path)


def test_nan_and_deep_nesting_in_header(tmp_path):
    raw = b'{"__metadata__": {"k": "v"}, "w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'
    path = tmp_path / "n.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(SafetensorsError, match="NaN is not a JSON number"):
        SafetensorsFile(path)
    raw = b"[" * 100_000 + b"]" * 100_000  # RecursionError inside json, not a crash
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(SafetensorsError, match=r"n\.safetensors: header is not valid UTF-8 JSON"):
        SafetensorsFile(path)


def test_read_header_through_a_descriptor(tmp_path):
    from dsv32_jax.checkpoint.safetensors import read_header

    path = tmp_path / "h.safetensors"
    write_safetensors(path, {"a": np.ones(3, np.float32), "b": np.zeros((2, 2), np.int8)}, {"k": "v"})
    fd = os.open(path, os.O_RDONLY)
    try:
        h = read_header(path, fd)
        os.fstat(fd)  # still open: the caller's descriptor is not closed
    finally:
        os.close(fd)
    assert h.metadata == {"k": "v"} and sorted(h.entries) == ["a", "b"]
    raw = path.read_bytes()
    a = h.entries["a"]
    assert raw[h.data_start + a.begin:h.data_start + a.end] == np.ones(3, np.float32).tobytes()
    assert h.file_size == len(raw)


def test_file_changed_after_header_was_read(tmp_path):
    path = tmp_path / "c.safetensors"
    write_safetensors(path, {"a": np.ones(4, np.float32)})
    f = SafetensorsFile(path)
    with open(path, "ab") as g:
        g.write(b"\0" * 8)
    with pytest.raises(SafetensorsError, match=r"c\.safetensors: the file is now .*reading tensor 'a'"):
        f.get("a")


# ---- the index may not point outside the checkpoint directory ------------------------------------
@pytest.mark.parametrize("fname", ["../model-00001-of-00002.safetensors", "/tmp/x.safetensors",
                                   "sub/model-00001-of-00002.safetensors", "..", ".", "",
                                   "a\\b.safetensors", "x\0.safetensors"])
def test_index_paths_may_not_escape(tmp_path, fname):
    d = tmp_path / "ck"
    d.mkdir()
    _two_shards(d, with_index=True)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(
        (d / "model-00001-of-00002.safetensors").read_bytes())  # an escape target that exists
    index = d / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"]["model.embed"] = fname
    index.write_text(json.dumps(idx))
    with pytest.raises(SafetensorsError) as e:
        ShardedCheckpoint(d)
    msg = str(e.value)
    assert str(index) in msg and "'model.embed'" in msg and repr(fname) in msg and "plain file name" in msg


@pytest.mark.parametrize("weight_map, match", [
    ([1, 2], "must map tensor names to file names, found a JSON list"),
    ({"model.embed": 3}, "entry 'model.embed': 3 is not a file name"),
])
def test_index_bad_weight_map(tmp_path, weight_map, match):
    _two_shards(tmp_path, with_index=True)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SafetensorsError, match=match):
        ShardedCheckpoint(tmp_path)


def test_shard_tensor_missing_from_index(tmp_path):
    _two_shards(tmp_path, with_index=True)
    index = tmp_path / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    del idx["weight_map"]["model.l0.w"]
    index.write_text(json.dumps(idx))
    ck = ShardedCheckpoint(tmp_path)
    with pytest.raises(SafetensorsError, match=r"00001-of-00002\.safetensors: holds tensor 'model\.l0\.w' but "
                                               r".*index\.json does not list it"):
        ck.shape("model.embed")
    idx["weight_map"]["model.l0.w"] = "model-00002-of-00002.safetensors"  # listed under the wrong shard
    index.write_text(json.dumps(idx))
    with pytest.raises(SafetensorsError, match=r"holds tensor 'model\.l0\.w' but .* maps it to .*00002"):
        ShardedCheckpoint(tmp_path).shape("model.embed")


# ---- writer durability -----------------------------------------------------------------------------
def test_writer_fsyncs_file_and_directory_and_never_touches_other_files(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "w.safetensors"
    (tmp_path / "w.safetensors.tmp").write_text("a user's file")  # the old fixed temp name
    write_safetensors(path, {"a": np.ones(2, np.float32)})
    assert len(synced) == 2
    assert os.path.basename(synced[0]).startswith(".w.safetensors.") and synced[0].endswith(".tmp")
    assert synced[1] == str(tmp_path)  # the directory, after the rename
    assert (tmp_path / "w.safetensors.tmp").read_text() == "a user's file"
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors", "w.safetensors.tmp"]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    with open("/proc/self/status") as f:
        return int(next(ln.split()[1] for ln in f if ln.startswith("Umask:")), 8)
