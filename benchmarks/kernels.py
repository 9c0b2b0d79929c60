"""The Pallas DSA kernels against the XLA path (and, for attention, a dense path): times, ratios,
TFLOPS and GB/s against the H100's 989 bf16 / 1979 FP8 TFLOPS and 3.35 TB/s.

    python -m benchmarks.kernels --quick            # CPU, interpret mode, tiny shapes, seconds
    python -m benchmarks.kernels                    # released shapes (GPU)
    python -m benchmarks.kernels --gpu-all --out D  # GPU: check every kernel against its reference,
                                                    # time every variant, write D/kernels.{json,md}
    (--gpu-all --quick: the same script on tiny shapes, a CPU smoke run)

Rows: indexer logits (decode, prefill), radix top-k, indexer logits + top-k end to end (vs the
production `index_topk`: key tiles + running top-k merge), sparse MLA (decode split-k, prefill)
vs the XLA gathered `sparse_mla` and a dense absorbed MLA over every cached key; the decode
kernels over a paged pool too (variant "decode paged": the serving engine's cache, shuffled pages,
vs XLA through the same page table). Times are medians
of --repeats runs after a compile/warm-up run. In --quick mode the kernels are *interpreted* on
CPU: the table shows the format only, its times are not performance figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from dsv32_jax.model import attention as xla
from dsv32_jax.model.quant import act_dequant
from pallas_kernels.common import PAGE, page_rows, unpage
from pallas_kernels.sparse_mla import DECODE as MLA_DECODE
from pallas_kernels.sparse_mla import PREFILL as MLA_PREFILL

PEAK = {"bf16": 989e12, "fp8": 1979e12, "hbm": 3.35e12}  # H100 SXM
E4M3 = jnp.float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class Shapes:
    heads: int = 128  # MLA heads H
    c: int = 512  # kv_lora_rank C
    r: int = 64  # rope width R
    n: int = 64  # index heads
    d: int = 128  # index head dim
    topk: int = 2048


RELEASED = Shapes()
TINY = Shapes(heads=16, c=128, r=16, n=16, d=32, topk=16)


def device_header() -> str:
    """The device and jax version every table is headed by (and the warning off GPU)."""
    dev = jax.devices()[0]
    head = f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    if jax.default_backend() != "gpu":
        head += " -- kernels INTERPRETED: times are not performance figures"
    return head


def time_first(fn, args, repeats: int) -> tuple[float, float]:
    """(seconds of the first call: compile + warm-up, median seconds of `repeats` calls after)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _time(fn, args, repeats: int) -> float:
    return time_first(fn, args, repeats)[1]


def random_fp8(key, shape, slab: int = 0):
    """e4m3 values made on the device from random bytes (the top exponent bit cleared: |x| < 2,
    never NaN); slab > 0: one array of the trailing `slab` dims drawn, repeated over the rest."""
    bits = jax.random.bits(key, tuple(shape[len(shape) - slab:] if slab else shape), jnp.uint8)
    x = jax.lax.bitcast_convert_type(bits & jnp.uint8(0xBF), E4M3)
    return jnp.broadcast_to(x, shape)


def _rng_arrays(seed, *specs):
    """Random arrays made on the device: int32 in [0, 2^30), e4m3 from random bytes, floats
    N(0, 1)."""
    out = []
    for key, (shape, dtype) in zip(jax.random.split(jax.random.key(seed), len(specs)), specs):
        if jnp.dtype(dtype) == jnp.int32:
            out.append(jax.random.randint(key, shape, 0, 1 << 30, jnp.int32))
        elif jnp.dtype(dtype) == jnp.dtype(E4M3):
            out.append(random_fp8(key, shape))
        else:
            out.append(jax.random.normal(key, shape, jnp.float32).astype(dtype))
    return out


# ---- the cases -----------------------------------------------------------------------------------
def indexer_inputs(sh: Shapes, b: int, s: int, t: int, seed=0):
    q, k = _rng_arrays(seed, ((b, s, sh.n, sh.d), E4M3), ((b, t, sh.d), E4M3))
    w, = _rng_arrays(seed + 1, ((b, s, sh.n), jnp.float32))
    ks = jnp.ones((b, t), jnp.float32)
    pos = jnp.broadcast_to(t - s + jnp.arange(s, dtype=jnp.int32), (b, s))  # the newest queries
    return q, w, k, ks, pos


