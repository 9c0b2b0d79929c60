"""The one device call of a GPU session: the most valuable measurements inside one wall-clock
budget (default 390 s, for a command that must end within 7 minutes), every input made on the
device, compiles counted inside the budget.

    python3 -m benchmarks.session --out D        # on a GPU -> D/session.{json,md}
    python3 -m benchmarks.session --dry-run      # the plan: each row and its estimated H100 cost
    python3 -m benchmarks.session --quick        # tiny shapes on CPU, kernels interpreted

Rows (case names are stable keys of session.json's "rows"):
1. `check/kernels`, `check/gemm`: each Pallas kernel and FP8 GEMM against its reference on the
   device (short).
2. `model/3L/<decode|prefill>/B=1 T=131072/attention=A matmul=M`: the released widths cut to
   1 dense + 2 MoE layers (random FP8 weights made on the device, one slab per tensor), a decode
   step at batch 1 and a 512-token prefill chunk at the end of a random 128K cache, attention
   xla / pallas x matmul_impl xla / pallas; each row's logits compared with the all-XLA row's on
   the same inputs (`logits_err_vs_xla`: max |diff| / std). The all-XLA rows carry the name of
   the `benchmarks.deviceless` program they match ("3L/decode/1,1,1@128K").
3. `<kernel>/<PRESET>/<shape>`: the Pallas kernels vs their XLA baselines at the shapes
   `benchmarks.deviceless` compiles, under its names (its roofline floor joins these times).
4. `fp8_linear/<PRESET>/M=m <linear>`, `moe/...`: the FP8 GEMMs; 5. `sweep/...`: block sizes.
Core rows run first (checks, the model's all-XLA and all-Pallas pairs, the decode kernels), then
the rest in the same order.
Before each row the budget is checked: a row whose estimated cost (scaled by how far the
measured compiles ran over their estimates so far) does not fit in the time left is recorded as
skipped, with the reason. `core` rows are the planned work: their estimates must fit the budget
(`--dry-run` exits 1 otherwise; tests/test_pallas_bench.py checks it); the rest runs if time is
left. Estimates are H100 guesses from FLOPs / bytes and compile counts (ESTIMATE below), not
measurements. In --quick mode the same rows run at tiny shapes on CPU: format only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks import gemm, kernels
from benchmarks.kernels import PEAK, RELEASED, TINY, device_header

# H100-host guesses (seconds): a released-width 3-layer program compiles in 45-75 s on this
# project's 2-core CPU machine (shared/kernel-notes/deviceless.md), a Pallas kernel case in ~8 s
# with ptxas; the H100 host has 16 faster cores. Run times: the roofline floor over EFFICIENCY.
ESTIMATE = {"start": 20.0, "params": 15.0, "model_compile": 35.0, "kernel_compile": 4.0,
            "xla_compile": 2.0, "inputs": 0.5, "check": 6.0}
EFFICIENCY = {"pallas": 0.3, "baseline": 0.05, "model": 0.2}
PREFILL = 512  # the prefill chunk
# the kernel shapes benchmarks.deviceless compiles (its KernelCase names)
SESSION_SHAPES = {"idx_dec": [(1, 1, 131072), (8, 1, 131072), (64, 1, 32768)],
                  "idx_pre": [(1, 512, 131072)],
                  "topk_rows": [(1, 131072), (64, 32768), (512, 131072)],
                  "mla_dec": [(1, 1, 131072), (8, 1, 131072), (64, 1, 32768)],
                  "mla_pre": [(1, 512, 131072)],
                  "idx_paged": [(8, 1, 131072)], "mla_paged": [(8, 1, 131072)]}
LINEARS = ("q_b 1536->24576", "wo 16384->7168", "expert w1|w3 7168->2x2048", "head 7168->129280")


@dataclasses.dataclass
class Row:
    name: str  # stable key of the case
    est_s: float  # estimated H100 seconds: compiles + inputs + warm-up + repeats
    run: Callable[[], dict]
    core: bool  # planned work: must fit the budget
    kind: str  # "compile" rows recalibrate the estimates (model / kernel compiles)
    deviceless: str | None = None  # the matching benchmarks.deviceless case, if any


class Budget:
    """A global deadline; rows start only if their (calibrated) estimate fits the time left."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds
        self.est, self.spent = 0.0, 0.0

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def scale(self) -> float:  # how far measured rows ran over their estimates (>= 1)
        return max(1.0, self.spent / self.est) if self.est else 1.0

    def fits(self, est_s: float) -> bool:
        return est_s * self.scale() <= self.left()

    def record(self, est_s: float, seconds: float):
        self.est, self.spent = self.est + est_s, self.spent + seconds


