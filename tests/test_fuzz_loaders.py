"""Fuzzing the checkpoint loaders: damaged safetensors shards and indexes must end in the project's
own errors, naming the file (and the tensor where one is concerned) - never another exception type,
a hang, or a silent load of different data.

One tiny synthetic FP8 checkpoint (MTP layer included) is written per module; every case damages a
working copy of it in place (one shard or the index) and puts the original bytes back afterwards.
Each case runs through every loader that reads the damaged file:

- `SafetensorsFile` (the one header parser) on the damaged shard;
- `ShardedCheckpoint` + `hf.check` (what `load_model` validates before reading any data);
- the converter's source path: `convert.run._load_source` (config, index, plan with checks,
  MTP layer included) and its `SourceReader`, reading every tensor location through its own file
  descriptor and the victim tensor's bytes;
- `hf.load_params` wherever `check` accepts the damaged checkpoint, whose params must then be
  bit-identical to the undamaged checkpoint's (and on a sample of the refused cases, to see it
  refuses too).

A case passes when every loader either raises SafetensorsError / CheckpointError / ConvertError
whose message names the damaged file (the index, a shard, or for a tensor missing from the
checkpoint the checkpoint directory) and the victim tensor of a targeted edit, or accepts it and
sees exactly the tensors of the original (for `hf.check`: the tensors it loads; the MTP layer is
skipped by the loader). Seeds are fixed; the case counts are printed (run with -s) and checked.

Not covered, by nature: a damaged file that is still a valid checkpoint with the same names,
dtypes and shapes (e.g. two same-sized tensors' offsets swapped, or flipped data bytes) - the
format has no checksums; `convert --hash` records sha256 of the source files for that.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import random
import shutil
import signal

import numpy as np
import pytest

import convert.plan as plan
import convert.run as run
from convert.plan import ConvertError, SourceReader
from dsv32_jax.checkpoint import hf
from dsv32_jax.checkpoint.hf import CheckpointError, check, load_params
from dsv32_jax.checkpoint.safetensors import (DTYPES, INDEX_NAME, MAX_HEADER_BYTES, SafetensorsError,
                                              SafetensorsFile, ShardedCheckpoint, read_header,
                                              write_safetensors)
from dsv32_jax.checkpoint.synthetic import write_checkpoint
from dsv32_jax.checkpoint.weights import abstract_params, flatten, is_mtp_tensor
from dsv32_jax.model.config import Config, ConfigError, preset

CFG = preset("tiny")
OURS = (SafetensorsError, CheckpointError, ConvertError)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
CASE_SECONDS = 20  # a case running longer counts as a hang
LOAD_EVERY = 100     # also run load_params on every n-th refused case
LOAD_ACCEPTED = 10   # and on the first n accepted ones (all accepted ones are compared byte by byte)


# ---- the base checkpoint and the case runner -------------------------------------------------------
def _split(raw: bytes) -> tuple[int, dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict | str | bytes, data: bytes) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data


def _snapshot(directory: str) -> dict:
    """{tensor: (shard, dtype, shape, absolute begin, absolute end)} from the index and the headers."""
    with open(os.path.join(directory, INDEX_NAME)) as f:
        wm = json.load(f)["weight_map"]
    headers = {s: read_header(os.path.join(directory, s)) for s in sorted(set(wm.values()))}
    out = {}
    for name, shard in wm.items():
        h = headers[shard]
        e = h.entries.get(name)
        out[name] = None if e is None else (shard, e.dtype.name, e.shape, e.begin, e.end)
    return out


def _bits(params: dict) -> dict:
    return {p: (np.asarray(a).dtype, np.asarray(a).shape, np.asarray(a).tobytes())
            for p, a in flatten(params).items()}


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"no result after {CASE_SECONDS}s")


@dataclasses.dataclass
class Env:
    work: str
    originals: dict[str, bytes]
    base_snapshot: dict
    base_params: dict
    base_tensors: dict[str, bytes]
    without: dict[str, tuple[str, bytes]]
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    refused: int = 0

    def path(self, rel: str) -> str:
        return os.path.join(self.work, rel)

    # -- one case --
    def run(self, category: str, case: str, files: dict[str, bytes], victim: str | None = None) -> list[str]:
        """Write the damaged `files` (relative name -> bytes), run every loader, restore. Returns
        the problems found (empty: the case passed)."""
        self.counts[category] += 1
        for rel, data in files.items():
            with open(self.path(rel), "wb") as f:
                f.write(data)
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(CASE_SECONDS)
        try:
            return [f"[{category}] {case}: {p}" for p in self._evaluate(files, victim)]
        except _Hang as e:
            return [f"[{category}] {case}: {e}"]
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            for rel in files:
                with open(self.path(rel), "wb") as f:
                    f.write(self.originals[rel])

    def _evaluate(self, files: dict[str, bytes], victim: str | None) -> list[str]:
        problems = []
        damaged = [self.path(rel) for rel in files]
        index_case = INDEX_NAME in files
        # every message must name the damaged file; for the index also the shard it points to,
        # and for a tensor that is simply absent from the checkpoint, the directory
        names_ok = damaged + ([self.path(s) for s in SHARDS] if index_case else [])

        def outcome(label: str, fn):
            try:
                return fn()
            except OURS as e:
                msg = str(e)
                dir_ok = self.work in msg and ("missing tensor" in msg or "unexpected tensors" in msg)
                if not (any(p in msg for p in names_ok) or dir_ok):
                    problems.append(f"{label}: {type(e).__name__} does not name the file: {msg[:300]}")
                if victim is not None and victim not in msg:
                    problems.append(f"{label}: {type(e).__name__} does not name tensor {victim!r}: "
                                    f"{msg[:300]}")
                self.outcomes[f"{label}:{type(e).__name__}"] += 1
                return e
            except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
                problems.append(f"{label}: raised {type(e).__name__}: {str(e)[:300]}")
                return e

        shards = [rel for rel in files if rel.endswith(".safetensors")]
        for rel in shards:
            outcome("SafetensorsFile", lambda: SafetensorsFile(self.path(rel)).keys())

        def loader():
            with ShardedCheckpoint(self.work) as ck:
                check(ck, CFG)
            return "ok"

        got = outcome("check", loader)
        snap = None
        if got == "ok":
            self.outcomes["check:accepted"] += 1
            snap = outcome("snapshot", lambda: _snapshot(self.work))
            if isinstance(snap, dict):
                same = {k: v for k, v in snap.items() if not is_mtp_tensor(CFG, k)}
                want = {k: v for k, v in self.base_snapshot.items() if not is_mtp_tensor(CFG, k)}
                if same != want:
                    diff = sorted(set(same.items()) ^ set(want.items()))[:2]
                    problems.append(f"check accepted different tensors: {diff}")
            with ShardedCheckpoint(self.work) as ck:  # the bytes the loader reads, tensor by tensor
                changed = [k for k, v in self.base_tensors.items() if ck.get(k).tobytes() != v]
            if changed:
                problems.append(f"check accepted, but tensors read differently: {changed[:3]}")
        # the full load (arrays on the device) on the first accepted cases and a sample of refused
        if (got == "ok" and self.outcomes["check:accepted"] <= LOAD_ACCEPTED) or (
                got != "ok" and self.refused % LOAD_EVERY == 0):
            params = outcome("load_params", lambda: load_params(self.work, CFG))
            if isinstance(params, dict) and _bits(params) != self.base_params:
                problems.append("load_params loaded different params without an error")
            if (got == "ok") != isinstance(params, dict):
                problems.append(f"check and load_params disagree: {got!r} vs {type(params).__name__}")
        if got != "ok":
            self.refused += 1

        def converter():
            cfg, ck, leaves = run._load_source(self.work, "fp8", True, 1 << 20)
            try:
                reader = SourceReader(ck)
                seen = {}
                for lf in leaves:
                    for arr in (lf.names, lf.scale_names):
                        for name in ([] if arr is None else arr.reshape(-1)):
                            reader.location(str(name))
                            path, _, entry = reader._entry(str(name))
                            seen[str(name)] = (os.path.basename(path), entry.dtype.name, entry.shape,
                                               entry.begin, entry.end)
                first = victim if victim in seen else next(iter(seen))
                shape, dtype = ck.shape(first), reader.dtype(first)
                buf = np.empty(shape, dtype)
                reader.read_into(first, 0, buf)
                reader.close()
                return seen
            finally:
                ck.close()

        seen = outcome("convert", converter)
        if got == "ok" and isinstance(snap, dict) and snap == self.base_snapshot and not isinstance(seen, dict):
            problems.append(f"the converter refused a checkpoint with every tensor unchanged: {seen}")
        if isinstance(seen, dict):
            self.outcomes["convert:accepted"] += 1
            want = self.base_snapshot
            if seen != want:
                diff = sorted(set(seen.items()) ^ set(want.items()))[:2]
                problems.append(f"the converter accepted different tensors: {diff}")

        def reader_only():  # SourceReader on its own: headers parsed through its descriptors
            with ShardedCheckpoint(self.work) as ck:
                reader = SourceReader(ck)
                try:
                    for name in sorted(self.base_snapshot):
                        if self.base_snapshot[name][0] in {os.path.basename(p) for p in damaged}:
                            reader.location(name)
                finally:
                    reader.close()

        outcome("SourceReader", reader_only)
        return problems


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = write_checkpoint(CFG, root / "base", seed=0, n_shards=2, include_tokenizer=False)
    work = str(shutil.copytree(base, root / "work"))
    # escape targets outside the checkpoint and in a subdirectory: shards holding exactly one
    # tensor with its true data, so only the path is wrong (see test_index_damage)
    os.makedirs(os.path.join(work, "sub"))
    without = {}  # victim -> (its shard, that shard's bytes without it)
    with ShardedCheckpoint(base) as ck:
        for name in (_REGULAR, _MTP):
            for d in (root, os.path.join(work, "sub")):
                write_safetensors(os.path.join(d, _decoy(name)), {name: np.array(ck.get(name))})
            shard = os.path.basename(ck.file_of(name))
            rest = {k: np.array(ck.get(k)) for k in SafetensorsFile(ck.file_of(name)).keys() if k != name}
            tmp = os.path.join(root, "without.safetensors")
            write_safetensors(tmp, rest, {"format": "pt"})
            with open(tmp, "rb") as f:
                without[name] = (shard, f.read())
            os.remove(tmp)
    cache = {}

    def cached_specs(cfg, mtp=False):  # abstract_params traces the model: once per config, not per case
        if (cfg, mtp) not in cache:
            cache[cfg, mtp] = abstract_params(cfg, mtp=mtp)
        return cache[cfg, mtp]

    with pytest.MonkeyPatch.context() as mp:
        for mod in (hf, plan, run):
            mp.setattr(mod, "abstract_params", cached_specs)
        originals = {}
        for rel in (*SHARDS, INDEX_NAME, "config.json"):
            with open(os.path.join(work, rel), "rb") as f:
                originals[rel] = f.read()
        with ShardedCheckpoint(work) as ck:
            tensors = {k: ck.get(k).tobytes() for k in ck.keys() if not is_mtp_tensor(CFG, k)}
        e = Env(work, originals, _snapshot(work), _bits(load_params(work, CFG)), tensors, without)
        yield e
    print(f"\nfuzz cases: {sum(e.counts.values())} {dict(e.counts)}; outcomes: {dict(e.outcomes)}")


def _report(env: Env, category: str, problems: list[str], minimum: int) -> None:
    n = env.counts[category]
    print(f"\n{category}: {n} cases, {len(problems)} problems")
    assert not problems, f"{len(problems)} of {n} {category} cases failed:\n" + "\n".join(problems[:25])
    assert n >= minimum, f"only {n} {category} cases"


# ---- cases -------------------------------------------------------------------------------------------
def test_truncations(env):
    """Cut shard 1 at every structural boundary: inside the 8-byte length, inside the header, at its
    end, and at every tensor's start and end (and one byte short of each end); shard 2 at a few."""
    problems = []
    for rel, every_tensor in ((SHARDS[0], True), (SHARDS[1], False)):
        raw = env.originals[rel]
        n, header, _ = _split(raw)
        spans = sorted((v["data_offsets"] for k, v in header.items() if k != "__metadata__"))
        points = set(range(0, 9)) | {9, 8 + n // 3, 8 + n // 2, 8 + n - 1, 8 + n}
        for b, e in (spans if every_tensor else spans[:3] + spans[-2:]):
            points |= {8 + n + b, 8 + n + e, 8 + n + e - 1}
        for p in sorted(points - {len(raw)}):
            problems += env.run("truncation", f"{rel}[:{p}]", {rel: raw[:p]})
    _report(env, "truncation", problems, 250)


def test_header_length_field(env):
    raw = env.originals[SHARDS[0]]
    n = int.from_bytes(raw[:8], "little")
    problems = []
    for value in (0, 1, n - 8, n - 1, n + 1, n + 8, len(raw) - 8, len(raw) - 7, MAX_HEADER_BYTES + 1,
                  2**63, 2**64 - 1):
        problems += env.run("length", f"length={value}", {SHARDS[0]: value.to_bytes(8, "little") + raw[8:]})
    # a header over the cap in a file that is big enough to hold it: refused before it is read
    big = (MAX_HEADER_BYTES + 8).to_bytes(8, "little") + b" " * 64
    problems += env.run("length", "over the cap", {SHARDS[0]: big})
    _report(env, "length", problems, 12)


_INTERESTING = b'{}[]",:0123456789-+.eE \\\t\nntfalsu\x00\x7f\x80\xc3\xff'


def test_random_header_byte_mutations(env):
    rng = random.Random(20261123)
    problems = []
    for rel in SHARDS:
        raw = env.originals[rel]
        n = int.from_bytes(raw[:8], "little")
        for i in range(90):
            pos = rng.randrange(8, 8 + n)
            new = rng.choice(_INTERESTING) if rng.random() < 0.7 else rng.randrange(256)
            if new == raw[pos]:
                new ^= 0x01
            problems += env.run("byte", f"{rel} byte {pos}: {raw[pos]:#x}->{new:#x}",
                                {rel: raw[:pos] + bytes([new]) + raw[pos + 1:]})
    _report(env, "byte", problems, 180)


def test_random_header_multi_byte_mutations(env):
    """Several bytes changed at once, and bytes inserted into / deleted from the header with the
    length field kept consistent (so the JSON changes length but the data section is intact)."""
    rng = random.Random(7)
    raw = env.originals[SHARDS[0]]
    n = int.from_bytes(raw[:8], "little")
    head, data = bytearray(raw[8:8 + n]), raw[8 + n:]
    problems = []
    for i in range(40):
        h = bytearray(head)
        kind = ("flip", "insert", "delete", "splice")[i % 4]
        if kind == "flip":
            for _ in range(rng.randrange(2, 9)):
                h[rng.randrange(len(h))] = rng.choice(_INTERESTING)
        elif kind == "insert":
            pos = rng.randrange(len(h))
            h[pos:pos] = bytes(rng.choice(_INTERESTING) for _ in range(rng.randrange(1, 4)))
        elif kind == "delete":
            pos = rng.randrange(len(h) - 4)
            del h[pos:pos + rng.randrange(1, 4)]
        else:  # copy a run of the header over another place
            a, b = sorted(rng.sample(range(len(h)), 2))
            k = rng.randrange(4, 40)
            h[b:b + k] = h[a:a + k]
        h = bytes(h)
        problems += env.run("multi-byte", f"{kind} #{i}", {SHARDS[0]: len(h).to_bytes(8, "little") + h + data})
    _report(env, "multi-byte", problems, 40)


def _victims(header: dict) -> list[str]:
    """Tensors of several kinds in this shard: FP8 weight, its scale, bf16 norm/other, the router
    bias, and MTP-layer tensors (skipped by the loader, converted with --include-mtp)."""
    names = [k for k in header if k != "__metadata__"]
    picks = []
    for want in ("experts.0.down_proj.weight", "experts.0.down_proj.weight_scale_inv", "layernorm.weight",
                 "e_score_correction_bias", "embed_tokens.weight", "layers.3.enorm.weight",
                 "layers.3.eh_proj.weight_scale_inv", "layers.3.mlp.experts.1.up_proj.weight",
                 "layers.3.shared_head.head.weight", "q_b_proj.weight"):
        hits = [k for k in names if k.endswith(want) or want in k]
        if hits:
            picks.append(sorted(hits)[0])
    return sorted(set(picks))


def test_targeted_header_edits(env):
    """Wrong dtypes, wrong shapes (same byte size and not), overlapping / gapped / out-of-file /
    inverted / non-integer offsets, unknown entry keys, renamed and duplicated tensors, escaping
    names, bad metadata - each on tensors of every kind, in both shards."""
    rng = random.Random(99)
    problems = []
    for rel in SHARDS:
        raw = env.originals[rel]
        _, header, data = _split(raw)
        victims = _victims(header)
        assert len(victims) >= 4, victims
        for v in victims:
            e = header[v]
            spec_dt = DTYPES[e["dtype"]]
            accepted = {"BF16": {"F16", "F32"}, "F32": {"BF16", "F16"}}.get(e["dtype"], set())
            if v.endswith("weight_scale_inv"):
                accepted = set()
            others = [d for d in DTYPES if d != e["dtype"] and not (d in accepted and
                                                                   DTYPES[d].itemsize == spec_dt.itemsize)]
            edits = {f"dtype {d}": {**e, "dtype": d} for d in rng.sample(others, 5)}
            same = [d for d in others if DTYPES[d].itemsize == spec_dt.itemsize]
            edits.update({f"dtype {d} (same size)": {**e, "dtype": d} for d in same[:3]})
            shape, (b, end) = e["shape"], e["data_offsets"]
            size = end - b
            item = spec_dt.itemsize
            for s in ([1, *shape], [*shape, 1], shape[::-1], [int(np.prod(shape))],
                      [shape[0] + 1, *shape[1:]], [max(shape[0] - 1, 0), *shape[1:]], [], [-1]):
                if s != shape and not (len(shape) == 1 and s == [int(np.prod(shape))]):
                    edits[f"shape {s}"] = {**e, "shape": s}
            for name, offs in [("shift +item", [b + item, end + item]), ("shift -item", [b - item, end - item]),
                               ("begin+1", [b + 1, end]), ("end-1", [b, end - 1]),
                               ("past the end", [b + len(data), end + len(data)]),
                               ("inverted", [end, b]), ("negative", [-size, 0]),
                               ("floats", [float(b), float(end)]), ("strings", [str(b), str(end)]),
                               ("three", [b, end, end]), ("huge", [2**62, 2**62 + size])]:
                edits[f"offsets {name}"] = {**e, "data_offsets": offs}
            edits["no dtype"] = {k: x for k, x in e.items() if k != "dtype"}
            edits["no offsets"] = {k: x for k, x in e.items() if k != "data_offsets"}
            edits["extra key"] = {**e, "crc32": 0}
            edits["not an object"] = [e["dtype"], shape, [b, end]]
            edits = dict(rng.sample(sorted(edits.items(), key=lambda kv: kv[0]), 14))
            for label, new in edits.items():
                h = dict(header)
                h[v] = new
                problems += env.run("targeted", f"{rel} {v}: {label}", {rel: _join(h, data)}, victim=v)
            # renamed: to a name the index does not list, to an escaping name, to a sibling (duplicate)
            others_in_shard = [k for k in header if k not in ("__metadata__", v)]
            for new_name in (v + "x", "../../" + v, "/abs/" + v, v.replace("model.", "model/", 1)):
                h = {(new_name if k == v else k): x for k, x in header.items()}
                problems += env.run("targeted", f"{rel} {v}: renamed {new_name!r}", {rel: _join(h, data)},
                                    victim=None)
            text = json.dumps(header, separators=(",", ":"))
            dup = text.replace("{", "{" + json.dumps(v) + ":" + json.dumps(header[others_in_shard[0]]) + ",", 1)
            problems += env.run("targeted", f"{rel} {v}: duplicated key", {rel: _join(dup, data)}, victim=v)
        for label, meta in [("non-str value", {"format": 1}), ("list", ["pt"]), ("nested", {"a": {"b": "c"}})]:
            h = dict(header, __metadata__=meta)
            problems += env.run("targeted", f"{rel}: metadata {label}", {rel: _join(h, data)})
        problems += env.run("targeted", f"{rel}: header a list", {rel: _join("[1, 2]", data)})
        problems += env.run("targeted", f"{rel}: empty object", {rel: _join("{}", data)})
        problems += env.run("targeted", f"{rel}: NaN shape", {rel: _join(
            json.dumps(header, separators=(",", ":")).replace('"shape":[', '"shape":[NaN,', 1), data)})
        problems += env.run("targeted", f"{rel}: deep nesting", {rel: _join("[" * 50000 + "]" * 50000, data)})
        problems += env.run("targeted", f"{rel}: not UTF-8", {rel: _join(b"{\"\xff\xfe\": 1}", data)})
    _report(env, "targeted", problems, 200)


_REGULAR = "model.layers.1.mlp.experts.2.gate_proj.weight"
_MTP = "model.layers.3.hnorm.weight"


def _decoy(name: str) -> str:
    return f"decoy-{name}.safetensors"


def test_index_damage(env):
    """The index: escaping shard paths (.., absolute, separators; the targets exist and hold the
    right tensor, so only the path is wrong), a tensor moved to the other shard, to a missing file,
    dropped, a ghost tensor added, and a damaged index file."""
    raw = env.originals[INDEX_NAME]
    idx = json.loads(raw)
    wm = idx["weight_map"]
    root = os.path.dirname(env.work)
    problems = []
    for victim in (_REGULAR, _MTP):
        decoy = _decoy(victim)
        for target in ("../" + decoy, os.path.join(root, decoy), "sub/" + decoy, "./sub/" + decoy,
                       os.path.join(env.work, "sub", decoy), "sub\\" + decoy, "..", ".", "",
                       SHARDS[0] + "\x00", "missing.safetensors",
                       SHARDS[1] if wm[victim] == SHARDS[0] else SHARDS[0], 5, None, ["x"]):
            m = dict(wm)
            m[victim] = target
            changed = json.dumps({**idx, "weight_map": m}).encode()
            problems += env.run("index", f"{victim} -> {target!r}", {INDEX_NAME: changed}, victim=victim)
            if isinstance(target, str) and decoy in target:  # and moved out of its shard
                shard, rest = env.without[victim]
                problems += env.run("index", f"{victim} -> {target!r}, moved", {INDEX_NAME: changed, shard: rest},
                                    victim=victim)
        m = dict(wm)
        del m[victim]
        problems += env.run("index", f"{victim} dropped", {INDEX_NAME: json.dumps({**idx, "weight_map": m}).encode()},
                            victim=victim)
    for ghost in ("model.layers.0.ghost.weight", "model.layers.3.ghost.weight"):
        m = dict(wm, **{ghost: SHARDS[0]})
        problems += env.run("index", f"ghost {ghost}", {INDEX_NAME: json.dumps({**idx, "weight_map": m}).encode()},
                            victim=None)
    for label, body in [("weight_map a list", json.dumps({"weight_map": list(wm)}).encode()),
                        ("no weight_map", b'{"metadata": {}}'), ("empty weight_map", b'{"weight_map": {}}'),
                        ("not JSON", b"{not json"), ("not UTF-8", b'{"weight_map": {"\xff": "a"}}'),
                        ("a list", b"[]"), ("empty file", b""), ("deep nesting", b"[" * 50000),
                        ("duplicate key", raw.replace(b'"weight_map": {', b'"weight_map": {"x": "y", "x": "z", ', 1)
                         if b'"weight_map": {' in raw else raw[:-1]),
                        ("NaN", b'{"weight_map": {"a": NaN}}')]:
        problems += env.run("index", label, {INDEX_NAME: body})
    for p in (1, len(raw) // 3, len(raw) // 2, len(raw) - 2):
        problems += env.run("index", f"truncated at {p}", {INDEX_NAME: raw[:p]})
    _report(env, "index", problems, 45)


def test_whole_file_damage(env):
    rng = np.random.default_rng(5)
    problems = []
    for rel in SHARDS:
        raw = env.originals[rel]
        for label, body in [("empty", b""), ("7 bytes", raw[:7]), ("zeros", bytes(len(raw))),
                            ("random", rng.integers(0, 256, len(raw), dtype=np.uint8).tobytes()),
                            ("doubled", raw + raw), ("one extra byte", raw + b"\0"),
                            ("other shard", env.originals[SHARDS[1] if rel == SHARDS[0] else SHARDS[0]])]:
            problems += env.run("whole-file", f"{rel}: {label}", {rel: body})
    _report(env, "whole-file", problems, 14)


def test_case_count(env):
    """At least a few hundred cases in all (when the whole module ran)."""
    total = sum(env.counts.values())
    if len(env.counts) < 9:
        pytest.skip("only part of the module ran")
    print(f"\ntotal fuzz cases: {total}")
    assert total >= 600
    assert env.outcomes["check:accepted"] > 0  # benign damage (e.g. metadata bytes) loads fine


# ---- config.json: every field with values of every wrong type and range -----------------------------
_BAD_VALUES = [None, "7", [], {}, True, float("nan"), float("inf"), -1, 0, 0.5, 2**40, 2**62]


def _config_keys(hf: dict) -> list[tuple[str, ...]]:
    """Every key of config.json, nested ones (quantization_config, rope_scaling) as paths."""
    keys = []
    for k, v in hf.items():
        keys.append((k,))
        if isinstance(v, dict):
            keys += [(k, sub) for sub in v]
    return keys + [("quantization_config", "weight_block_size", 0)]


def _set_key(hf: dict, path: tuple, value) -> dict:
    out = json.loads(json.dumps(hf))
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


def _config_case(env: Env, label: str, text: str, key: str | None) -> list[str]:
    """config.json replaced by `text`: Config.from_hf and the converter's source path must refuse it
    with a ConfigError / ConvertError naming config.json (and `key`, when given), or accept it and then
    end in our own errors or a clean plan - within CASE_SECONDS, never another exception."""
    env.counts["config"] += 1
    path = env.path("config.json")
    with open(path, "w") as f:
        f.write(text)
    problems = []
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        for loader, fn in (("from_hf", lambda: Config.from_hf(env.work)),
                           ("convert", lambda: run._load_source(env.work, "fp8", True, 1 << 20)[1].close())):
            try:
                fn()
                env.outcomes[f"config-{loader}:accepted"] += 1
            except (ConfigError, *OURS) as e:
                if isinstance(e, ConfigError) and env.counts["config"] % 10:
                    break  # the converter reads config.json with from_hf: run it on every 10th only
                env.outcomes[f"config-{loader}:{type(e).__name__}"] += 1
                if isinstance(e, ConfigError) or "bad config.json" in str(e):
                    if path not in str(e) or (key is not None and key not in str(e)):
                        problems.append(f"[config] {label}: {loader}: does not name {path} and "
                                        f"{key!r}: {str(e)[:300]}")
    except _Hang as e:
        problems.append(f"[config] {label}: {e}")
    except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
        problems.append(f"[config] {label}: raised {type(e).__name__}: {str(e)[:300]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        with open(path, "wb") as f:
            f.write(env.originals["config.json"])
    return problems


def test_config_types_and_ranges(env):
    """Each config.json field set to a value of another type or out of range (null, a string, a list,
    an object, a bool, NaN, ±Infinity, negative, zero, fractional, 2**40, 2**62, 10**30): refused
    naming the file and the field, or accepted and loaded as the checkpoint dictates."""
    hf = json.loads(env.originals["config.json"])
    problems = []
    for path in _config_keys(hf):
        for value in _BAD_VALUES:
            text = json.dumps(_set_key(hf, path, value))  # NaN / Infinity: the JSON literals
            key = str(path[-1]) if len(path) < 3 else "weight_block_size"
            literal = isinstance(value, float) and not math.isfinite(value)  # refused by the parser
            problems += _config_case(env, f"{'.'.join(map(str, path))}={value!r}", text,
                                     key=None if literal else key)
    for key in ("quantization_config", "rope_scaling"):
        for value in ("fp8", ["fp8"], 128, True):
            problems += _config_case(env, f"{key}={value!r}", json.dumps(dict(hf, **{key: value})), key)
    _report(env, "config", problems, 500)


# ---- non-regular files where a checkpoint file should be --------------------------------------------
def _nonregular_case(env: Env, rel: str, kind: str, root: str) -> list[str]:
    """`rel` replaced by a FIFO, a directory, a symlink to a FIFO or to /dev/zero: every loader must
    refuse it at once with our error (for config.json: ConfigError) naming it - not block in open()."""
    env.counts["non-regular"] += 1
    path = env.path(rel)
    aside = path + ".aside"
    os.rename(path, aside)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "link to a fifo":
        target = os.path.join(root, f"fifo-{len(os.listdir(root))}")
        os.mkfifo(target)
        os.symlink(target, path)
    else:
        os.symlink("/dev/zero", path)
    problems = []
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)

    def with_check():
        with ShardedCheckpoint(env.work) as ck:
            check(ck, CFG)

    loaders = [("from_hf", lambda: Config.from_hf(env.work)), ("check", with_check),
               ("convert", lambda: run._load_source(env.work, "fp8", True, 1 << 20)[1].close())]
    if rel.endswith(".safetensors"):
        loaders.append(("SafetensorsFile", lambda: SafetensorsFile(path)))
    try:
        for label, fn in loaders:
            try:
                fn()
                if (rel == "config.json") == (label in ("from_hf", "convert")):  # it reads the file
                    problems.append(f"[non-regular] {rel} as {kind}: {label} accepted it")
            except (ConfigError, *OURS) as e:
                if rel not in str(e):
                    problems.append(f"[non-regular] {rel} as {kind}: {label}: does not name it: {e}")
                env.outcomes[f"non-regular:{type(e).__name__}"] += 1
    except _Hang as e:
        problems.append(f"[non-regular] {rel} as {kind}: {e}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"[non-regular] {rel} as {kind}: raised {type(e).__name__}: {str(e)[:300]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.remove(path)
        os.rename(aside, path)
    return problems


def test_non_regular_files(env, tmp_path):
    """config.json, the index and each shard as a FIFO (open() would block forever), a directory, a
    symlink to a FIFO and a symlink to a character device (/dev/zero never ends)."""
    problems = []
    for rel in ("config.json", INDEX_NAME, *SHARDS):
        for kind in ("fifo", "directory", "link to a fifo", "link to /dev/zero"):
            problems += _nonregular_case(env, rel, kind, str(tmp_path))
    _report(env, "non-regular", problems, 16)
