"""What to write: the output leaves, their chunking, and how each chunk is read from the source.

A `Leaf` is one array of the converted tree: the HF tensors it is stacked from (an array of names
shaped like its stacked dims: () global, (L,) per layer, (L, E) routed experts), its output shape and
dtype, and its chunk shape. A `Unit` is one chunk: the converter reads exactly the source bytes of
that chunk (with `pread`, straight into the chunk buffer) and writes the chunk, so memory per
worker is about two chunks (`chunk_bytes`, 32 MiB by default; tensorstore encodes a copy).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from dsv32_jax.files import open_regular
from dsv32_jax.model.config import BLOCK, Config, cdiv
from dsv32_jax.model.quant import dequant
from dsv32_jax.checkpoint.finite import nonfinite, what_is_wrong
from dsv32_jax.checkpoint.hf import check, mtp_sources
from dsv32_jax.checkpoint.orbax_layout import MTP_DIR, PARAMS_DIR, array_name
from dsv32_jax.checkpoint.safetensors import (Header, SafetensorsError, ShardedCheckpoint,
                                              TensorNotFoundError, read_header)
from dsv32_jax.checkpoint.weights import Path, abstract_params, flatten
from pallas_kernels.common import pow2_floor

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
DEFAULT_CHUNK_BYTES = 32 << 20
SCALE_SUFFIX = "weight_scale_inv"


class ConvertError(ValueError):
    """The source cannot be converted (names the shard / tensor), or the output is unusable."""


@dataclasses.dataclass(frozen=True, eq=False)
class Leaf:
    group: str                 # PARAMS_DIR or MTP_DIR: which Orbax checkpoint
    path: Path                 # path in that checkpoint's tree
    names: np.ndarray          # HF tensor names, shaped like the stacked dims
    src_shape: tuple[int, ...]  # one source tensor's shape
    src_dtype: np.dtype
    dtype: np.dtype            # output dtype (bf16 for dequantized FP8 weights)
    chunks: tuple[int, ...]
    scale_names: np.ndarray | None = None  # dequantize with these 128x128 scales (bf16 output)
    scale_shape: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.names.shape) + tuple(self.src_shape)

    @property
    def key(self) -> str:
        return f"{self.group}/{array_name(self.path)}"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def n_sources(self) -> int:
        return self.names.size * (2 if self.scale_names is not None else 1)

    def grid(self) -> tuple[int, ...]:
        return tuple(cdiv(d, c) for d, c in zip(self.shape, self.chunks))

    def units(self) -> Iterator["Unit"]:
        for idx in np.ndindex(*self.grid()):
            yield Unit(self, tuple(int(i) for i in idx))

    def manifest(self) -> dict:
        return {"path": list(self.path), "shape": list(self.shape), "dtype": self.dtype.name,
                "chunks": list(self.chunks), "source_dtype": self.src_dtype.name,
                "sources": int(self.n_sources),
                "first_source": str(self.names.reshape(-1)[0])}


@dataclasses.dataclass(frozen=True)
class Unit:
    leaf: Leaf
    index: tuple[int, ...]     # chunk grid position

    @property
    def region(self) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, d))
                     for i, c, d in zip(self.index, self.leaf.chunks, self.leaf.shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.region)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.leaf.dtype.itemsize

    @property
    def key(self) -> str:
        return f"{self.leaf.key} {'.'.join(map(str, self.index)) or '0'}"

    def sources(self) -> np.ndarray:
        """The HF names this chunk reads (weights only), shaped like its stacked dims."""
        lead = self.leaf.names.ndim
        return np.asarray(self.leaf.names[self.region[:lead]], dtype=object)


# ---- chunking --------------------------------------------------------------------------------
def plan_chunks(stack: tuple[int, ...], tensor: tuple[int, ...], itemsize: int,
                target: int = DEFAULT_CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk shape of a stacked array: small tensors are grouped along the stacked dims (innermost
    first, a power of two of them or a whole dim), big ones are split into row blocks (multiples
    of 128 rows, the FP8 block size) of at most `target` bytes."""
    tbytes = math.prod(tensor) * itemsize
    chunks = [1] * len(stack)
    if tensor and tbytes > target:
        row = tbytes // tensor[0]
        rows = max(1, target // max(row, 1))
        rows = max(BLOCK, rows // BLOCK * BLOCK) if rows >= BLOCK else rows
        return tuple(chunks) + (min(rows, tensor[0]),) + tuple(tensor[1:])
    budget = max(1, target // max(tbytes, 1))
    for i in reversed(range(len(stack))):
        take = stack[i] if stack[i] <= budget else pow2_floor(budget)
        chunks[i] = max(1, take)
        budget //= chunks[i]
        if chunks[i] < stack[i] or budget < 2:
            break
    return tuple(chunks) + tuple(tensor)


# ---- planning --------------------------------------------------------------------------------
def _scale_name(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise ConvertError(f"FP8 tensor {weight_name!r} is not a '.weight'; cannot find its scales")
    return weight_name[: -len("weight")] + SCALE_SUFFIX


def _make_leaves(group: str, entries: dict[Path, tuple[np.ndarray, tuple, np.dtype]],
                 ckpt: ShardedCheckpoint, weights: str, target: int) -> list[Leaf]:
    """entries: {path: (names, per-tensor shape, dtype)} -> leaves (bf16: FP8 dequantized)."""
    leaves = []
    for path, (names, shape, dtype) in entries.items():
        dtype = np.dtype(dtype)
        if weights == "bf16" and str(names.reshape(-1)[0]).endswith("." + SCALE_SUFFIX):
            continue  # folded into its weight
        scale_names = scale_shape = None
        out = dtype  # the param dtype; a source in another accepted float dtype is cast to it
        src = np.dtype(ckpt.dtype(str(names.reshape(-1)[0])))
        if weights == "bf16" and dtype == FP8:
            flat = [_scale_name(str(n)) for n in names.reshape(-1)]
            for w, s in zip(names.reshape(-1), flat):
                if s not in ckpt:
                    raise ConvertError(f"{ckpt.directory}: missing tensor {s!r} (the scales of FP8 "
                                       f"tensor {w!r}, needed for --weights bf16)")
            scale_names = np.array(flat, dtype=object).reshape(names.shape)
            scale_shape = tuple(ckpt.shape(flat[0]))
            want = tuple(cdiv(d, BLOCK) for d in shape)
            for s in flat:
                if tuple(ckpt.shape(s)) != want or np.dtype(ckpt.dtype(s)) != F32:
                    raise ConvertError(f"{ckpt.file_of(s)}: tensor {s!r} has {np.dtype(ckpt.dtype(s)).name}"
                                       f"{list(ckpt.shape(s))}, expected float32{list(want)} "
                                       f"(128x128 block scales of a {list(shape)} weight)")
            out = BF16
        chunks = plan_chunks(tuple(names.shape), tuple(shape), out.itemsize, target)
        leaves.append(Leaf(group, tuple(path), names, tuple(shape), src, out, chunks,
                           scale_names, scale_shape))
    return leaves


def plan_params(cfg: Config, ckpt: ShardedCheckpoint, weights: str = "fp8",
                target: int = DEFAULT_CHUNK_BYTES) -> list[Leaf]:
    """Leaves of the model's param tree. Validates every tensor (names, shapes, dtypes) first."""
    specs = abstract_params(cfg)
    sources = check(ckpt, cfg, specs)
    entries = {}
    for path, spec in flatten(specs).items():
        names = sources[path]
        entries[path] = (names, tuple(spec.shape[names.ndim:]), np.dtype(spec.dtype))
    return _make_leaves(PARAMS_DIR, entries, ckpt, weights, target)


def plan_mtp(cfg: Config, ckpt: ShardedCheckpoint, weights: str = "fp8",
             target: int = DEFAULT_CHUNK_BYTES) -> list[Leaf]:
    """Leaves of the MTP tree (`abstract_params(cfg, mtp=True)["mtp"]`, which
    `dsv32_jax.checkpoint.orbax_layout.restore_mtp` restores), stacked over MTP layers. After
    `plan_params`, whose `check` validated the MTP tensors that are present."""
    n = cfg.n_mtp_layers
    if n < 1:
        raise ConvertError(f"{ckpt.directory}: --include-mtp, but config.json has "
                           "num_nextn_predict_layers=0")
    specs = flatten(abstract_params(cfg, mtp=True)["mtp"])
    entries = {p: (names, tuple(specs[p].shape[names.ndim:]), np.dtype(specs[p].dtype))
               for p, names in mtp_sources(ckpt, cfg, specs).items()}
    return _make_leaves(MTP_DIR, entries, ckpt, weights, target)


# ---- reading source bytes -------------------------------------------------------------------
class SourceReader:
    """Reads byte ranges of tensors with `os.pread` into caller buffers (no mmap kept, so the
    process's resident memory does not grow with what was read). Thread-safe. Each shard's header
    is parsed and validated by `dsv32_jax.checkpoint.safetensors.read_header` (the project's one
    header parser), through the same file descriptor the data is then read from."""

    def __init__(self, ckpt: ShardedCheckpoint):
        self.ckpt = ckpt
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._headers: dict[str, Header] = {}

    def _file(self, path: str) -> tuple[int, Header]:
        with self._lock:
            if path not in self._fds:
                try:
                    fd = open_regular(path)
                except OSError as e:
                    raise ConvertError(f"{path}: cannot open the shard: {e}") from None
                try:
                    header = read_header(path, fd)
                except SafetensorsError as e:
                    os.close(fd)
                    raise ConvertError(str(e)) from None
                self._headers[path] = header
                self._fds[path] = fd
            return self._fds[path], self._headers[path]

    def _entry(self, name: str):
        try:
            path = self.ckpt.file_of(name)
        except TensorNotFoundError as e:
            raise ConvertError(str(e)) from None
        _, header = self._file(path)
        if name not in header.entries:
            raise ConvertError(f"{path}: tensor {name!r} is listed in the index but not in this shard")
        return path, header, header.entries[name]

    def location(self, name: str) -> tuple[str, int, int]:
        """(shard path, absolute byte offset, nbytes) of tensor `name`."""
        path, header, e = self._entry(name)
        return path, header.data_start + e.begin, e.end - e.begin

    def dtype(self, name: str) -> np.dtype:
        """The stored dtype of tensor `name` (from the shard's own header)."""
        return self._entry(name)[2].dtype

    def read_into(self, name: str, start: int, out: np.ndarray) -> None:
        """Fill `out` (C-contiguous) with the bytes of tensor `name` from byte `start` on."""
        path, begin, size = self.location(name)
        buf = out.reshape(-1).view(np.uint8)
        if start + buf.size > size:
            raise ConvertError(f"{path}: tensor {name!r}: reading bytes [{start}, {start + buf.size}) "
                               f"of a {size}-byte tensor")
        fd, _ = self._file(path)
        view, pos, done = memoryview(buf), begin + start, 0
        while done < buf.size:
            try:
                got = os.preadv(fd, [view[done:done + (1 << 30)]], pos + done)
            except OSError as e:
                raise ConvertError(f"{path}: tensor {name!r}: read error at byte {pos + done}: {e}") from None
            if got <= 0:
                raise ConvertError(f"{path}: tensor {name!r}: file ends at byte {pos + done}, before the "
                                   f"tensor's end at {begin + size} (truncated shard?)")
            done += got

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _dequant_rows(w: np.ndarray, s: np.ndarray, out: np.ndarray, row0: int) -> None:
    """out = bf16 weight rows [row0, row0 + len(w)) dequantized by `quant.dequant` (on the host),
    one 128-row block at a time; s holds block rows row0 // 128 on."""
    end, r = row0 + w.shape[0], row0
    while r < end:
        e = min((r // BLOCK + 1) * BLOCK, end)
        srow = s[r // BLOCK - row0 // BLOCK][None]  # (1, in/128): this block row's scales
        out[r - row0:e - row0] = dequant(w[r - row0:e - row0], srow, BF16, xp=np)
        r = e


class Buffers(threading.local):
    """One reusable byte buffer per thread: reading into memory that is already mapped is ~10x
    faster than into a fresh allocation (page faults)."""

    def get(self, unit: Unit) -> np.ndarray:
        buf = getattr(self, "buf", None)
        if buf is None or buf.size < unit.nbytes:
            buf = self.buf = np.empty(unit.nbytes, np.uint8)
        return buf[:unit.nbytes].view(unit.leaf.dtype).reshape(unit.shape)


CAST_BYTES = 4 << 20  # source bytes per step when a tensor is cast to the output dtype


def _read_rows(reader: SourceReader, name: str, row0: int, out: np.ndarray) -> None:
    """Fill `out` (C-contiguous; rows [row0, row0 + len(out)) of tensor `name`, or the whole tensor
    when it is 0-d) in out's dtype. A tensor stored in another float dtype (an f32/f16 checkpoint of
    bf16 params) is read and cast in steps of about CAST_BYTES source bytes."""
    src = reader.dtype(name)
    flat = out.reshape(out.shape[0] if out.ndim else 1, -1)
    row_bytes = flat.shape[1] * src.itemsize
    if src == out.dtype:
        reader.read_into(name, row0 * row_bytes, out)
        return
    step = max(1, CAST_BYTES // max(row_bytes, 1))
    tmp = np.empty((min(step, flat.shape[0]), flat.shape[1]), src)
    for r in range(0, flat.shape[0], step):
        k = min(step, flat.shape[0] - r)
        reader.read_into(name, (row0 + r) * row_bytes, tmp[:k])
        flat[r:r + k] = tmp[:k]


def read_unit(reader: SourceReader, unit: Unit, out: np.ndarray | None = None) -> np.ndarray:
    """The chunk's data, read from the source (and dequantized for bf16 output), into `out`
    (C-contiguous, the chunk's shape and output dtype) or a new array."""
    leaf = unit.leaf
    lead = leaf.names.ndim
    region = unit.region
    tail = region[lead:]
    if out is None:
        out = np.empty(unit.shape, leaf.dtype)
    assert out.shape == unit.shape and out.dtype == leaf.dtype and out.flags.c_contiguous
    names = np.asarray(leaf.names[region[:lead]], dtype=object)
    scales = (np.asarray(leaf.scale_names[region[:lead]], dtype=object)
              if leaf.scale_names is not None else None)
    rows = tail[0] if tail else slice(0, 1)
    row_bytes = (math.prod(leaf.src_shape[1:]) if leaf.src_shape else 1) * leaf.src_dtype.itemsize
    whole = all(s.start == 0 and s.stop == d for s, d in zip(tail[1:], leaf.src_shape[1:]))
    assert whole, "chunks split only the first tensor axis"
    for pos in np.ndindex(*names.shape):
        name = str(names[pos])
        if scales is None:
            _read_rows(reader, name, rows.start, out[pos])
            _finite(reader, name, out[pos])
            continue
        w = np.empty(out[pos].shape, leaf.src_dtype)
        reader.read_into(name, rows.start * row_bytes, w)
        r0, r1 = rows.start // BLOCK, cdiv(rows.stop, BLOCK)
        s = np.empty((r1 - r0, *leaf.scale_shape[1:]), F32)
        reader.read_into(str(scales[pos]), r0 * s[0].nbytes, s)
        _finite(reader, name, w)
        _finite(reader, str(scales[pos]), s)
        _dequant_rows(w, s, out[pos], rows.start)
        _finite(reader, name, out[pos], " after dequantization (block scales too large for bfloat16)")
    return out


def _finite(reader: SourceReader, name: str, data: np.ndarray, when: str = "") -> None:
    """ConvertError naming the shard and tensor if `data` (read from tensor `name`) holds NaN/Inf."""
    if nonfinite(data, xp=np):
        raise ConvertError(f"{reader.location(name)[0]}: tensor {name!r} {what_is_wrong(data.dtype)}"
                           f"{when}")