def _floor_s(fl: float, by: float, peak: str) -> float:
    return max(fl / PEAK[peak], by / PEAK["hbm"])


def _preset(s: int) -> str:  # the kernels' own default: DECODE blocks for S <= 2
    return "DECODE" if s <= 2 else "PREFILL"


def _kernel_name(kernel: str, variant: str, label: str) -> str:
    """kernels.cases' labels -> benchmarks.deviceless's KernelCase names."""
    if kernel == "topk":
        return f"topk/rows/{label}"
    label = label.split(" k=")[0]
    s = int(label.split("S=")[1].split()[0])
    return f"{kernel}/{_preset(s)}/{label}" + (" paged" if variant.endswith("paged") else "")


# ---- the rows ------------------------------------------------------------------------------------
def check_rows(quick: bool) -> list[Row]:
    sh = TINY if quick else RELEASED

    def run_kernels():
        res = kernels.check_all(sh, quick)
        return {"ok": all(c["ok"] for c in res), "checks": res}

    def run_gemm():
        res = gemm.checks(quick)
        return {"ok": all(c["ok"] for c in res), "checks": res}
    e = ESTIMATE
    return [Row("check/kernels", 9 * (e["kernel_compile"] + e["xla_compile"] + e["inputs"]),
                run_kernels, True, "compile"),
            Row("check/gemm", 6 * (e["kernel_compile"] + e["inputs"]) + 15, run_gemm, True,
                "compile")]


def model_rows(quick: bool, repeats: int) -> list[Row]:
    """Decode at batch 1 and a prefill chunk at the end of a 128K cache, four impl pairs each
    (the first two pairs of each step are core). Params are made once, on the first row."""
    from benchmarks import model
    from benchmarks.memory import decode_ideal_bytes, released_cut
    from dsv32_jax.model.config import preset

    # quick: float32, where the Pallas and XLA paths agree to rounding (test_pallas_gemm_model)
    base = dataclasses.replace(preset("tiny", dtype="float32"), n_layers=3, n_dense_layers=1) \
        if quick else released_cut(layers=3, dense=1)
    context = 256 if quick else 131072
    chunk = 16 if quick else PREFILL
    state: dict = {}

    def params():
        if "params" not in state:
            state["params"] = model.random_params(base)
        return state["params"]

    def make(step, queries, attn, mm):
        def run():
            cfg = dataclasses.replace(base, matmul_impl=mm)
            row, logits = model.step_row(params(), cfg, 1, context, repeats, attn, queries)
            if (attn, mm) == ("xla", "xla"):
                state[step] = logits
            ref = state.get(step)  # None: the all-XLA row did not run
            if ref is None:
                return {**row, "logits_err_vs_xla": None}
            err = float(np.max(np.abs(logits - ref)) / max(float(np.std(ref)), 1e-30))
            return {**row, "logits_err_vs_xla": err}
        return run

    e = ESTIMATE
    ideal = decode_ideal_bytes(base, context, 1)
    out = []
    for step, queries in (("decode", 1), ("prefill", chunk)):
        # prefill: ~2 FLOPs per FP8 weight byte per token (head once), FP8 peak
        run_s = (ideal / PEAK["hbm"] if queries == 1 else 2 * ideal * queries / PEAK["fp8"])
        for i, (attn, mm) in enumerate(model.COMBOS):
            est = e["model_compile"] + (1 + repeats) * run_s / EFFICIENCY["model"] + \
                (e["params"] if not out else 0)
            dl = f"3L/{step}/1,1,1@128K" if (attn, mm) == ("xla", "xla") and not quick else None
            out.append(Row(f"model/3L/{step}/B=1 T={context}/attention={attn} matmul={mm}", est,
                           make(step, queries, attn, mm), i < 2, "compile", dl))
    return out