def mla_inputs(sh: Shapes, b: int, s: int, t: int, seed=0, dtype=jnp.bfloat16):
    q_c, q_pe, c, pe = _rng_arrays(seed, ((b, s, sh.heads, sh.c), dtype),
                                   ((b, s, sh.heads, sh.r), dtype), ((b, t, sh.c), E4M3),
                                   ((b, t, sh.r), dtype))
    cs = jnp.full((b, t, sh.c // 128), 0.05, jnp.float32)
    k = min(sh.topk, t)
    kp, ks = jax.random.split(jax.random.key(seed + 2))  # k distinct slots per query, shifted
    shift = jax.random.randint(ks, (b, s, 1), 0, t, jnp.int32)
    idx = (jax.random.permutation(kp, t)[:k].astype(jnp.int32) + shift) % t
    return q_c, q_pe, idx, c, cs, pe


def to_pool(seed, arrays):
    """(B,T,...) arrays -> the same slots in paged pools (N, ...) (page 0 the scratch page, the
    others in shuffled order) and their page table (B, T/PAGE); T a multiple of PAGE."""
    b, t = arrays[0].shape[:2]
    n = b * t // PAGE
    table = (1 + jax.random.permutation(jax.random.key(seed), n)).astype(jnp.int32)
    table = table.reshape(b, t // PAGE)
    rows = (table[:, :, None] * PAGE + jnp.arange(PAGE)).reshape(-1)
    return [jnp.zeros(((n + 1) * PAGE, *a.shape[2:]), a.dtype).at[rows].set(
        a.reshape(b * t, *a.shape[2:])) for a in arrays], table


def paged_indexer_inputs(sh: Shapes, b: int, s: int, t: int, seed=0):
    q, w, k, ks, pos = indexer_inputs(sh, b, s, t, seed)
    (k, ks), table = to_pool(seed + 3, (k, ks))
    return q, w, k, ks, pos, table


def paged_mla_inputs(sh: Shapes, b: int, s: int, t: int, seed=0):
    q_c, q_pe, idx, c, cs, pe = mla_inputs(sh, b, s, t, seed)
    (c, cs, pe), table = to_pool(seed + 3, (c, cs, pe))
    return q_c, q_pe, idx, c, cs, pe, table


def _xla_index_topk(sh: Shapes):
    def f(q, w, k, ks, pos):
        b, s, t = q.shape[0], q.shape[1], k.shape[1]
        tile = xla.key_tile_size(b, s, sh.n, t)
        keys = lambda i, n: (jax.lax.dynamic_slice_in_dim(k, i, n, 1),  # noqa: E731
                             jax.lax.dynamic_slice_in_dim(ks, i, n, 1))
        return xla.index_topk(q, w, pos, keys, t, sh.topk, tile)[0]
    return f


def _xla_logits(q, w, k, ks, pos, *pages):
    if pages:  # a pool read through its page table
        k, ks = unpage(k, pages[0]), unpage(ks, pages[0])
    t = jnp.arange(k.shape[1])
    return jnp.where(t <= pos[..., None], xla.index_scores(q, w, k, ks), -jnp.inf)


def _xla_topk(sh: Shapes):
    return lambda s, pos: pk.topk_reference(s, pos, min(sh.topk, s.shape[-1]))


def _xla_sparse(scale):
    def f(q_c, q_pe, idx, c, cs, pe, *pages):  # pages: c, cs, pe a pool, its page table
        dtype = q_c.dtype

        def rows(i):
            b = jnp.arange(i.shape[0])[:, None, None]
            slot = jnp.maximum(i, 0)
            at = (page_rows(pages[0], b, slot),) if pages else (b, slot)
            return act_dequant(c[at], cs[at], dtype), pe[at]
        return xla.sparse_mla(q_c, q_pe, idx, rows, scale, dtype)
    return f


def _dense_absorbed(scale):
    """Absorbed MLA over every cached key (causal: all T visible to the newest queries)."""
    def f(q_c, q_pe, idx, c, cs, pe):
        dtype = q_c.dtype
        lat = act_dequant(c, cs, dtype)  # (B,T,C)
        sc = (jnp.einsum("bshc,btc->bsht", q_c, lat, preferred_element_type=jnp.float32)
              + jnp.einsum("bshr,btr->bsht", q_pe, pe, preferred_element_type=jnp.float32))
        p = jax.nn.softmax(sc * scale, -1).astype(dtype)
        return jnp.einsum("bsht,btc->bshc", p, lat, preferred_element_type=jnp.float32).astype(dtype)
    return f


def indexer_cost(sh: Shapes, b: int, s: int, t: int) -> tuple[float, int]:
    """(FLOPs, HBM bytes) of the indexer logits: the q.k dots (causal prefill: the tiles at or
    before the queries), keys + scales read once, f32 scores written."""
    causal_frac = 1.0 if s == 1 or s < t else 0.5 + 0.5 / max(1, t // 128)
    fl = 2 * b * s * sh.n * sh.d * t * causal_frac
    return fl, b * t * (sh.d + 4) + b * s * t * 4 + b * s * sh.n * (sh.d + 4)


def topk_cost(sh: Shapes, rows: int, t: int) -> tuple[float, int]:
    """(FLOPs, HBM bytes) of the top-k: each f32 score row read (once from HBM), k slots written."""
    return 0.0, rows * t * 4 + rows * min(sh.topk, t) * 4


def mla_cost(sh: Shapes, b: int, s: int, t: int) -> tuple[float, int]:
    """(FLOPs, HBM bytes) of sparse MLA: QK (C + R) and PV (C) over the k selected rows; the
    rows (e4m3 latent, its scales, bf16 k_pe) read once per query, q and o, the slots."""
    k = min(sh.topk, t)
    fl = 2 * b * s * sh.heads * k * (2 * sh.c + sh.r)
    by = b * s * k * (sh.c + 4 * sh.c // 128 + 2 * sh.r) + b * s * sh.heads * (
        2 * sh.c + sh.r) * 2 + b * s * k * 4
    return fl, by


TABLE_SHAPES = {  # (B, S, T) of each indexer / sparse_mla case, (rows, T) of each top-k case
    "idx_dec": [(1, 1, 4096), (1, 1, 131072), (8, 1, 32768), (64, 1, 4096), (64, 1, 32768)],
    "idx_pre": [(1, 512, 8192), (1, 512, 131072), (1, 4096, 4096)],
    "topk_rows": [(1, 131072), (64, 32768), (64, 131072), (512, 8192)],
    "mla_dec": [(1, 1, 32768), (1, 1, 131072), (16, 1, 32768), (64, 1, 8192), (64, 2, 32768)],
    "mla_pre": [(1, 512, 8192), (1, 2048, 32768)],
    "idx_paged": [(8, 1, 131072)], "mla_paged": [(8, 1, 131072)]}  # decode over a paged pool
QUICK_SHAPES = {"idx_dec": [(2, 1, 64)], "idx_pre": [(1, 16, 64)], "topk_rows": [(4, 64)],
                "mla_dec": [(2, 1, 64)], "mla_pre": [(1, 8, 64)], "idx_paged": [(2, 1, 128)],
                "mla_paged": [(2, 1, 128)]}


def cases(sh: Shapes, quick: bool, sizes: dict | None = None):
    """(kernel, variant, shape label, make_inputs, pallas fn, {baseline: fn}, flops, bytes, peak)
    over `sizes` (default: TABLE_SHAPES, or QUICK_SHAPES with quick)."""
    scale = 0.1
    sizes = sizes or (QUICK_SHAPES if quick else TABLE_SHAPES)
    idx_dec, idx_pre, topk_rows, mla_dec, mla_pre, idx_paged, mla_paged = (
        sizes.get(k, []) for k in ("idx_dec", "idx_pre", "topk_rows", "mla_dec", "mla_pre",
                                   "idx_paged", "mla_paged"))
    out = []
    for variant, shapes in (("decode", idx_dec), ("prefill", idx_pre)):
        for b, s, t in shapes:
            fl, by = indexer_cost(sh, b, s, t)
            mk = lambda b=b, s=s, t=t: indexer_inputs(sh, b, s, t)  # noqa: E731
            out.append(("index_logits", variant, f"B={b} S={s} T={t}", mk,
                        lambda *a: pk.index_logits(*a), {"xla": _xla_logits}, fl, by, "fp8"))
            out.append(("index_logits+topk", variant, f"B={b} S={s} T={t}", mk,
                        lambda *a: pk.topk(pk.index_logits(*a), a[4], k=sh.topk),
                        {"xla index_topk": _xla_index_topk(sh)}, fl, by, "fp8"))
    for b, s, t in idx_paged:
        mk = lambda b=b, s=s, t=t: paged_indexer_inputs(sh, b, s, t)  # noqa: E731
        out.append(("index_logits", "decode paged", f"B={b} S={s} T={t}", mk,
                    lambda *a: pk.index_logits(*a[:5], None, a[5]), {"xla": _xla_logits},
                    *indexer_cost(sh, b, s, t), "fp8"))
    for rows, t in topk_rows:
        def mk(rows=rows, t=t):
            s, = _rng_arrays(3, ((rows, t), jnp.float32))
            return s, jnp.full((rows,), t - 1, jnp.int32)
        out.append(("topk", "rows", f"R={rows} T={t} k={sh.topk}", mk,
                    lambda s, p: pk.topk(s, p, k=sh.topk), {"xla lax.top_k": _xla_topk(sh)},
                    *topk_cost(sh, rows, t), "fp8"))
    for variant, shapes in (("decode", mla_dec), ("prefill", mla_pre)):
        for b, s, t in shapes:
            k = min(sh.topk, t)
            fl, by = mla_cost(sh, b, s, t)
            base = {"xla": _xla_sparse(scale)}
            if b * s * sh.heads * t * 4 <= (4 << 30):  # the dense path's scores fit in 4 GiB
                base["dense"] = _dense_absorbed(scale)
            out.append(("sparse_mla", variant, f"B={b} S={s} T={t} k={k}",
                        lambda b=b, s=s, t=t: mla_inputs(sh, b, s, t),
                        lambda *a: pk.sparse_mla(*a, scale=scale), base, fl, by, "bf16"))
    for b, s, t in mla_paged:
        out.append(("sparse_mla", "decode paged", f"B={b} S={s} T={t} k={min(sh.topk, t)}",
                    lambda b=b, s=s, t=t: paged_mla_inputs(sh, b, s, t),
                    lambda *a: pk.sparse_mla(*a[:6], None, None, a[6], scale=scale),
                    {"xla": _xla_sparse(scale)}, *mla_cost(sh, b, s, t), "bf16"))
    return out


def measure_case(mk, fn, bases, fl, by, peak, repeats: int) -> dict:
    """One case of `cases`: the Pallas kernel's median time (and its first call's: compile +
    warm-up), TFLOPS / GB/s against the peaks, each baseline's time and ratio; an error recorded."""
    row = {}
    try:
        args = mk()
        first, tp = time_first(jax.jit(fn), args, repeats)
        row.update(pallas_ms=tp * 1e3, tflops=fl / tp / 1e12, gbs=by / tp / 1e9,
                   pct_flops=100 * fl / tp / PEAK[peak], pct_hbm=100 * by / tp / PEAK["hbm"],
                   first_call_s=round(first, 2))
        for name, bf in bases.items():
            try:
                tb = _time(jax.jit(bf), args, repeats)
                row[f"{name}_ms"], row[f"{name}/pallas"] = tb * 1e3, tb / tp
            except Exception as e:  # noqa: BLE001  (an OOM of a baseline: recorded)
                row[f"{name}_ms"] = f"error: {type(e).__name__}"
        del args
    except Exception as e:  # noqa: BLE001  (recorded; the other rows still run)
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


DEADLINE = [float("inf")]  # perf_counter() after which the remaining rows are skipped


def run_table(sh: Shapes, quick: bool, repeats: int, only=None) -> list[dict]:
    rows = []
    for kernel, variant, label, mk, fn, bases, fl, by, peak in cases(sh, quick):
        if only and kernel not in only:
            continue
        row = {"kernel": kernel, "variant": variant, "shape": label}
        if time.perf_counter() > DEADLINE[0]:
            row["error"] = "skipped: --budget-s spent"
            rows.append(row)
            continue
        row.update(measure_case(mk, fn, bases, fl, by, peak, repeats))
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


def _fmt_row(row: dict) -> str:
    if "error" in row:
        return f"{row['kernel']:<18} {row['variant']:<12} {row['shape']:<28} ERROR {row['error']}"
    base = "  ".join(f"{k[:-3]} {v:.3f} ms ({row.get(k[:-3] + '/pallas', 0):.2f}x)"
                     if isinstance(v, float) else f"{k[:-3]} {v}"
                     for k, v in row.items() if k.endswith("_ms") and k != "pallas_ms")
    return (f"{row['kernel']:<18} {row['variant']:<12} {row['shape']:<28} "
            f"{row['pallas_ms']:9.3f} ms {row['tflops']:8.2f} TF/s ({row['pct_flops']:5.1f}%) "
            f"{row['gbs']:8.1f} GB/s ({row['pct_hbm']:5.1f}%)  {base}")


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"## {title}", "", "| kernel | variant | shape | pallas ms | TFLOPS (% peak) | "
             "GB/s (% HBM) | baselines: ms (baseline/pallas) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['shape']} | error | | | "
                         f"{r['error'][:120]} |")
            continue
        base = "; ".join(f"{k[:-3]} {v:.3f} ({r.get(k[:-3] + '/pallas', 0):.2f}x)"
                         if isinstance(v, float) else f"{k[:-3]} {v}"
                         for k, v in r.items() if k.endswith("_ms") and k != "pallas_ms")
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['shape']} | {r['pallas_ms']:.3f} | "
                     f"{r['tflops']:.1f} ({r['pct_flops']:.1f}%) | {r['gbs']:.0f} "
                     f"({r['pct_hbm']:.1f}%) | {base} |")
    return "\n".join(lines) + "\n"


# ---- --gpu-all: correctness on the device, a block-size sweep, the table -------------------------
def check_all(sh: Shapes, quick: bool = False) -> list[dict]:
    """Each kernel against its jnp reference on the device, at real widths, small B/T (with
    `quick`: tiny, for a CPU smoke run of this script)."""
    res = []
    n = (lambda x: max(2, x // 64)) if quick else (lambda x: x)  # noqa: E731

    def record(name, fn):
        t0 = time.perf_counter()
        try:
            detail = fn()
            res.append({"check": name, "ok": True, "detail": detail})
        except Exception as e:  # noqa: BLE001
            res.append({"check": name, "ok": False,
                        "detail": f"{type(e).__name__}: {str(e)[:400]}"})
        res[-1]["s"] = round(time.perf_counter() - t0, 1)
        print(f"check {name}: {'ok' if res[-1]['ok'] else 'FAIL'} {res[-1]['detail']}", flush=True)

    def logits(b, s, t, causal, paged=False):
        a = (paged_indexer_inputs if paged else indexer_inputs)(sh, b, s, t, seed=5)
        got = pk.index_logits(*a[:5], None, *a[5:], causal=causal)
        want = pk.index_logits_reference(*a[:4], a[4] if causal else None, *a[5:])
        fin = jnp.isfinite(want)
        assert bool(jnp.all(jnp.isfinite(got) == fin)), "-inf pattern differs"
        err = float(jnp.max(jnp.where(fin, jnp.abs(got - want), 0)) / jnp.std(want[fin]))
        assert err < 1e-4, f"max err / std {err:.2e}"
        return f"max err/std {err:.1e}"

    def topk_sets(rows, t):
        s, = _rng_arrays(7, ((rows, t), jnp.float32))
        s = jnp.round(s * 4) / 4  # ties
        pos = jnp.asarray(np.random.default_rng(8).integers(0, t, rows), jnp.int32)
        got = np.sort(np.asarray(pk.topk(s, pos, k=sh.topk)), -1)
        want = np.sort(np.asarray(pk.topk_reference(s, pos, min(sh.topk, t))), -1)
        assert np.array_equal(got, want), f"{np.mean(np.any(got != want, -1)):.3f} rows differ"
        return "same sets"

    def mla(b, s, t, blocks, paged=False):
        q_c, q_pe, idx, c, cs, pe, *pages = (paged_mla_inputs if paged else mla_inputs)(
            sh, b, s, t, seed=9)
        idx = idx.at[:, :, ::7].set(-1)
        got = pk.sparse_mla(q_c, q_pe, idx, c, cs, pe, None, None, *pages, scale=0.1,
                            blocks=blocks)
        want = pk.sparse_mla_reference(q_c, q_pe, idx, c, cs, pe, 0.1, None, *pages)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
                    / jnp.std(want.astype(jnp.float32)))
        assert err < 5e-2, f"max err / std {err:.2e} (bf16 output)"
        return f"max err/std {err:.1e}"

    record("index_logits decode", lambda: logits(4, 1, n(8192) + 77, True))
    record("index_logits prefill causal", lambda: logits(1, n(1000), n(3000), True))
    record("index_logits prefill raw", lambda: logits(1, n(256), n(4096), False))
    record("topk 8 x 128K", lambda: topk_sets(8, n(131072)))
    record("topk 64 x 1500 (k > T)", lambda: topk_sets(n(64), n(1500) if quick else 1500))
    record("sparse_mla decode", lambda: mla(4, 1, n(8192), MLA_DECODE))
    record("sparse_mla prefill", lambda: mla(1, n(64), n(4096), MLA_PREFILL))
    record("index_logits decode paged", lambda: logits(4, 1, n(8192), True, paged=True))
    record("sparse_mla decode paged", lambda: mla(4, 1, n(8192), MLA_DECODE, paged=True))
    return res


def sweep(sh: Shapes, repeats: int, quick: bool = False) -> list[dict]:
    """A few block sizes of the decode kernels (the defaults are guesses until measured)."""
    out = []
    b_mla, t_mla, b_idx, t_idx = (2, 64, 2, 64) if quick else (64, 32768, 8, 131072)
    q_c, q_pe, idx, c, cs, pe = mla_inputs(sh, b_mla, 1, t_mla)
    mla_cfgs = ((16, 32, 8, 4), (32, 32, 8, 8), (64, 32, 4, 8), (32, 64, 16, 8), (16, 64, 16, 4))
    idx_cfgs = ((128, 4), (256, 4), (512, 8))
    if quick:  # a smoke run: one of each
        mla_cfgs, idx_cfgs = mla_cfgs[:1], idx_cfgs[:1]
    for bh, bk, ns, nw in mla_cfgs:
        blk = pk.SparseMLABlocks(block_h=bh, block_k=bk, n_split=ns, num_warps=nw)
        row = {"kernel": "sparse_mla", "blocks": dataclasses.asdict(blk),
               "shape": f"B={b_mla} T={t_mla}"}
        if time.perf_counter() > DEADLINE[0]:
            break
        try:
            row["ms"] = 1e3 * _time(jax.jit(lambda *a, blk=blk: pk.sparse_mla(
                *a, scale=0.1, blocks=blk)), (q_c, q_pe, idx, c, cs, pe), repeats)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        out.append(row)
        print("sweep", row, flush=True)
    del q_c, q_pe, idx, c, cs, pe
    a = indexer_inputs(sh, b_idx, 1, t_idx)
    for bt, nw in idx_cfgs:
        blk = pk.IndexerBlocks(block_q=1, block_t=bt, num_warps=nw)
        row = {"kernel": "index_logits", "blocks": dataclasses.asdict(blk),
               "shape": f"B={b_idx} T={t_idx}"}
        if time.perf_counter() > DEADLINE[0]:
            break
        try:
            row["ms"] = 1e3 * _time(jax.jit(lambda *x, blk=blk: pk.index_logits(*x, blocks=blk)),
                                    a, repeats)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        out.append(row)
        print("sweep", row, flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU interpret mode, tiny shapes")
    ap.add_argument("--gpu-all", action="store_true",
                    help="checks vs references + sweep + table, written to --out")
    ap.add_argument("--out", default="benchmarks/out", help="--gpu-all output folder")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--only", nargs="*", help="kernels to run (index_logits, topk, ...)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="skip the rows left after this many seconds (default 360)")
    a = ap.parse_args(argv)
    DEADLINE[0] = time.perf_counter() + a.budget_s
    sh = TINY if a.quick else RELEASED
    repeats = a.repeats or (2 if a.quick else 10)
    head = device_header()
    print(head, flush=True)
    if a.gpu_all:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = {"device": head, "checks": check_all(sh, a.quick)}
        (out / "kernels.json").write_text(json.dumps(result, indent=1))
        result["table"] = run_table(sh, a.quick, repeats, a.only)
        (out / "kernels.json").write_text(json.dumps(result, indent=1))
        result["sweep"] = sweep(sh, repeats, a.quick)
        result["total_s"] = round(time.perf_counter() - t0, 1)
        (out / "kernels.json").write_text(json.dumps(result, indent=1))
        md = [f"# Pallas kernel check ({head})", "", "| check | ok | detail | s |",
              "|---|---|---|---|"]
        md += [f"| {c['check']} | {c['ok']} | {c['detail']} | {c['s']} |" for c in result["checks"]]
        md += ["", markdown(result["table"], "Times"), "## Block sweep", ""]
        md += [f"- {r['kernel']} {r['shape']} {r['blocks']}: "
               + (f"{r['ms']:.3f} ms" if "ms" in r else r["error"]) for r in result["sweep"]]
        (out / "kernels.md").write_text("\n".join(md) + "\n")
        print(f"wrote {out}/kernels.json and kernels.md in {result['total_s']} s")
        return 0 if all(c["ok"] for c in result["checks"]) else 1
    rows = run_table(sh, a.quick, repeats, a.only)
    print()
    print(markdown(rows, head))
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
