"""Memory-mapped safetensors reader and streaming writer (numpy + ml_dtypes only).

File layout: 8-byte little-endian header length ``N``; ``N`` bytes of UTF-8 JSON mapping
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the first byte after the header) plus an optional ``"__metadata__"`` str->str dict; then data.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import math
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from dsv32_jax.files import no_constants, open_regular

__all__ = [
    "DTYPES",
    "Header",
    "LazyTensor",
    "MAX_HEADER_BYTES",
    "SafetensorsError",
    "SafetensorsFile",
    "ShardedCheckpoint",
    "TensorNotFoundError",
    "dtype_name",
    "fsync_dir",
    "fsync_file",
    "read_header",
    "write_safetensors",
]

INDEX_NAME = "model.safetensors.index.json"
_META = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # the cap the safetensors library uses too
MAX_INDEX_BYTES = 100_000_000


class SafetensorsError(ValueError):
    """Malformed or inconsistent safetensors file / checkpoint directory."""


class TensorNotFoundError(KeyError):
    """Tensor name absent from a file or checkpoint."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


DTYPES: dict[str, np.dtype] = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype(np.bool_),
}
_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(np_dtype: Any) -> str:
    """Safetensors dtype string for a numpy dtype (ValueError if unsupported, e.g. big-endian)."""
    dt = np.dtype(np_dtype)
    if dt not in _NAMES:
        raise ValueError(f"dtype {dt!r} is not supported by safetensors (supported: {sorted(DTYPES)})")
    return _NAMES[dt]


@dataclasses.dataclass(frozen=True)
class _Entry:
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data section
    end: int


@dataclasses.dataclass(frozen=True)
class Header:
    """A parsed and validated safetensors header (see :func:`read_header`)."""

    path: str
    metadata: dict[str, str]
    entries: dict[str, _Entry]
    data_start: int  # absolute offset of the data section (8 + header length)
    file_size: int

    def entry(self, name: str) -> _Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int_list(x: Any) -> bool:
    return isinstance(x, list) and all(type(d) is int for d in x)


