"""`convert_checkpoint`: released HF checkpoint dir -> converted Orbax dir (see `dsv32_jax.checkpoint.orbax_layout`).

Steps: validate config.json and every tensor (names, shapes, dtypes, shard integrity) before
writing anything; create every output array in `OUT_DIR.partial`; write chunk by chunk (a pool of
`workers` threads, each reading one chunk's source bytes with pread and writing that chunk);
log each finished chunk with its CRC32 in `OUT_DIR.partial/.convert_progress`; write the Orbax
metadata, config.json, tokenizer files and manifest.json; fsync them; rename `OUT_DIR.partial` to
`OUT_DIR` (if that rename fails, ConvertError says where the complete result is kept and how to
finish by hand).

An interrupted or failed run (a full disk, say) leaves `OUT_DIR.partial`; rerunning the same command
resumes it: chunks in the progress log are re-read and their CRC checked, the rest is written. A
`.partial` from different options or different source files is discarded and the conversion starts
over. One run at a time writes OUT_DIR: it holds `dsv32_jax.dirlock` on `OUT_DIR.lock` from its first
look at OUT_DIR until the end, and a second run is refused ("OUT_DIR is being written by pid N")
without touching anything, so a live run's `.partial` is never taken for a stale one.

Nothing the run did not create is deleted: OUT_DIR may not overlap the source in either direction
(resolved paths and inodes are compared); a non-empty OUT_DIR is replaced only with `force` and
only if it is a previous conversion holding nothing else; a stale `.partial` is deleted only if it
carries our state file or manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import secrets
import shutil
import sys
import threading
import time
import zlib

import numpy as np

from dsv32_jax.model.config import Config, ConfigError
from dsv32_jax.checkpoint.hf import CheckpointError
from dsv32_jax.checkpoint.orbax_layout import (FORMAT, FORMAT_VERSION, MANIFEST, MTP_DIR, PARAMS_DIR,
                                              array_name, create_array, write_context,
                                              write_tree_metadata)
from dsv32_jax.checkpoint.safetensors import (INDEX_NAME, SafetensorsError, ShardedCheckpoint,
                                              TensorNotFoundError, fsync_dir, fsync_file)
from dsv32_jax.checkpoint.weights import abstract_params, flatten
from dsv32_jax.dirlock import hold

from convert.plan import (DEFAULT_CHUNK_BYTES, Buffers, ConvertError, Leaf, SourceReader, Unit,
                          plan_mtp, plan_params, read_unit)

WEIGHTS = ("fp8", "bf16")
STATE_FILE = ".convert_state.json"
PROGRESS_FILE = ".convert_progress"
_SOURCE_ERRORS = (ConfigError, CheckpointError, SafetensorsError, TensorNotFoundError)


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def output_config(cfg: Config, weights: str) -> Config:
    """The config of the converted params (bf16: FP8 weights become plain bf16, no scales)."""
    return cfg if weights == "fp8" else dataclasses.replace(cfg, weight_dtype="bf16")


def _load_source(hf_dir: str, weights: str, include_mtp: bool, chunk_bytes: int):
    """(cfg, ckpt, leaves). Raises ConvertError naming config.json / the shard / the tensor."""
    try:
        cfg = Config.from_hf(hf_dir, fp8_activations=False)
    except ConfigError as e:
        raise ConvertError(f"cannot convert {hf_dir}: bad config.json: {e}") from e
    try:
        ckpt = ShardedCheckpoint(hf_dir)
    except (SafetensorsError, OSError) as e:
        raise ConvertError(f"cannot convert {hf_dir}: {e}") from e
    try:
        leaves = plan_params(cfg, ckpt, weights, chunk_bytes)
        if include_mtp:
            leaves += plan_mtp(cfg, ckpt, weights, chunk_bytes)
    except _SOURCE_ERRORS as e:
        ckpt.close()
        raise ConvertError(f"cannot convert {hf_dir} (does it match its config.json?): {e}") from e
    except ConvertError:
        ckpt.close()
        raise
    want = {p: (tuple(s.shape), np.dtype(s.dtype))
            for p, s in flatten(abstract_params(output_config(cfg, weights))).items()}
    got = {lf.path: (lf.shape, lf.dtype) for lf in leaves if lf.group == PARAMS_DIR}
    if want != got:  # an internal invariant: the written tree is what the model restores
        ckpt.close()
        raise ConvertError(f"internal error: planned params differ from the model's "
                           f"({sorted(set(want.items()) ^ set(got.items()))[:3]})")
    return cfg, ckpt, leaves


def source_files(hf_dir: str, ckpt: ShardedCheckpoint) -> list[str]:
    """The shard files the conversion reads, plus config.json and the index."""
    shards = {os.path.basename(ckpt.file_of(n)) for n in ckpt.keys()}
    extra = [f for f in ("config.json", INDEX_NAME) if os.path.isfile(os.path.join(hf_dir, f))]
    return sorted(shards) + extra


def _copied_files(hf_dir: str) -> list[str]:
    """Top-level files copied as they are: tokenizer, generation config, license, README, ..."""
    skip = {"config.json", INDEX_NAME}
    return sorted(f for f in os.listdir(hf_dir) if os.path.isfile(os.path.join(hf_dir, f))
                  and f not in skip and not f.endswith(".safetensors") and not f.startswith("."))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(inner: str, outer: str) -> bool:
    """`inner` is `outer` or lies below it: compared on resolved paths (symlinks), and by inode
    against every existing ancestor of `inner` (bind mounts, other spellings of one directory)."""
    ri, ro = os.path.realpath(inner), os.path.realpath(outer)
    if ri == ro or ri.startswith(ro.rstrip(os.sep) + os.sep):
        return True
    if not os.path.exists(ro):
        return False
    p = ri
    while True:
        if _same_dir(p, ro):
            return True
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent


def _overlap(a: str, b: str) -> bool:
    return _inside(a, b) or _inside(b, a)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def _previous_output(out_dir: str) -> None:
    """Raise ConvertError unless the non-empty `out_dir` is a previous conversion (a manifest.json
    with our format marker) holding nothing but what a conversion writes, so that replacing it
    (--force) deletes no user data."""
    m = _read_json(os.path.join(out_dir, MANIFEST))
    if not (isinstance(m, dict) and m.get("format") == FORMAT):
        raise ConvertError(f"{out_dir}: exists, is not empty and is not a checkpoint written by dsv32 "
                           f"convert (no {MANIFEST} with format {FORMAT!r}); --force only replaces a "
                           "previous conversion, so nothing was deleted. Remove it yourself or choose "
                           "another OUT_DIR")
    copied = m.get("copied_files") if isinstance(m.get("copied_files"), list) else []
    expected = {MANIFEST, "config.json", PARAMS_DIR, MTP_DIR, *map(str, copied)}
    extra = sorted(set(os.listdir(out_dir)) - expected)
    for group, key in ((PARAMS_DIR, "params"), (MTP_DIR, "mtp")):
        d = os.path.join(out_dir, group)
        if not os.path.lexists(d):
            continue
        leaves = m.get(key) or []
        if isinstance(leaves, dict):
            leaves = leaves.get("leaves") or []
        try:
            names = {array_name(tuple(lf["path"])) for lf in leaves}
        except (TypeError, KeyError, ValueError):
            names = set()
        if os.path.islink(d) or not os.path.isdir(d):
            extra.append(group)
            continue
        names |= {"_METADATA", "_CHECKPOINT_METADATA"}
        extra += [f"{group}/{n}" for n in sorted(set(os.listdir(d)) - names)]
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ConvertError(f"{out_dir}: holds files a conversion does not write: {extra[:5]}{more}; "
                           "--force only replaces a previous conversion as it was written, so nothing "
                           "was deleted. Move them away or choose another OUT_DIR")


def _check_overlap(out_dir: str, hf_dir: str) -> None:
    """Refuse an output that overlaps the source (either inside the other, after resolving
    symlinks)."""
    for path, what in ((out_dir, "output directory"), (out_dir + ".partial", "work directory")):
        if _overlap(path, hf_dir):
            raise ConvertError(f"{path}: the {what} and the source {hf_dir} overlap (one is, or lies "
                               "inside, the other); choose an OUT_DIR outside the source that does not "
                               "contain it")


def _check_out(out_dir: str, force: bool) -> None:
    """Refuse a non-empty output without `force`, and with `force` one that is not a previous
    conversion (see `_previous_output`)."""
    partial = out_dir + ".partial"
    if os.path.islink(out_dir):
        raise ConvertError(f"{out_dir}: is a symbolic link; pass the directory it points to "
                           f"({os.path.realpath(out_dir)}) or another path")
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConvertError(f"{out_dir}: exists and is not a directory")
        if os.path.ismount(out_dir):
            raise ConvertError(f"{out_dir}: is a mount point; the converter writes {partial} next to "
                               "it (on another filesystem) and renames it into place at the end. Convert "
                               f"into a directory inside it instead, e.g. {os.path.join(out_dir, 'dsv32')}")
        if os.listdir(out_dir):
            if not force:
                raise ConvertError(f"{out_dir}: exists and is not empty; pass --force (force=True) to "
                                   "replace a previous conversion")
            _previous_output(out_dir)
    if os.path.islink(partial) or (os.path.lexists(partial) and not os.path.isdir(partial)):
        raise ConvertError(f"{partial}: exists and is not a directory made by dsv32 convert; remove it "
                           "or choose another OUT_DIR")


def _unit_order(reader: SourceReader, units: list[Unit]) -> list[Unit]:
    """Units sorted by where their first source tensor lies (shard, offset): near-sequential reads."""
    def key(u: Unit):
        path, offset, _ = reader.location(str(u.sources().reshape(-1)[0]))
        return path, offset, u.leaf.key, u.index

    return sorted(units, key=key)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


class _Progress:
    """Append-only log of finished chunks: '<leaf key> <chunk> <crc32 hex>' per line."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._f = open(path, "a")

    @staticmethod
    def read(path: str) -> dict[str, int]:
        done = {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 3 and line.endswith("\n"):
                        try:
                            done[f"{parts[0]} {parts[1]}"] = int(parts[2], 16)
                        except ValueError:
                            pass
        return done

    def add(self, unit: Unit, crc: int) -> None:
        with self._lock:
            self._f.write(f"{unit.key} {crc:08x}\n")
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def _run_pool(fn, units: list[Unit], workers: int, bar) -> None:
    """Run fn(unit) over units with `workers` threads; stop at the first error and raise it."""
    if workers == 1:
        for u in units:
            bar.update(fn(u))
        return
    ex = cf.ThreadPoolExecutor(workers, thread_name_prefix="convert")
    try:
        pending = set()
        it = iter(units)
        for u in it:  # keep a bounded queue so a failure stops the run quickly
            pending.add(ex.submit(fn, u))
            if len(pending) >= 2 * workers:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    bar.update(f.result())
        for f in cf.as_completed(pending):
            bar.update(f.result())
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def convert_checkpoint(hf_dir, out_dir, *, weights: str = "fp8", include_mtp: bool = False,
                       workers: int = 4, force: bool = False, resume: bool = True,
                       hash_files: bool = False, progress: bool = True,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """Convert the HF checkpoint in `hf_dir` into `out_dir`; returns the manifest (a dict).

    weights: "fp8" keeps the tensors exactly as stored (lossless; for the release: e4m3 weights +
    fp32 128x128 scales); "bf16" dequantizes FP8 weights to bf16 and drops the scales.
    include_mtp: also convert the multi-token-prediction layer, into `out_dir/mtp`.
    workers: threads writing chunks in parallel. force: replace a non-empty `out_dir`.
    resume: continue a matching `out_dir.partial` left by an interrupted run (else start over).
    hash_files: record sha256 of every source file in the manifest (reads the source once more).
    chunk_bytes: target size of one stored chunk = the unit of reading/writing (memory per worker).
    Raises ConvertError (a ValueError) naming the shard/tensor for any problem with the source,
    dirlock.Busy (a ValueError) while another process writes `out_dir`.
    """
    t_start = time.time()
    hf_dir, out_dir = os.path.abspath(os.fspath(hf_dir)), os.path.abspath(os.fspath(out_dir))
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    for name, value in (("workers", workers), ("chunk_bytes", chunk_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir}: source checkpoint directory not found")
    _check_overlap(out_dir, hf_dir)  # before the lock file is created next to out_dir
    with hold(out_dir, "dsv32 convert"):  # held until the result is in place (or the run fails)
        _check_out(out_dir, force)
        return _convert(hf_dir, out_dir, weights, include_mtp, workers, force, resume, hash_files,
                        progress, chunk_bytes, t_start)


def _convert(hf_dir, out_dir, weights, include_mtp, workers, force, resume, hash_files, progress,
             chunk_bytes, t_start) -> dict:
    cfg, ckpt, leaves = _load_source(hf_dir, weights, include_mtp, chunk_bytes)
    reader = SourceReader(ckpt)
    try:
        files = source_files(hf_dir, ckpt)
        stats = {f: os.stat(os.path.join(hf_dir, f)) for f in files}
        state = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": hf_dir,
                 "weights": weights, "include_mtp": include_mtp, "chunk_bytes": chunk_bytes,
                 "files": {f: [s.st_size, s.st_mtime_ns] for f, s in stats.items()}}
        partial = out_dir + ".partial"
        logged = _prepare_partial(partial, state, resume, progress)
        units = _unit_order(reader, [u for lf in leaves for u in lf.units()])
        context = write_context(fsync=False)
        arrays = {lf.key: create_array(os.path.join(partial, lf.group), lf.path, lf.shape, lf.dtype,
                                       lf.chunks, open_existing=bool(logged), context=context)
                  for lf in leaves}
        total = sum(u.nbytes for u in units)
        done = _verify_logged(arrays, [u for u in units if u.key in logged], logged, workers)
        if logged:
            _say(progress, f"resuming {partial}: {len(done)} of {len(logged)} logged chunks verified, "
                           f"{len(units) - len(done)} of {len(units)} to write")
        log = _Progress(os.path.join(partial, PROGRESS_FILE))

        buffers = Buffers()

        def work(u: Unit) -> int:
            data = read_unit(reader, u, buffers.get(u))
            try:  # the buffer is reused: tensorstore must copy it (it encodes a copy anyway)
                arrays[u.leaf.key][u.region].write(
                    data, can_reference_source_data_indefinitely=False).result()
            except Exception as e:  # tensorstore errors: disk full, permissions, ...
                raise ConvertError(f"{partial}: writing {u.key} (from {_describe(u)}) failed: {e}; "
                                   f"{_resumable(partial)}") from e
            log.add(u, _crc(data))
            return u.nbytes

        todo = [u for u in units if u.key not in done]
        t_write = time.time()
        from tqdm import tqdm

        with tqdm(total=total, initial=sum(u.nbytes for u in units if u.key in done), unit="B",
                  unit_scale=True, unit_divisor=1024, desc="convert", disable=not progress,
                  smoothing=0.1, dynamic_ncols=True) as bar:
            try:
                _run_pool(work, todo, workers, bar)
            finally:
                log.close()
        os.sync()  # chunks were written without a per-chunk fsync: make the result durable
        write_s = time.time() - t_write
        written = sum(u.nbytes for u in todo)
        manifest = _finalize(partial, out_dir, hf_dir, cfg, leaves, stats, files, weights,
                             include_mtp, workers, chunk_bytes, hash_files, force,
                             {"seconds": round(time.time() - t_start, 3),
                              "write_seconds": round(write_s, 3), "written_bytes": written,
                              "write_mb_per_s": round(written / 1e6 / max(write_s, 1e-9), 1),
                              "resumed_chunks": len(done), "chunks": len(units)}, progress)
        _say(progress, f"converted {hf_dir} -> {out_dir}: {manifest['total_bytes'] / 1e9:.2f} GB "
                       f"in {manifest['stats']['seconds']:.1f}s "
                       f"({manifest['stats']['write_mb_per_s']:.0f} MB/s writing)")
        return manifest
    finally:
        reader.close()
        ckpt.close()


def _resumable(partial: str) -> str:
    return (f"{partial} is kept with everything written so far: fix the cause (free disk space, "
            "permissions) and rerun the same command to resume")


@contextlib.contextmanager
def _writing(partial: str, name: str):
    """An OSError while writing `name` into `partial` -> ConvertError naming that output file first."""
    try:
        yield
    except OSError as e:
        raise ConvertError(f"{os.path.join(partial, name)}: cannot write it ({e.strerror or e}); "
                           f"{_resumable(partial)}") from e


def _describe(u: Unit) -> str:
    names = u.sources().reshape(-1)
    return str(names[0]) + (f" .. {names[-1]} ({names.size} tensors)" if names.size > 1 else "")


def _own_partial(partial: str, state) -> bool:
    """`partial` was made by a conversion: our state file, or (a finished run whose final rename
    failed) our manifest."""
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return True
    m = _read_json(os.path.join(partial, MANIFEST))
    return isinstance(m, dict) and m.get("format") == FORMAT


def _prepare_partial(partial: str, state: dict, resume: bool, progress: bool) -> dict[str, int]:
    """Create or reuse `partial`; returns the progress log of a resumable previous run ({} if none).
    A stale `partial` is deleted only if a conversion made it (else ConvertError)."""
    state_path = os.path.join(partial, STATE_FILE)
    if os.path.lexists(partial):
        old = _read_json(state_path)
        if resume and old == state:
            return _Progress.read(os.path.join(partial, PROGRESS_FILE))
        if not _own_partial(partial, old):
            raise ConvertError(f"{partial}: exists but was not made by dsv32 convert (no {STATE_FILE} or "
                               f"{MANIFEST} with format {FORMAT!r}), so it was not deleted; remove it "
                               "yourself or choose another OUT_DIR")
        why = "--restart" if not resume else "it was made with other options or other source files"
        _say(progress, f"removing the stale {partial} ({why})")
        shutil.rmtree(partial)
    os.makedirs(partial)
    for group in (PARAMS_DIR, MTP_DIR):
        if group == PARAMS_DIR or state["include_mtp"]:
            os.makedirs(os.path.join(partial, group))
    _write_json(state_path, state)
    return {}


def _write_json(path: str, obj, indent: int | None = None) -> None:
    """Write a JSON file and fsync it."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())


def _copy_file(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)
    fsync_file(dst)


def _verify_logged(arrays: dict, units: list[Unit], logged: dict[str, int], workers: int) -> set[str]:
    """Keys of logged chunks whose stored data still has the logged CRC32."""
    def ok(u: Unit) -> bool:
        try:
            data = arrays[u.leaf.key][u.region].read().result()
        except Exception:
            return False
        return _crc(data) == logged[u.key]

    if not units:
        return set()
    with cf.ThreadPoolExecutor(workers) as ex:
        return {u.key for u, good in zip(units, ex.map(ok, units)) if good}


def _finalize(partial, out_dir, hf_dir, cfg, leaves, stats, files, weights, include_mtp, workers,
              chunk_bytes, hash_files, force, run_stats, progress=False) -> dict:
    import dsv32_jax

    try:
        import orbax.checkpoint as ocp
        orbax_version = getattr(ocp, "__version__", None)
    except ImportError:  # pragma: no cover
        orbax_version = None
    groups = [PARAMS_DIR] + ([MTP_DIR] if include_mtp else [])
    custom = {"format": FORMAT, "dsv32_jax_version": dsv32_jax.__version__}
    for g in groups:
        with _writing(partial, g):
            write_tree_metadata(os.path.join(partial, g),
                                {lf.path: lf.chunks for lf in leaves if lf.group == g}, custom)
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    with _writing(partial, "config.json"):
        if weights == "bf16":
            hf_cfg.pop("quantization_config", None)
            _write_json(os.path.join(partial, "config.json"), hf_cfg, indent=2)
        else:
            _copy_file(os.path.join(hf_dir, "config.json"), os.path.join(partial, "config.json"))
    copied = _copied_files(hf_dir)
    for name in copied:
        with _writing(partial, name):
            _copy_file(os.path.join(hf_dir, name), os.path.join(partial, name))
    src = {}
    for f in files:
        src[f] = {"size": stats[f].st_size}
        if hash_files:
            src[f]["sha256"] = _sha256(os.path.join(hf_dir, f))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "dsv32_jax_version": dsv32_jax.__version__, "orbax_checkpoint_version": orbax_version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": {"weights": weights, "include_mtp": include_mtp, "workers": workers,
                    "chunk_bytes": chunk_bytes, "hash": hash_files},
        "source": {"dir": hf_dir, "files": src},
        "source_weight_dtype": cfg.weight_dtype,
        "activation_scale_fmt": cfg.scale_fmt,
        "tensor_count": int(sum(lf.n_sources for lf in leaves)),
        "total_bytes": int(sum(lf.nbytes for lf in leaves)),
        "params_bytes": int(sum(lf.nbytes for lf in leaves if lf.group == PARAMS_DIR)),
        "params": [lf.manifest() for lf in leaves if lf.group == PARAMS_DIR],
        "mtp": ({"leaves": [lf.manifest() for lf in leaves if lf.group == MTP_DIR]}
                if include_mtp else None),
        "copied_files": copied,
        "stats": run_stats,
    }
    with _writing(partial, MANIFEST):
        _write_json(os.path.join(partial, MANIFEST), manifest, indent=1)
    for name in (STATE_FILE, PROGRESS_FILE):
        os.remove(os.path.join(partial, name))  # ours: written by this run (or the one it resumed)
    for d in [os.path.join(partial, g) for g in groups] + [partial]:
        fsync_dir(d)
    _swap_into_place(partial, out_dir, force, progress)
    return manifest


def _kept(partial: str, out_dir: str) -> str:
    return (f"the complete converted checkpoint is kept at {partial}. To finish by hand, make "
            f"{out_dir} replaceable (an empty directory or no entry) and run `mv {partial} {out_dir}`; "
            f"if {out_dir} is a mount point or cannot be replaced, move the contents instead: "
            f"`mv {partial}/* {out_dir}/`")


def _swap_into_place(partial: str, out_dir: str, force: bool, progress: bool) -> None:
    """Rename the finished `partial` to `out_dir`. A non-empty `out_dir` is replaced only with
    `force` and only if it is a previous conversion (checked again now); it is moved aside first
    and deleted after the rename, or moved back if the rename fails. Any failure raises
    ConvertError saying where the complete result is kept."""
    old = None
    try:
        if os.path.lexists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
            if not force:  # appeared while we were converting
                raise ConvertError(f"{out_dir}: exists and is not empty (it appeared during the "
                                   f"conversion); {_kept(partial, out_dir)}")
            try:
                _previous_output(out_dir)
            except ConvertError as e:
                raise ConvertError(f"{e}; {_kept(partial, out_dir)}") from None
            for _ in range(100):
                old = f"{out_dir}.old-{os.getpid()}-{secrets.token_hex(4)}"
                if not os.path.lexists(old):
                    break
            os.replace(out_dir, old)
        os.replace(partial, out_dir)  # onto nothing or an empty directory
    except OSError as e:
        if old is not None and not os.path.lexists(out_dir):
            try:
                os.replace(old, out_dir)
                old = None
            except OSError:
                pass
        where = f" (the previous output was moved to {old})" if old is not None else ""
        raise ConvertError(f"{out_dir}: cannot move the finished conversion into place ({e}){where}; "
                           f"{_kept(partial, out_dir)}") from e
    fsync_dir(os.path.dirname(out_dir) or ".")
    if old is not None:  # the previous conversion, checked by _previous_output
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):
            _say(progress, f"warning: could not fully remove the previous output, moved to {old}")


def leaves_for(out_manifest: dict, hf_dir: str) -> tuple[Config, ShardedCheckpoint, list[Leaf]]:
    """Re-plan the leaves a manifest was written with (for verification)."""
    o = out_manifest["options"]
    return _load_source(os.path.abspath(hf_dir), o["weights"], bool(o["include_mtp"]),
                        int(o["chunk_bytes"]))
