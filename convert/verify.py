"""`verify_checkpoint`: re-read a converted dir and its source and check they are equal."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import sys
import time

import numpy as np

from dsv32_jax.checkpoint.orbax_layout import (OrbaxCheckpointError, load_config, open_array, read_manifest,
                                  stored_leaves)

from convert.plan import Buffers, ConvertError, SourceReader, Unit, read_unit
from convert.run import leaves_for, output_config


class VerifyError(ConvertError):
    """The converted checkpoint differs from its source (or is incomplete)."""


def verify_checkpoint(out_dir, hf_dir, *, sample: float = 1.0, seed: int = 0, workers: int = 4,
                      progress: bool = True) -> dict:
    """Check `out_dir` (made by `convert_checkpoint`) against the HF checkpoint `hf_dir`.

    Checks the manifest and config, that every leaf is present with the right shape and dtype,
    and compares stored chunks with the source bit for bit (for bf16 output: with the dequantized
    source). sample: the share of chunks compared (1.0 = all; otherwise a random subset with at
    least one chunk per leaf). Returns a report dict; raises VerifyError on any difference.
    """
    t0 = time.time()
    out_dir, hf_dir = os.path.abspath(os.fspath(out_dir)), os.path.abspath(os.fspath(hf_dir))
    if not 0 < sample <= 1:
        raise ValueError(f"sample must be in (0, 1], got {sample}")
    try:
        manifest = read_manifest(out_dir)
    except OrbaxCheckpointError as e:
        raise VerifyError(str(e)) from None
    for name, info in manifest["source"]["files"].items():
        p = os.path.join(hf_dir, name)
        size = os.path.getsize(p) if os.path.isfile(p) else None
        if size != info["size"]:
            raise VerifyError(f"{p}: size {size}, but the conversion read {info['size']} bytes "
                              "(a different or modified source?)")
    cfg, ckpt, leaves = leaves_for(manifest, hf_dir)
    reader = SourceReader(ckpt)
    try:
        want_cfg = output_config(cfg, manifest["options"]["weights"])
        got_cfg = load_config(out_dir, fp8_activations=False)
        if got_cfg != want_cfg:
            diff = {f: (getattr(got_cfg, f), getattr(want_cfg, f)) for f in want_cfg.__dataclass_fields__
                    if getattr(got_cfg, f) != getattr(want_cfg, f)}
            raise VerifyError(f"{out_dir}/config.json does not match the source's "
                              f"(stored, expected): {diff}")
        arrays = {}
        for group in {lf.group for lf in leaves}:
            d = os.path.join(out_dir, group)
            try:
                stored = set(stored_leaves(d))
            except OrbaxCheckpointError as e:
                raise VerifyError(str(e)) from None
            planned = {lf.path for lf in leaves if lf.group == group}
            if stored != planned:
                raise VerifyError(f"{d}: stored leaves differ from the expected ones: missing "
                                  f"{sorted(planned - stored)[:5]}, "
                                  f"unexpected {sorted(stored - planned)[:5]}")
        for lf in leaves:
            try:
                arr = open_array(os.path.join(out_dir, lf.group), lf.path)
            except OrbaxCheckpointError as e:
                raise VerifyError(str(e)) from None
            shape, dtype = tuple(arr.shape), np.dtype(arr.dtype.numpy_dtype)
            if shape != lf.shape or dtype != lf.dtype:
                raise VerifyError(f"{lf.key}: stored {dtype.name}{list(shape)}, expected "
                                  f"{lf.dtype.name}{list(lf.shape)}")
            arrays[lf.key] = arr
        rng = random.Random(seed)
        units: list[Unit] = []
        for lf in leaves:
            all_units = list(lf.units())
            if sample >= 1:
                units += all_units
            else:
                k = max(1, round(sample * len(all_units)))
                units += rng.sample(all_units, k)
        total = sum(u.nbytes for u in units)

        buffers = Buffers()

        def compare(u: Unit) -> str | None:
            want = read_unit(reader, u, buffers.get(u))
            try:
                got = arrays[u.leaf.key][u.region].read().result()
            except Exception as e:
                return f"{u.key}: cannot read the stored chunk: {e}"
            if got.shape != want.shape or not np.array_equal(
                    np.ascontiguousarray(got).view(np.uint8), want.view(np.uint8)):
                bad = int(np.sum(np.ascontiguousarray(got).view(np.uint8) != want.view(np.uint8)))
                names = u.sources().reshape(-1)
                return (f"{u.key} (rows {[(s.start, s.stop) for s in u.region]}, from {names[0]}"
                        f"{' ..' if names.size > 1 else ''}): {bad} bytes differ from the source")
            return None

        from tqdm import tqdm

        errors = []
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
                  disable=not progress, dynamic_ncols=True) as bar, \
                cf.ThreadPoolExecutor(workers) as ex:
            for u, err in zip(units, ex.map(compare, units)):
                bar.update(u.nbytes)
                if err:
                    errors.append(err)
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise VerifyError(f"{out_dir}: {len(errors)} chunk(s) differ from {hf_dir}: "
                              + "; ".join(errors[:5]) + more)
        n_all = sum(1 for lf in leaves for _ in lf.units())
        report = {"leaves": len(leaves), "chunks_checked": len(units), "chunks": n_all,
                  "bytes_checked": total, "seconds": round(time.time() - t0, 3)}
        if progress:
            print(f"verified {out_dir} against {hf_dir}: {len(leaves)} arrays, {len(units)}/{n_all} "
                  f"chunks, {total / 1e9:.2f} GB equal", file=sys.stderr)
        return report
    finally:
        reader.close()
        ckpt.close()