def _pread_exact(fd: int, n: int, offset: int, path: str, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        try:
            b = os.pread(fd, n - got, offset + got)
        except OSError as e:
            raise SafetensorsError(f"{path}: cannot read {what}: {e}") from None
        if not b:
            raise SafetensorsError(f"{path}: file ends at byte {offset + got} while reading {what} "
                                   f"(bytes [{offset}, {offset + n})); truncated file?")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_header(path: str | os.PathLike[str], fd: int | None = None) -> Header:
    """Parse and validate the header of safetensors file ``path`` (read through ``fd`` if given).

    The one header parser of the project: :class:`SafetensorsFile` and the converter's reader use
    it. Checks, before anything is trusted: the 8-byte length is at most ``MAX_HEADER_BYTES`` and
    fits the file; the header is UTF-8 JSON (no duplicate keys, no NaN/Infinity) holding an object;
    ``__metadata__`` maps str to str; every tensor entry has exactly ``dtype`` (a known one),
    ``shape`` (non-negative ints) and ``data_offsets`` (``[begin, end]`` whose span is the shape's
    byte size); and the tensors tile the data section exactly: no overlap, no gap, nothing past the
    end of the file and no trailing bytes. Raises :class:`SafetensorsError` naming the file (and the
    tensor) otherwise.
    """
    path = os.fspath(path)
    own = fd is None
    if own:
        try:
            fd = open_regular(path)
        except OSError as e:
            raise SafetensorsError(f"{path}: cannot open: {e}") from None
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise SafetensorsError(f"{path}: file is {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(_pread_exact(fd, 8, 0, path, "the header length"), "little")
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} "
                                   "bytes (corrupt file?)")
        if n > size - 8:
            raise SafetensorsError(f"{path}: header length {n} exceeds the {size - 8} bytes after it")
        raw = _pread_exact(fd, n, 8, path, "the header")
    finally:
        if own:
            os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    meta = header.pop(_META, {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SafetensorsError(f"{path}: {_META} must map str to str, found {meta!r}")
    data_size = size - 8 - n
    entries = {name: _parse_entry(path, name, info, data_size) for name, info in header.items()}
    pos, prev = 0, None
    for begin, end, name in sorted((e.begin, e.end, k) for k, e in entries.items()):
        if begin < pos:
            raise SafetensorsError(f"{path}: tensors {prev!r} and {name!r} overlap in the data section")
        if begin > pos:
            raise SafetensorsError(f"{path}: bytes [{pos}, {begin}) of the data section before tensor "
                                   f"{name!r} belong to no tensor (a gap; corrupt offsets?)")
        pos, prev = end, name
    if pos != data_size:
        raise SafetensorsError(f"{path}: the data section has {data_size} bytes but its tensors end at "
                               f"byte {pos} ({data_size - pos} trailing bytes; corrupt offsets?)")
    return Header(path, meta, entries, 8 + n, size)


def _parse_entry(path: str, name: str, info: Any, data_size: int) -> _Entry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: header entry is {info!r}, expected an object")
    unknown = sorted(set(info) - {"dtype", "shape", "data_offsets"})
    if unknown:
        raise SafetensorsError(f"{where}: unknown header entry keys {unknown} (expected dtype, shape, "
                               "data_offsets)")
    dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dt, str) or dt not in DTYPES:
        raise SafetensorsError(f"{where}: unknown dtype {dt!r}, expected one of {sorted(DTYPES)}")
    if not _is_int_list(shape) or any(d < 0 for d in shape):
        raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if not _is_int_list(offs) or len(offs) != 2:
        raise SafetensorsError(f"{where}: data_offsets {offs!r} is not a [begin, end] pair of ints")
    begin, end = offs
    if not 0 <= begin <= end:
        raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] are negative or inverted")
    expected = math.prod(shape) * DTYPES[dt].itemsize
    if end - begin != expected:
        raise SafetensorsError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes, "
            f"expected {expected} for {dt} shape {shape}"
        )
    if end > data_size:
        raise SafetensorsError(
            f"{where}: data ends at byte {end} but the data section has only {data_size} bytes (truncated file?)"
        )
    return _Entry(DTYPES[dt], tuple(shape), begin, end)


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and validated eagerly, data memory-mapped lazily."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.header = read_header(self.path)
        self.metadata: dict[str, str] = self.header.metadata
        self._data_start = self.header.data_start
        self._entries = self.header.entries
        self._mm: np.memmap | None = None

    def _entry(self, name: str) -> _Entry:
        return self.header.entry(name)

    def keys(self) -> list[str]:
        """Sorted tensor names."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        e = self._entry(name)
        return e.end - e.begin

    def get(self, name: str) -> np.ndarray:
        """Zero-copy, read-only ``np.memmap`` view of tensor ``name``."""
        e = self._entry(name)
        if self._mm is None:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r")
            if mm.size != self.header.file_size:
                raise SafetensorsError(f"{self.path}: the file is now {mm.size} bytes, it was "
                                       f"{self.header.file_size} when its header was read (modified "
                                       f"while in use?); reading tensor {name!r}")
            self._mm = mm
        start = self._data_start + e.begin
        return self._mm[start : self._data_start + e.end].view(e.dtype).reshape(e.shape)

    def close(self) -> None:
        """Drop this object's mapping; arrays already returned by ``get`` stay valid."""
        self._mm = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardedCheckpoint:
    """A HF checkpoint directory: ``model.safetensors.index.json`` if present, else all ``*.safetensors``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self._files: dict[str, SafetensorsFile] = {}
        self._index_path: str | None = None
        index_path = os.path.join(self.directory, INDEX_NAME)
        if os.path.exists(index_path):
            self._index_path = index_path
            self._weight_map = self._read_index(index_path)
            first_tensor = {f: n for n, f in sorted(self._weight_map.items(), reverse=True)}
            for fname, name in sorted(first_tensor.items()):
                if not os.path.exists(fname):  # (not a regular file: refused when it is opened)
                    raise SafetensorsError(f"{index_path}: shard {fname} (holding tensor {name!r}) does not exist")
            return
        paths = sorted(glob.glob(os.path.join(glob.escape(self.directory), "*.safetensors")))
        if not paths:
            raise SafetensorsError(f"{self.directory}: no {INDEX_NAME} and no *.safetensors files")
        self._weight_map = {}
        for p in paths:
            self._files[p] = f = SafetensorsFile(p)
            for name in f.keys():
                if name in self._weight_map:
                    other = self._weight_map[name]
                    raise SafetensorsError(f"{self.directory}: tensor {name!r} is in both {other} and {p}")
                self._weight_map[name] = p

    def _read_index(self, index_path: str) -> dict[str, str]:
        """{tensor name: shard path} from the index; every shard must be a plain file name in this
        directory (no separator, no '..', not absolute), so an index cannot point outside it."""
        try:
            with os.fdopen(open_regular(index_path), "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_INDEX_BYTES:
                    raise SafetensorsError(f"{index_path}: {size} bytes, more than the {MAX_INDEX_BYTES}-"
                                           "byte limit for an index (corrupt file?)")
                index = json.loads(fh.read().decode("utf-8"), object_pairs_hook=_no_duplicates,
                                   parse_constant=no_constants)
            wm = index["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError, OSError) as e:
            if isinstance(e, SafetensorsError):
                raise
            raise SafetensorsError(f"{index_path}: not a valid index with a 'weight_map' ({e!r})") from None
        if not isinstance(wm, dict):
            raise SafetensorsError(f"{index_path}: 'weight_map' must map tensor names to file names, "
                                   f"found a JSON {type(wm).__name__}")
        out = {}
        for name, fname in wm.items():
            if not isinstance(fname, str):
                raise SafetensorsError(f"{index_path}: weight_map entry {name!r}: {fname!r} is not a "
                                       "file name")
            bad = (fname in ("", ".", "..") or any(c in fname for c in ("/", "\\", "\0"))
                   or os.path.isabs(fname))
            if bad:
                raise SafetensorsError(f"{index_path}: weight_map entry {name!r}: shard {fname!r} is not "
                                       "a plain file name in the checkpoint directory (paths, '..' and "
                                       "absolute names are refused)")
            out[name] = os.path.join(self.directory, fname)
        return out

    def keys(self) -> list[str]:
        """Sorted tensor names."""
        return sorted(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def file_of(self, name: str) -> str:
        """Path of the shard holding ``name``."""
        try:
            return self._weight_map[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.directory}: checkpoint has no tensor named {name!r}") from None

    def _file(self, name: str) -> SafetensorsFile:
        path = self.file_of(name)
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
            self._check_shard(path)
        f = self._files[path]
        if name not in f:
            raise SafetensorsError(f"{path}: tensor {name!r} is listed in {INDEX_NAME} but missing from this shard")
        return f

    def _check_shard(self, path: str) -> None:
        """Every tensor of a newly opened shard must be mapped to it by the index (nothing unlisted)."""
        for name in self._files[path].keys():
            listed = self._weight_map.get(name)
            if listed != path:
                where = "does not list it" if listed is None else f"maps it to {listed}"
                raise SafetensorsError(f"{path}: holds tensor {name!r} but {self._index_path or INDEX_NAME} "
                                       f"{where}")

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def nbytes(self, name: str) -> int:
        return self._file(name).nbytes(name)

    def get(self, name: str) -> np.ndarray:
        """Zero-copy, read-only ``np.memmap`` view of tensor ``name``."""
        return self._file(name).get(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """Declared ``shape``/``dtype`` plus a zero-arg ``fn`` producing the array when it is written."""

    shape: tuple[int, ...]
    dtype: Any
    fn: Callable[[], Any]

    def __call__(self) -> Any:
        return self.fn()


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Stream ``tensors`` to a safetensors file at ``path``, sorted by name.

    Each value is an array with ``.shape``/``.dtype`` (numpy, jax, ...; converted with ``np.asarray``
    only when its turn comes) or a callable with ``.shape``/``.dtype`` such as :class:`LazyTensor`,
    called once, at write time. The header is built from the declared shapes/dtypes, then tensors
    are produced and written one at a time, so at most one is materialised at once. A produced
    array whose shape/dtype differs from its declaration raises ValueError. Data goes to a temporary
    file of our own next to ``path`` (``.NAME.XXXX.tmp``), fsynced and renamed onto ``path`` only on
    success (then the directory is fsynced); on failure the temporary file is removed.
    """
    path = os.fspath(path)
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{path}: metadata must map str to str, got {meta!r}")
    header: dict[str, Any] = {_META: meta} if meta else {}
    declared: list[tuple[str, tuple[int, ...], np.dtype]] = []
    offset = 0
    for name in sorted(tensors):
        v = tensors[name]
        if not isinstance(name, str) or name == _META:
            raise ValueError(f"{path}: invalid tensor name {name!r}")
        if not (hasattr(v, "shape") and hasattr(v, "dtype")):
            raise TypeError(f"{path}: tensor {name!r} is a {type(v).__name__} without .shape/.dtype")
        shape, dt = tuple(int(d) for d in v.shape), np.dtype(v.dtype)
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": dtype_name(dt), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        declared.append((name, shape, dt))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-aligned
    directory, base = os.path.split(os.path.abspath(path))
    fd, tmp = _create_own_temp(directory, base)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, dt in declared:
                v = tensors[name]
                arr = np.asarray(v() if callable(v) else v)
                if arr.shape != shape or arr.dtype != dt:
                    raise ValueError(
                        f"{path}: tensor {name!r} produced shape {arr.shape} dtype {arr.dtype}, "
                        f"declared shape {shape} dtype {dt}"
                    )
                f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def _create_own_temp(directory: str, base: str) -> tuple[int, str]:
    """A new file ``directory/.base.<random>.tmp`` created exclusively (O_EXCL, so it is ours and
    nothing else is overwritten), with the usual permissions (0o666 less the umask)."""
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: cannot create a temporary file for {base}")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (a rename or a new file in it) durable. Filesystems that cannot
    fsync a directory (EINVAL/ENOTSUP) are skipped."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