def kernel_rows(quick: bool, repeats: int) -> list[Row]:
    sh = TINY if quick else RELEASED
    sizes = kernels.QUICK_SHAPES if quick else SESSION_SHAPES
    e, out = ESTIMATE, []
    for kernel, variant, label, mk, fn, bases, fl, by, peak in kernels.cases(sh, quick, sizes):
        name = _kernel_name(kernel, variant, label)
        floor = _floor_s(fl, by, peak)
        est = (e["kernel_compile"] + len(bases) * e["xla_compile"] + 6 * e["inputs"]
               + (1 + repeats) * floor * (1 / EFFICIENCY["pallas"]
                                           + len(bases) / EFFICIENCY["baseline"]))
        def run(mk=mk, fn=fn, bases=bases, fl=fl, by=by, peak=peak, floor=floor):
            return {**kernels.measure_case(mk, fn, bases, fl, by, peak, repeats),
                    "floor_us": floor * 1e6}
        out.append(Row(name, est, run, variant == "decode" and kernel != "index_logits+topk",
                       "compile", None if kernel == "index_logits+topk" else name))
    return out


def gemm_rows(quick: bool, repeats: int) -> list[Row]:
    shapes = gemm.QUICK if quick else [s for s in gemm.RELEASED if s[0] in LINEARS]
    out, e = [], ESTIMATE
    for label, k, n in shapes:
        for m in (1, 16) if quick else (1, 512):
            fl, by = gemm.linear_cost(m, k, n)
            est = e["kernel_compile"] + 2 * e["xla_compile"] + 3 * e["inputs"] + \
                (1 + repeats) * _floor_s(fl, by, "fp8") * (1 / EFFICIENCY["pallas"]
                                                          + 2 / EFFICIENCY["baseline"])
            name = f"fp8_linear/{'DECODE' if m <= 16 else 'PREFILL'}/M={m} {label}"
            out.append(Row(name, est, lambda label=label, k=k, n=n, m=m: gemm.linear_rows(
                [(label, k, n)], (m,), repeats)[0], False, "compile", name))
    out.append(Row("moe/routed experts/tokens=1,8,64,4096", 8 * (e["model_compile"] / 4) + 5,
                   lambda: {"rows": gemm.moe_rows(quick, repeats)}, False, "compile"))
    return out


def sweep_rows(quick: bool, repeats: int) -> list[Row]:
    sh = TINY if quick else RELEASED
    est = 8 * (ESTIMATE["kernel_compile"] + 1) + 10
    return [Row("sweep/sparse_mla decode + index_logits decode", est,
                lambda: {"rows": kernels.sweep(sh, repeats, quick)}, False, "compile")]


def plan(quick: bool, repeats: int) -> list[Row]:
    """Every row, most valuable first: the core rows (checks, the model's all-XLA and all-Pallas
    pairs, the decode kernels), then the rest (the model's single switches, the other kernels, the
    GEMMs, the sweeps), each part in that order."""
    rows = (check_rows(quick) + model_rows(quick, repeats) + kernel_rows(quick, repeats)
            + gemm_rows(quick, repeats) + sweep_rows(quick, repeats))
    return sorted(rows, key=lambda r: not r.core)  # stable


