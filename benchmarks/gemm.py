"""FP8 block-scaled GEMMs at the model's shapes: the Pallas `fp8_linear` against XLA's blockwise
sum (`quant.blockwise_matmul`, the matmul_impl="xla" path) and XLA's bf16 matmul of the weight
dequantized beforehand; and one MoE layer's routed experts (`routed_rows`, matmul_impl "pallas" vs
"xla") for decode and prefill batches against the weight-read roofline.

    python -m benchmarks.gemm --quick          # CPU, kernels interpreted, tiny shapes: format only
    python -m benchmarks.gemm --out D          # GPU: checks, then the tables -> D/gemm.{json,md}

Rows: ms (median of --repeats after a warm-up), TFLOPS (2MNK) and % of the H100's 1979 FP8 peak,
GB/s (operands + scales + f32 output) and % of 3.35 TB/s, and baseline/pallas ratios (> 1: the
kernel is faster). MoE rows: the bytes of the experts the batch touches (w1, w3, w2, FP8) at
3.35 TB/s is the roofline time. Rows left after --budget-s are recorded as skipped. In --quick
mode the kernels run *interpreted*: the times say nothing about GPU performance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import (DEADLINE, PEAK, _fmt_row, _time, device_header, markdown,
                               random_fp8)
from dsv32_jax.model.config import preset
from dsv32_jax.model.moe import routed_rows
from dsv32_jax.model.quant import act_quant, blockwise_matmul, dequant
from pallas_kernels.fp8_linear import fp8_linear

E4M3 = jnp.float8_e4m3fn
# (name, K, N): the released linears (the head is bf16 in the release; timed here as FP8)
RELEASED = [("q_a 7168->1536", 7168, 1536), ("kv_a 7168->576", 7168, 576),
            ("q_b 1536->24576", 1536, 24576), ("wo 16384->7168", 16384, 7168),
            ("expert w1|w3 7168->2x2048", 7168, 4096), ("expert w2 2048->7168", 2048, 7168),
            ("head 7168->129280", 7168, 129280)]
QUICK = [("tiny 256->128", 256, 128), ("tiny 384->200", 384, 200)]
MS_RELEASED, MS_QUICK = (1, 16, 64, 512, 4096, 16384), (1, 16)
MAX_OUT_BYTES = 4 << 30  # skip a row whose f32 output would exceed this


def linear_inputs(m, k, n, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    xq, xs = act_quant(jax.random.normal(kx, (m, k), jnp.float32), "ue8m0")
    wq = jnp.clip(jax.random.normal(kw, (n, k), jnp.float32), -8, 8).astype(E4M3)
    ws = jnp.full((-(-n // 128), k // 128), k**-0.5, jnp.float32)
    return xq, xs, wq, ws


def linear_cost(m: int, k: int, n: int) -> tuple[float, int]:
    """(FLOPs, HBM bytes) of one FP8 linear: 2MNK; e4m3 x and w, their f32 scales, f32 y."""
    return 2.0 * m * n * k, m * k + n * k + 4 * (m * k // 128 + -(-n // 128) * (k // 128)) + 4 * m * n


def _bf16_matmul(xq, xs, wd):
    from dsv32_jax.model.quant import act_dequant
    x = act_dequant(xq, xs, jnp.bfloat16)
    return jnp.einsum("mk,nk->mn", x, wd, preferred_element_type=jnp.float32)


def linear_rows(shapes, ms, repeats):
    rows = []
    for name, k, n in shapes:
        for m in ms:
            row = {"kernel": "fp8_linear", "variant": f"M={m}", "shape": name}
            if time.perf_counter() > DEADLINE[0] or m * n * 4 > MAX_OUT_BYTES:
                row["error"] = ("skipped: --budget-s spent" if m * n * 4 <= MAX_OUT_BYTES
                                else "skipped: f32 output > 4 GiB")
                rows.append(row)
                continue
            try:
                xq, xs, wq, ws = linear_inputs(m, k, n)
                fl, by = linear_cost(m, k, n)
                tp = _time(jax.jit(fp8_linear), (xq, xs, wq, ws), repeats)
                row.update(pallas_ms=tp * 1e3, tflops=fl / tp / 1e12, gbs=by / tp / 1e9,
                           pct_flops=100 * fl / tp / PEAK["fp8"], pct_hbm=100 * by / tp / PEAK["hbm"])
                tx = _time(jax.jit(blockwise_matmul), (xq, xs, wq, ws), repeats)
                row.update(xla_ms=tx * 1e3, **{"xla/pallas": tx / tp})
                wd = dequant(wq, ws, jnp.bfloat16)  # dequantized once, outside the timing
                tb = _time(jax.jit(_bf16_matmul), (xq, xs, wd), repeats)
                row.update(bf16_ms=tb * 1e3, **{"bf16/pallas": tb / tp})
                del xq, xs, wq, ws, wd
            except Exception as e:  # noqa: BLE001  (an OOM: recorded, the other rows run)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(_fmt_row(row), flush=True)
    return rows


def moe_params(cfg, seed=0):
    """One MoE layer's stacked routed experts (1, E, out, in), random FP8 made on the device (one
    (out, in) slab per tensor, repeated over the experts), scales 1/sqrt(in)."""
    e, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
    w, s = {}, {}
    for j, (name, (n, k)) in enumerate({"w1": (i, d), "w3": (i, d), "w2": (d, i)}.items()):
        w[name] = random_fp8(jax.random.key(seed + j), (1, e, n, k), slab=2)
        s[name] = jnp.full((1, e, -(-n // 128), k // 128), k**-0.5, jnp.float32)
    return w, s


def moe_rows(quick, repeats):
    cfg = preset("tiny") if quick else dataclasses.replace(preset("671b"))
    batches = ((1, "decode"), (8, "decode")) if quick else (
        (1, "decode"), (8, "decode"), (64, "decode"), (4096, "prefill"))
    w, s = moe_params(cfg)
    k_act, e = cfg.n_activated_experts, cfg.n_routed_experts
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim  # FP8 bytes of one expert's w1, w3, w2
    rows = []
    for tokens, kind in batches:
        row = {"kernel": "moe routed experts", "variant": kind, "shape": f"tokens={tokens} top-{k_act}"}
        if time.perf_counter() > DEADLINE[0]:
            row["error"] = "skipped: --budget-s spent"
            rows.append(row)
            continue
        try:
            rng = np.random.default_rng(tokens)
            picks = np.stack([rng.choice(e, k_act, replace=False) for _ in range(tokens)])
            touched = len(np.unique(picks))
            row["shape"] += f" ({touched} experts)"
            ids = jnp.asarray(picks.reshape(-1), jnp.int32)
            src = jnp.arange(tokens * k_act) // k_act
            x = jax.random.normal(jax.random.key(1), (tokens, cfg.dim), jnp.bfloat16)

            def fn(impl):
                c = dataclasses.replace(cfg, matmul_impl=impl)
                return jax.jit(lambda w, s, x, ids: routed_rows(c, w, s, jnp.int32(0), x, src,
                                                                ids, tokens * k_act))
            by = touched * per_expert
            fl = 2.0 * tokens * k_act * per_expert
            tp = _time(fn("pallas"), (w, s, x, ids), repeats)
            tx = _time(fn("xla"), (w, s, x, ids), repeats)
            roof = by / PEAK["hbm"]
            row.update(pallas_ms=tp * 1e3, tflops=fl / tp / 1e12, gbs=by / tp / 1e9,
                       pct_flops=100 * fl / tp / PEAK["fp8"], pct_hbm=100 * by / tp / PEAK["hbm"],
                       roofline_ms=roof * 1e3, xla_ms=tx * 1e3,
                       **{"roofline/pallas": roof / tp, "xla/pallas": tx / tp})
        except Exception as e_:  # noqa: BLE001
            row["error"] = f"{type(e_).__name__}: {str(e_)[:200]}"
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


def checks(quick):
    """The kernels against the XLA path on the device (released widths, small M)."""
    res = []
    for m, k, n in ((3, 256, 200), (20, 384, 576)) if quick else ((16, 7168, 1536),
                                                                 (300, 7168, 576)):
        a = linear_inputs(m, k, n, seed=3)
        want = blockwise_matmul(*a)
        err = float(jnp.max(jnp.abs(fp8_linear(*a) - want)) / jnp.std(want))
        res.append({"check": f"fp8_linear M={m} K={k} N={n}", "ok": err < 1e-5,
                    "detail": f"max err/std {err:.1e}"})
    cfg = preset("tiny", dtype="float32") if quick else preset("671b", dtype="float32")
    w, s = moe_params(cfg, seed=5)
    for tokens in (1, 16) if quick else (1, 64):
        k_act = cfg.n_activated_experts
        rng = np.random.default_rng(tokens)
        ids = jnp.asarray(rng.integers(0, cfg.n_routed_experts, tokens * k_act), jnp.int32)
        x = jax.random.normal(jax.random.key(2), (tokens, cfg.dim), jnp.float32)
        src = jnp.arange(tokens * k_act) // k_act
        ys = [routed_rows(dataclasses.replace(cfg, matmul_impl=i), w, s, jnp.int32(0), x, src,
                          ids, tokens * k_act) for i in ("xla", "pallas")]
        err = float(jnp.max(jnp.abs(ys[1] - ys[0])) / jnp.std(ys[0]))
        res.append({"check": f"routed_rows pallas vs xla tokens={tokens}", "ok": err < 1e-5,
                    "detail": f"max err/std {err:.1e}"})
    for r in res:
        print(f"check {r['check']}: {'ok' if r['ok'] else 'FAIL'} {r['detail']}", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU interpret mode, tiny shapes")
    ap.add_argument("--out", default=None, help="write gemm.json and gemm.md here")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="skip the rows left after this many seconds (default 150)")
    ap.add_argument("--no-moe", action="store_true", help="the linear table only")
    a = ap.parse_args(argv)
    DEADLINE[0] = time.perf_counter() + a.budget_s
    repeats = a.repeats or (2 if a.quick else 10)
    head = device_header()
    print(head, flush=True)
    t0 = time.perf_counter()
    result = {"device": head, "checks": checks(a.quick)}
    result["linear"] = linear_rows(QUICK if a.quick else RELEASED,
                                   MS_QUICK if a.quick else MS_RELEASED, repeats)
    result["moe"] = [] if a.no_moe else moe_rows(a.quick, repeats)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    md = [f"# FP8 GEMMs ({head})", "", "| check | ok | detail |", "|---|---|---|"]
    md += [f"| {c['check']} | {c['ok']} | {c['detail']} |" for c in result["checks"]]
    md += ["", markdown(result["linear"], "FP8 linear (TFLOPS % of 1979 FP8)"),
           markdown(result["moe"], "MoE layer (TFLOPS % of 1979 FP8; roofline: the touched "
                                   "experts' FP8 bytes at 3.35 TB/s)")]
    print("\n".join(md))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gemm.json").write_text(json.dumps(result, indent=1))
        (out / "gemm.md").write_text("\n".join(md) + "\n")
        print(f"wrote {out}/gemm.json and gemm.md in {result['total_s']} s")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