# ---- running -------------------------------------------------------------------------------------
def _write(out: Path | None, result: dict):
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "session.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out / "session.json")  # a kill leaves the last complete write, "complete": false


def markdown(result: dict) -> str:
    lines = [f"# One device call ({result['device']})", "",
             f"budget {result['budget_s']:.0f} s, used {result.get('total_s', '?')} s, "
             f"complete: {result['complete']}", "",
             "| case | est s | s | result |", "|---|---|---|---|"]
    for name, r in result["rows"].items():
        res = r.get("skipped") or r.get("error") or ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
            if k not in ("est_s", "s", "deviceless", "checks", "rows") and not isinstance(v, dict))
        lines.append(f"| {name} | {r['est_s']:.1f} | {r.get('s', '')} | {str(res)[:200]} |")
    return "\n".join(lines) + "\n"


def run(rows: list[Row], budget: Budget, out: Path | None, head: str) -> dict:
    result = {"device": head, "budget_s": budget.seconds, "complete": False, "rows": {}}
    for row in rows:
        rec = {"est_s": round(row.est_s, 1), "core": row.core}
        if row.deviceless:
            rec["deviceless"] = row.deviceless
        if not budget.fits(row.est_s):
            rec["skipped"] = (f"budget: {budget.left():.0f} s left < estimate {row.est_s:.0f} s x "
                              f"{budget.scale():.2f}")
        else:
            t0 = time.perf_counter()
            try:
                rec.update(row.run())
            except Exception as e:  # noqa: BLE001  (an OOM or a compile failure: recorded)
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rec["s"] = round(time.perf_counter() - t0, 1)
            budget.record(row.est_s, rec["s"])
        result["rows"][row.name] = rec
        print(json.dumps({row.name: {k: v for k, v in rec.items() if k not in ("checks", "rows")}},
                         default=str), flush=True)
        _write(out, result)
    result["complete"] = True
    result["total_s"] = round(time.perf_counter() - budget.t0, 1)
    _write(out, result)
    if out is not None:
        (out / "session.md").write_text(markdown(result))
    return result


def dry_run(rows: list[Row], budget_s: float) -> int:
    core = sum(r.est_s for r in rows if r.core) + ESTIMATE["start"]
    extra = sum(r.est_s for r in rows if not r.core)
    for r in rows:
        print(f"{'core ' if r.core else 'extra'} {r.est_s:7.1f} s  {r.name}"
              + (f"  [deviceless: {r.deviceless}]" if r.deviceless else ""))
    print(f"estimated (H100, an estimate): start {ESTIMATE['start']:.0f} s + core rows = {core:.0f}"
          f" s of the {budget_s:.0f} s budget; all rows {core + extra:.0f} s")
    if core > budget_s:
        print(f"error: the core rows' estimate {core:.0f} s exceeds --budget-s {budget_s:.0f}",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU (format only)")
    ap.add_argument("--out", default=None, help="write session.json and session.md here")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=390.0,
                    help="wall seconds for everything (default 390)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the rows and their estimated H100 cost; exit 1 if the core rows "
                         "do not fit the budget")
    a = ap.parse_args(argv)
    budget = Budget(a.budget_s)
    repeats = a.repeats or (1 if a.quick else 5)
    rows = plan(a.quick, repeats)
    if a.dry_run:
        return dry_run(rows, a.budget_s)
    head = device_header()
    print(head, flush=True)
    result = run(rows, budget, Path(a.out) if a.out else None, head)
    ran = [r for r in result["rows"].values() if "s" in r]
    print(f"{len(ran)} rows run, {len(result['rows']) - len(ran)} skipped, "
          f"{result['total_s']} s of {a.budget_s:.0f}")
    checks = [r for n, r in result["rows"].items() if n.startswith("check/") and "s" in r]
    return 0 if all(r.get("ok") for r in checks) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
