"""The H100 program without an H100: XLA's real GPU compiler (fusion, its built-in Triton, ptxas)
run for a deviceless CUDA target, and what the compiled code says.

    make gpu-compile                        # = .venv-gpu/bin/python -m benchmarks.deviceless
    python -m benchmarks.deviceless --quick # the CI subset (tests/test_deviceless.py)
    python -m benchmarks.deviceless --target h200

Needs jax 0.11.2 with the CUDA plugin, the nvcc wheel (ptxas) and nvdisasm: the venv `make
gpu-venv` builds (Python 3.12). The target is `benchmarks/targets/<target>_sxm.txtpb` (XLA's
GpuTargetConfig: sm_90, 132 SMs, 228 KB shared memory per SM, 64K registers), given to
`jax.experimental.topologies.get_topology_desc(platform="cuda", topology="1x1x1" | "1x1x8" |
"2x1x8")`; inputs are abstract (`ShapeDtypeStruct`s carrying shardings on the topology's devices):
nothing is allocated, no GPU is touched.

Per Pallas kernel case (released shapes, the kernels' DECODE / PREFILL presets; the attention
kernels also over the serving engine's paged pool, "... paged"): registers per
thread, spill bytes and shared memory (a stand-in `ptxas` that runs the real one with `-v` and
keeps PTX and cubin), threads, grid and dynamic shared memory (XLA's thunk sequence), blocks per
SM, the tensor-core instruction class in the cubin (`nvdisasm`: QGMMA / HGMMA = Hopper's wgmma on
FP8 / bf16, HMMA = `mma.sync`, none), beside a static roofline (FLOPs and HBM bytes of the shapes
over 1979 FP8 / 989 bf16 TFLOPS and 3.35 TB/s; H200 4.8 TB/s) -> the predicted floor.

Per released-width program (a decode step and a 512-token prefill chunk; 1 dense + 2 MoE layers on
one device as `benchmarks.memory` builds them; the full 61-layer model on the meshes
`sharding.plan` picks for 8 and 16 devices, and on 1,1,8): XLA:GPU's `memory_analysis()` per device
beside the plan's figures, the dots by operand dtype and precision, GEMM custom calls and Triton
GEMM fusions, collectives, and the kernels one step launches (the thunk sequence, while loops
times their trip counts; which of them run inside command buffers, i.e. CUDA graphs).

Output: `<out>/deviceless.json` (cases keyed by stable names, for gpu_check.sh to put measured
times beside), `<out>/deviceless.md`, and the "Compiled for H100, no GPU" section of
benchmarks/RESULTS.md (full runs only).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"h100": HERE / "targets" / "h100_sxm.txtpb", "h200": HERE / "targets" / "h200_sxm.txtpb"}
HBM = {"h100": 3.35e12, "h200": 4.8e12}  # B/s; compute peaks are the same Hopper's
RESULTS = HERE / "RESULTS.md"
PALLAS_NAMES = ("index_logits", "radix_topk", "sparse_mla", "fp8_linear", "grouped_fp8_matmul")
MMA = ("QGMMA", "HGMMA", "HMMA")  # best first; none of them: "none"
GIB, MIB = 1 << 30, 1 << 20


# ---- the toolchain: a stand-in ptxas that keeps what it compiles ------------------------------

PTXAS = """#!/bin/bash
# stand-in written by benchmarks/deviceless.py: the real ptxas with -v; keeps PTX, cubin, report
REAL={real}
[ -z "$DSV32_PTXAS_KEEP" ] && exec "$REAL" "$@"
in=""; out=""; prev=""
for a in "$@"; do
  if [ "$prev" = "-o" ]; then out="$a"; elif [ "${{a:0:1}}" != "-" ] && [ -z "$in" ]; then in="$a"; fi
  prev="$a"
done
mkdir -p "$DSV32_PTXAS_KEEP"
n=$(mktemp -u XXXXXXXX)
[ -n "$in" ] && cp "$in" "$DSV32_PTXAS_KEEP/$n.ptx"
"$REAL" -v "$@" 2> "$DSV32_PTXAS_KEEP/$n.log"; rc=$?
[ -n "$out" ] && [ -f "$out" ] && cp "$out" "$DSV32_PTXAS_KEEP/$n.cubin"
grep -v "^ptxas info" "$DSV32_PTXAS_KEEP/$n.log" >&2
exit $rc
"""


def nvidia_tool(package: str, name: str) -> Path:
    """bin/<name> of an nvidia-* wheel of this venv (nvidia.cuda_nvcc: ptxas; nvidia.cu13:
    nvdisasm), or a clear error naming the wheel."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations if spec else None) or []:
        path = Path(root) / "bin" / name
        if path.is_file():
            return path
    raise RuntimeError(f"{name} not found (package {package}): run in the venv `make gpu-venv` "
                       "builds (nvidia-cuda-nvcc-cu12, nvidia-cuda-nvdisasm)")


def toolchain(work: Path) -> Path:
    """Write the stand-in ptxas (and nvvm beside it) under work/cuda and put it first on PATH.
    Must run before jax compiles anything. -> the nvdisasm to read cubins with."""
    real = nvidia_tool("nvidia.cuda_nvcc", "ptxas")
    cuda = work / "cuda"
    (cuda / "bin").mkdir(parents=True, exist_ok=True)
    stub = cuda / "bin" / "ptxas"
    stub.write_text(PTXAS.format(real=real))
    stub.chmod(0o755)
    if not (cuda / "nvvm").exists():
        (cuda / "nvvm").symlink_to(real.parent.parent / "nvvm")
    os.environ["PATH"] = f"{cuda / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["CUDA_ROOT"] = str(cuda)
    return nvidia_tool("nvidia.cu13", "nvdisasm")


# ---- reading what the compiler left (pure text parsing; tests/test_deviceless.py) -------------

def ptxas_report(text: str) -> dict[str, dict]:
    """`ptxas -v` output -> {kernel: {registers, spill_bytes, stack_bytes, smem_bytes}}."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w.$]+)'?", line)
        if m:
            cur = out.setdefault(m.group(1), {"registers": 0, "spill_bytes": 0, "stack_bytes": 0,
                                              "smem_bytes": 0})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            cur["stack_bytes"] = int(m.group(1))
            cur["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem_bytes"] = int(s.group(1)) if s else 0
    return out


def mma_counts(sass: str) -> dict[str, Counter]:
    """nvdisasm output -> {function: Counter of its tensor-core opcodes (QGMMA, HGMMA, HMMA)}."""
    out, cur = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.([\w.$]+):", line)
        if m:
            cur = out.setdefault(m.group(1), Counter())
            continue
        if cur is not None:
            for op in re.findall(r"\b(QGMMA|HGMMA|HMMA)\.", line):
                cur[op] += 1
    return out


def mma_class(counts: Counter) -> str:
    return next((op for op in MMA if counts.get(op)), "none")


def blocks_per_sm(threads: int, registers: int, smem: int, dev: dict) -> int:
    """Resident blocks per SM (sm_90 rules: registers allocated per warp in units of 256, at most
    32 blocks and 64 warps per SM, 1 KB of shared memory reserved per block)."""
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = [32, dev["threads_per_core_limit"] // (warps * 32),
              dev["registers_per_core_limit"] // (warps * per_warp)]
    if smem:
        limits.append(dev["shared_memory_per_core"] // (smem + 1024))
    return int(max(0, min(limits)))


THUNK = re.compile(r"^(\s*)(\d+): (k\w+)\s*\[[^\]]*\]\s*(.*)$")
LABEL = re.compile(r"^(\s*)(\w+):\s*$")


def parse_thunks(text: str) -> list[dict]:
    """XLA's thunk sequence dump -> a tree: [{id, kind, name, grid, threads, smem, children:
    {label: [...]}}] (kWhile: condition / body; kConditional: its branches; kCommandBuffer:
    "commands"). A thunk's children are indented deeper than it; a label at or below it."""
    root: list[dict] = []
    path: list[list] = []  # open container thunks: [indent, thunk, the list new items go to]
    for line in text.splitlines():
        m, lab = THUNK.match(line), LABEL.match(line)
        if lab:
            indent = len(lab.group(1))
            if lab.group(2) == "condition":  # printed at column 0: the while just read owns it
                indent = path[-1][0] if path and path[-1][1]["kind"] == "kWhile" else indent
            while path and path[-1][0] > indent:
                path.pop()
            if path:
                path[-1][2] = path[-1][1]["children"].setdefault(lab.group(2), [])
            continue
        if not m:
            continue
        indent = len(m.group(1))
        while path and path[-1][0] >= indent:
            path.pop()
        rest = m.group(4)
        t = {"id": int(m.group(2)), "kind": m.group(3), "name": rest.split(" ")[0] if rest else "",
             "children": {}}
        g = re.search(r"grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]\s+"
                      r"shared_memory: (\d+)", rest)
        if g:
            v = [int(x) for x in g.groups()]
            t.update(grid=v[:3], threads=math.prod(v[3:6]), smem=v[6])
        dest = path[-1][2] if path else root
        if dest is not None:
            dest.append(t)
        if t["kind"] == "kCommandBuffer":
            path.append([indent, t, t["children"].setdefault("commands", [])])
        elif t["kind"] in ("kWhile", "kConditional"):
            path.append([indent, t, None])
    return root


def while_trip_counts(hlo: str, metadata: str) -> dict[int, int | None]:
    """{thunk id of a kWhile: its known trip count (None: unknown)} from the optimized HLO's
    while ops and the thunk metadata dump (thunk id -> the HLO instruction name)."""
    trips = {}
    for m in re.finditer(r"%(while[.\w]*) = .*?\bwhile\(.*$", hlo, re.M):
        n = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', m.group(0))
        trips[m.group(1)] = int(n.group(1)) if n else None
    out = {}
    for m in re.finditer(r'profile_annotation: "([^"]+)"\s*thunk_id: (\d+)\s*\}\s*thunk_kind: '
                         r'"kWhile"', metadata):
        out[int(m.group(2))] = trips.get(m.group(1))
    return out


LEAF_SKIP = {"kCommandBuffer", "kWhile", "kConditional", "kSequential"}


def launches(thunks: list[dict], trips: dict[int, int | None]) -> dict:
    """What one execution of the thunk tree runs: `kernels` (device operations: kernels, copies,
    GEMMs, collectives; while bodies times their trip counts, a conditional's largest branch),
    `in_graphs` (those of them inside command buffers), `host_launches` (graph launches plus the
    operations outside any graph), `while_iterations` (each needs its predicate on the host),
    `unknown_trips` (loops counted once)."""
    acc = Counter()

    def walk(items, mult, in_graph):
        for t in items:
            kind = t["kind"]
            if kind == "kCommandBuffer":
                acc["host_launches"] += mult
                walk(t["children"].get("commands", []), mult, True)
            elif kind == "kWhile":
                n = trips.get(t["id"])
                if n is None:
                    acc["unknown_trips"] += 1
                    n = 1
                acc["while_iterations"] += mult * n
                walk(t["children"].get("condition", []), mult * (n + 1), in_graph)
                walk(t["children"].get("body", []), mult * n, in_graph)
            elif kind == "kConditional":
                sizes = []
                for branch in t["children"].values():
                    sub = launches(branch, trips)
                    sizes.append((sub["kernels"], branch))
                if sizes:
                    walk(max(sizes, key=lambda s: s[0])[1], mult, in_graph)
            elif kind not in LEAF_SKIP:
                acc["kernels"] += mult
                if in_graph:
                    acc["in_graphs"] += mult
                else:
                    acc["host_launches"] += mult

    walk(thunks, 1, False)
    return {k: acc.get(k, 0) for k in ("kernels", "in_graphs", "host_launches",
                                       "while_iterations", "unknown_trips")}


def hlo_types(hlo: str) -> dict[str, str]:
    """{instruction or parameter name: its element type} over an HLO module's text."""
    types = {}
    for m in re.finditer(r"%([\w.\-]+) = \(?([a-z]\w*)\[", hlo):
        types[m.group(1)] = m.group(2)
    for m in re.finditer(r"([\w.\-]+): ([a-z]\w*)\[", hlo):  # computation parameters
        types.setdefault(m.group(1), m.group(2))
    return types


def dots(hlo: str) -> dict[str, int]:
    """Every dot of the optimized HLO (fusion bodies included) -> {"lhs x rhs -> out precision":
    count}; precision "highest" where the dot asks for it, else "default"."""
    types = hlo_types(hlo)
    out = Counter()
    for m in re.finditer(r"= ([a-z]\w*)\[[^\]]*\][^ ]* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)$", hlo,
                         re.M):
        prec = re.search(r"operand_precision=\{(\w+)", m.group(4))
        p = prec.group(1).lower() if prec else "default"
        out[f"{types.get(m.group(2), '?')} x {types.get(m.group(3), '?')} -> {m.group(1)} {p}"] += 1
    return dict(sorted(out.items()))


# The release's own float32 computations in bf16 mode (`Linear(f32=True)`): the router, the
# indexer's weights_proj, the head. Any other f32 x f32 HIGHEST dot is XLA:CPU arithmetic.
F32_SITES = ("/gate/", "/weights_proj/", "/head/")


def f32_highest(hlo: str) -> dict[str, int]:
    """The f32 x f32 dots at precision HIGHEST -> {op_name without the jit/scan prefix: count}."""
    types = hlo_types(hlo)
    out = Counter()
    for m in re.finditer(r"= f32\[[^\]]*\][^ ]* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)$", hlo,
                         re.M):
        if types.get(m.group(1)) == types.get(m.group(2)) == "f32" and \
                "operand_precision={highest" in m.group(3):
            name = re.search(r'op_name="([^"]*)"', m.group(3))
            out[(name.group(1).split("eval_jaxpr")[-1] if name else "?")] += 1
    return dict(sorted(out.items()))


def gemms(hlo: str) -> dict[str, int]:
    """Custom calls (cuBLAS GEMMs, Pallas Triton kernels, ...) and fusions of a custom kind
    (Triton GEMM fusions: __triton_gemm) by target / kind."""
    out = Counter()
    for m in re.finditer(r'custom_call_target="([^"]+)"', hlo):
        out[f"custom-call {m.group(1)}"] += 1
    for m in re.finditer(r'"fusion_backend_config":\{"kind":"([^"]+)"', hlo):
        if m.group(1) != "__triton":  # plain Triton fusions (softmax-like) are not GEMMs
            out[f"fusion {m.group(1)}"] += 1
    return dict(sorted(out.items()))


def roofline(flops: float, hbm_bytes: float, peak: str, target: str) -> dict:
    """The static floor: the larger of FLOPs over the tensor-core peak and bytes over HBM."""
    from benchmarks.kernels import PEAK

    t_c = flops / PEAK[peak] if flops else 0.0
    t_m = hbm_bytes / HBM[target]
    return {"flops": flops, "hbm_bytes": hbm_bytes, "peak": peak,
            "floor_us": max(t_c, t_m) * 1e6, "bound": "compute" if t_c > t_m else "memory"}


# ---- the kernel cases --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelCase:
    name: str  # stable key: "<kernel>/<preset>/<shape>"
    kernel: str  # the Pallas kernel's name in the compiled module
    build: object  # () -> (fn, [(shape, dtype)]) — jax imported by then
    cost: tuple  # (flops, hbm bytes)
    peak: str  # "fp8" | "bf16": the tensor-core peak of its dots
    fp8_rows: int  # rows on the M side of its FP8 dot tile (0: no FP8 dot)
    quick: bool  # in the CI subset


# (B, S) of the attention kernels' cases also compiled over a paged pool (the serving engine's
# cache: its rows through a page table), -> in the CI subset
PAGED = {(8, 1): True, (1, 512): False}


def kernel_cases() -> list[KernelCase]:
    import jax.numpy as jnp

    import pallas_kernels as pk
    from benchmarks.gemm import RELEASED as LINEARS
    from benchmarks.gemm import linear_cost
    from benchmarks.kernels import RELEASED as SH
    from benchmarks.kernels import indexer_cost, mla_cost, topk_cost
    from pallas_kernels.common import PAGE

    def pool_rows(b: int, t: int) -> int:  # a pool of b sequences of t slots, the scratch page
        return (b * t // PAGE + 1) * PAGE
    # the modules (the package exports functions of the same names)
    fl, gf, ix, sm = (importlib.import_module(f"pallas_kernels.{m}")
                      for m in ("fp8_linear", "grouped_fp8", "indexer", "sparse_mla"))

    e4, f32, i32, bf16 = jnp.float8_e4m3fn, jnp.float32, jnp.int32, jnp.bfloat16
    out = []
    for preset, shapes in (("DECODE", [(1, 1, 131072, True), (8, 1, 131072, False),
                                       (64, 1, 32768, True)]),
                           ("PREFILL", [(1, 512, 131072, True)])):
        blocks = getattr(ix, preset)
        for b, s, t, q in shapes:
            def build(b=b, s=s, t=t, blocks=blocks):
                fn = lambda *a: pk.index_logits(*a, blocks=blocks, interpret=False)  # noqa: E731
                return fn, [((b, s, SH.n, SH.d), e4), ((b, s, SH.n), f32), ((b, t, SH.d), e4),
                            ((b, t), f32), ((b, s), i32)]
            rows = min(blocks.block_q, 1 << (s.bit_length() - 1)) * SH.n
            out.append(KernelCase(f"index_logits/{preset}/B={b} S={s} T={t}", "index_logits",
                                  build, indexer_cost(SH, b, s, t), "fp8", rows, q))
            if (b, s) in PAGED:  # the serving engine's pool: (N,d) rows through a page table
                def build_paged(b=b, s=s, t=t, blocks=blocks):
                    fn = lambda *a: pk.index_logits(*a[:5], None, a[5], blocks=blocks,  # noqa
                                                    interpret=False)
                    return fn, [((b, s, SH.n, SH.d), e4), ((b, s, SH.n), f32),
                                ((pool_rows(b, t), SH.d), e4), ((pool_rows(b, t),), f32),
                                ((b, s), i32), ((b, t // PAGE), i32)]
                out.append(KernelCase(f"index_logits/{preset}/B={b} S={s} T={t} paged",
                                      "index_logits", build_paged, indexer_cost(SH, b, s, t),
                                      "fp8", rows, PAGED[b, s]))
    for r, t, q in ((1, 131072, True), (64, 32768, False), (512, 131072, True)):
        def build(r=r, t=t):
            return (lambda s, p: pk.topk(s, p, k=SH.topk, interpret=False),
                    [((r, t), f32), ((r,), i32)])
        out.append(KernelCase(f"topk/rows/R={r} T={t} k={SH.topk}", "radix_topk", build,
                              topk_cost(SH, r, t), "bf16", 0, q))
    for preset, shapes in (("DECODE", [(1, 1, 131072, True), (8, 1, 131072, True),
                                       (64, 1, 32768, False)]),
                           ("PREFILL", [(1, 512, 131072, True)])):
        blocks = getattr(sm, preset)
        for b, s, t, q in shapes:
            def build(b=b, s=s, t=t, blocks=blocks):
                k = min(SH.topk, t)
                fn = lambda *a: pk.sparse_mla(*a, scale=0.1, blocks=blocks,  # noqa: E731
                                              interpret=False)
                return fn, [((b, s, SH.heads, SH.c), bf16), ((b, s, SH.heads, SH.r), bf16),
                            ((b, s, k), i32), ((b, t, SH.c), e4), ((b, t, SH.c // 128), f32),
                            ((b, t, SH.r), bf16)]
            out.append(KernelCase(f"sparse_mla/{preset}/B={b} S={s} T={t}", "sparse_mla", build,
                                  mla_cost(SH, b, s, t), "bf16", 0, q))
            if (b, s) in PAGED:
                def build_paged(b=b, s=s, t=t, blocks=blocks):
                    n, k = pool_rows(b, t), min(SH.topk, t)
                    fn = lambda *a: pk.sparse_mla(*a[:6], None, None, a[6], scale=0.1,  # noqa
                                                  blocks=blocks, interpret=False)
                    return fn, [((b, s, SH.heads, SH.c), bf16), ((b, s, SH.heads, SH.r), bf16),
                                ((b, s, k), i32), ((n, SH.c), e4), ((n, SH.c // 128), f32),
                                ((n, SH.r), bf16), ((b, t // PAGE), i32)]
                out.append(KernelCase(f"sparse_mla/{preset}/B={b} S={s} T={t} paged",
                                      "sparse_mla", build_paged, mla_cost(SH, b, s, t), "bf16", 0,
                                      PAGED[b, s]))
    quick_linears = {"q_a 7168->1536", "wo 16384->7168"}
    for label, k, n in LINEARS:
        for preset, m in (("DECODE", 1), ("PREFILL", 512)):
            blocks = getattr(fl, preset)
            def build(m=m, k=k, n=n, blocks=blocks):
                fn = lambda *a: pk.fp8_linear(*a, blocks=blocks, interpret=False)  # noqa: E731
                return fn, [((m, k), e4), ((m, k // 128), f32), ((n, k), e4),
                            ((-(-n // 128), k // 128), f32)]
            rows = (fl._tile(blocks.block_n, n, "block_n") if getattr(blocks, "swap_ab", False)
                    else fl._tile(blocks.block_m, m, "block_m"))  # the MMA's M side
            out.append(KernelCase(f"fp8_linear/{preset}/M={m} {label}", "fp8_linear", build,
                                  linear_cost(m, k, n), "fp8", rows, label in quick_linears))
    # the MoE's grouped call at its window sizes (moe.routed_rows_pallas): decode (1 token, 8
    # picks), a 512-token prefill chunk (16-row windows), 4096 tokens (64-row windows)
    layers, experts = 58, 256
    for tokens, br, q in ((1, 16, True), (512, 16, False), (4096, 64, True)):
        picks = tokens * 8
        n_win = min(experts, picks) + (-(-picks // br) if br < tokens else 0)
        preset = "DECODE" if br <= 16 else "PREFILL"  # the kernel's own default for br
        blocks = getattr(gf, preset)
        for label, n, k in (("w1 7168->2048", 2048, 7168), ("w2 2048->7168", 7168, 2048)):
            def build(picks=picks, n_win=n_win, br=br, n=n, k=k, blocks=blocks):
                fn = lambda *a: pk.grouped_fp8_matmul(*a, block_rows=br, blocks=blocks,  # noqa
                                                      interpret=False)
                return fn, [((picks, k), e4), ((picks, k // 128), f32),
                            ((layers, experts, n, k), e4),
                            ((layers, experts, n // 128, k // 128), f32), ((n_win,), i32),
                            ((n_win,), i32), ((n_win,), i32), ((), i32)]
            touched = experts * (1 - (1 - 8 / experts) ** tokens)
            fl_, by = linear_cost(picks, k, n)
            by = by - n * k - 4 * (n // 128) * (k // 128) + touched * (n * k + 4 * n * k // 16384)
            m_side = min(blocks.block_n, n) if getattr(blocks, "swap_ab", False) else br
            out.append(KernelCase(f"grouped_fp8/{preset}/tokens={tokens} rows={br} {label}",
                                  "grouped_fp8_matmul", build, (fl_, by), "fp8", m_side,
                                  q and label.startswith("w1")))
    return out


def read_kernels(keep: Path, nvdisasm: Path, names) -> dict[str, dict]:
    """ptxas reports and the MMA opcodes of the kept cubins, for kernels whose name is in names
    (every kernel when names is None)."""
    out = {}
    for log in sorted(keep.glob("*.log")):
        rep = ptxas_report(log.read_text())
        wanted = {k: v for k, v in rep.items() if names is None or k in names}
        if not wanted:
            continue
        cubin = log.with_suffix(".cubin")
        mma = {}
        if cubin.exists():
            sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True,
                                  text=True, check=True).stdout
            mma = mma_counts(sass)
        for k, v in wanted.items():
            counts = mma.get(k, Counter())
            out[k] = dict(v, mma=mma_class(counts), mma_counts=dict(counts))
    return out


# ---- compiling ---------------------------------------------------------------------------------

class Target:
    """A deviceless CUDA target: its topologies (by shape), device facts and a work folder."""

    def __init__(self, name: str, work: Path, nvdisasm: Path):
        self.name, self.work, self.nvdisasm = name, work, nvdisasm
        self.text = TARGETS[name].read_text()
        self.dev = {k: float(v) for k, v in re.findall(r"^\s*(\w+): ([\d.]+)$", self.text, re.M)}
        self.kind = re.search(r'device_description_str: "([^"]+)"', self.text).group(1)
        self._topos = {}
        self._n = 0

    def devices(self, topology: str):
        from jax.experimental import topologies

        if topology not in self._topos:
            self._topos[topology] = topologies.get_topology_desc(
                platform="cuda", target_config=self.text, topology=topology).devices
        return self._topos[topology]

    def compile(self, lower, abstract: bool = False) -> tuple[object, Path, Path]:
        """lower() -> jax Lowered (with `abstract`: traced and lowered for an abstract device of
        this kind, which the Pallas Triton lowering asks for), compiled with XLA's dumps and
        ptxas' reports kept. -> (compiled, dump folder, ptxas folder)."""
        import jax

        self._n += 1
        dump, keep = self.work / f"{self._n:03d}" / "dump", self.work / f"{self._n:03d}" / "ptxas"
        if abstract:
            ad = jax.sharding.AbstractDevice(device_kind=self.kind, platform="gpu",
                                             num_cores=self.dev["core_count"])
            with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (),
                                                                          abstract_device=ad)):
                low = lower()
        else:
            low = lower()
        os.environ["DSV32_PTXAS_KEEP"] = str(keep)
        try:
            comp = low.compile(compiler_options={"xla_dump_to": str(dump)})
        finally:
            os.environ.pop("DSV32_PTXAS_KEEP", None)
        return comp, dump, keep


def dump_file(dump: Path, suffix: str) -> str:
    found = sorted(dump.glob(f"*{suffix}"))
    return found[-1].read_text() if found else ""


def run_kernel(tg: Target, case: KernelCase) -> dict:
    import jax

    t0 = time.perf_counter()
    fn, specs = case.build()
    sh = jax.sharding.SingleDeviceSharding(tg.devices("1x1x1")[0])
    avals = [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in specs]
    comp, dump, keep = tg.compile(lambda: jax.jit(fn).trace(*avals).lower(), abstract=True)
    kern = read_kernels(keep, tg.nvdisasm, {case.kernel}).get(case.kernel)
    if kern is None:
        raise RuntimeError(f"{case.name}: no ptxas report of a kernel named {case.kernel!r}")
    thunk = next((t for t in _flat(parse_thunks(dump_file(dump, "thunk_sequence.txt")))
                  if t["name"] == case.kernel and "grid" in t), None)
    if thunk is None:
        raise RuntimeError(f"{case.name}: no {case.kernel!r} kernel in XLA's thunk sequence")
    smem = max(thunk["smem"], kern["smem_bytes"])
    return {"kernel": case.kernel, "registers": kern["registers"],
            "spill_bytes": kern["spill_bytes"], "smem_bytes": smem, "threads": thunk["threads"],
            "grid": thunk["grid"],
            "blocks_per_sm": blocks_per_sm(thunk["threads"], kern["registers"], smem, tg.dev),
            "mma": kern["mma"], "mma_counts": kern["mma_counts"], "fp8_rows": case.fp8_rows,
            "roofline": roofline(*case.cost, case.peak, tg.name),
            "compile_s": round(time.perf_counter() - t0, 1)}


def _flat(items):
    for t in items:
        yield t
        for sub in t["children"].values():
            yield from _flat(sub)


@dataclasses.dataclass(frozen=True)
class ProgramCase:
    name: str
    layers: str  # "3" (1 dense + 2 MoE) or "61" (the full model)
    topology: str
    mesh: tuple  # (data, expert, tensor)
    phase: str  # "decode" | "prefill"
    context: int = 131072
    batch: int = 1
    quick: bool = False


def program_cases(target: str) -> list[ProgramCase]:
    """The released-width programs: 3 layers on one device (decode, prefill chunk); the full
    model on the mesh `sharding.plan.search` ranks first for 8 and for 16 devices of the target's
    memory, and on 1,1,8 (the planner's weights + cache gate)."""
    from dsv32_jax.model.config import Config
    from sharding.plan import H100, H200, search

    memory = int(H100 if target == "h100" else H200)
    cases = [ProgramCase("3L/decode/1,1,1@128K", "3", "1x1x1", (1, 1, 1), "decode", quick=True),
             ProgramCase("3L/prefill/1,1,1@128K", "3", "1x1x1", (1, 1, 1), "prefill", quick=True),
             ProgramCase("61L/decode/1,1,8@128K", "61", "1x1x8", (1, 1, 8), "decode", quick=True)]
    for topo, n in (("1x1x8", 8), ("2x1x8", 16)):
        mesh = search(Config(), n, 131072, 1, memory)[0].mesh
        for phase in ("decode", "prefill"):
            name = f"61L/{phase}/{','.join(map(str, mesh))}@128K"
            if name not in {c.name for c in cases}:
                cases.append(ProgramCase(name, "61", topo, mesh, phase))
    return cases


def topology(devices: int) -> str:
    """The topology of n devices: one host of up to 8, else hosts of 8."""
    if devices <= 8:
        return f"1x1x{devices}"
    if devices % 8:
        raise ValueError(f"{devices} devices: more than 8 must be whole hosts of 8")
    return f"{devices // 8}x1x8"


def mesh_cases(mesh: tuple, context: int, batch: int) -> list[ProgramCase]:
    """The full model's decode step and prefill chunk on one mesh (`--mesh`, `dsv32 plan
    --xla-gpu`)."""
    top = topology(math.prod(mesh))
    tag = f"{','.join(map(str, mesh))}@{context // 1024}K" + (f" B={batch}" if batch > 1 else "")
    return [ProgramCase(f"61L/{ph}/{tag}", "61", top, tuple(mesh), ph, context, batch)
            for ph in ("decode", "prefill")]


def run_program(tg: Target, case: ProgramCase) -> dict:
    from benchmarks.memory import collectives, lower, released_cut
    from dsv32_jax.engine.generate import PREFILL_CHUNK
    from dsv32_jax.model.config import Config
    from sharding.mesh import make_mesh
    from sharding.plan import plan

    t0 = time.perf_counter()
    cfg = released_cut() if case.layers == "3" else Config()
    mesh = make_mesh(*case.mesh, devices=tg.devices(case.topology))
    queries = 1 if case.phase == "decode" else PREFILL_CHUNK
    comp, dump, _ = tg.compile(lambda: lower(cfg, case.context, queries, mesh=mesh,
                                             batch=case.batch))
    hlo = comp.as_text()
    mem = comp.memory_analysis()
    seq = dump_file(dump, "thunk_sequence_after_thunk_passes.txt") or dump_file(
        dump, "thunk_sequence.txt")
    trips = while_trip_counts(dump_file(dump, "gpu_after_optimizations.txt") or hlo,
                              dump_file(dump, "thunk_metadata.txt"))
    p = plan(cfg, case.mesh, case.context, case.batch)
    ph = p.phases[case.phase]
    return {"mesh": list(case.mesh), "topology": case.topology, "phase": case.phase,
            "context": case.context, "batch": case.batch, "layers": cfg.n_layers,
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
            "plan": {"weights": p.weights["total"], "cache": p.cache,
                     "weights_cache": p.weights["total"] + p.cache,
                     "activations_workspace": ph["total"]},
            "dots": dots(hlo), "f32_highest": f32_highest(hlo), "gemms": gemms(hlo),
            "collectives": collectives(hlo),
            "launches": launches(parse_thunks(seq), trips),
            "compile_s": round(time.perf_counter() - t0, 1)}


# ---- the report --------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def markdown(res: dict) -> str:
    t = res["target"]
    lines = [f"Target {res['device']} (`benchmarks/targets/{t}_sxm.txtpb`, sm_90a), jax "
             f"{res['jax']}, source {res.get('commit', '?')}, compiled on a CPU machine by "
             f"`make gpu-compile`"
             f"{' --quick' if res['quick'] else ''} in {res['total_s']:.0f} s (peak RSS "
             f"{res['max_rss_mb']:.0f} MB). Roofline floor: FLOPs / (1979 FP8 | 989 bf16 "
             f"TFLOPS) or HBM bytes / {HBM[t] / 1e12:.2f} TB/s, whichever is larger. One step's "
             "device ops: while bodies times their trip counts, a conditional's larger branch "
             "(an upper bound); host launches: CUDA-graph launches plus ops outside graphs.", "",
             "| kernel case | regs | spill B | smem KB | threads | grid | blocks/SM | MMA | "
             "FP8 tile rows | floor µs (bound) | measured µs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res["kernels"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:100]} | | | | | | | | | |")
            continue
        rf = r["roofline"]
        lines.append(f"| {name} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['smem_bytes'] / 1024:.0f} | {r['threads']} | "
                     f"{'x'.join(map(str, r['grid']))} | {r['blocks_per_sm']} | {r['mma']} | "
                     f"{r['fp8_rows'] or '-'} | {rf['floor_us']:.1f} ({rf['bound']}) | "
                     f"{r.get('measured_us', '-')} |")
    lines += ["", "| program (layers/phase/mesh@context) | args / device (plan: weights + cache) "
                  "| temp / device (plan: act. + workspace) | dots (operands -> out, precision) | "
                  "GEMM calls | collectives (count, largest) | one step: device ops (in CUDA "
                  "graphs) / host launches / while iterations |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res["programs"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:120]} | | | | | |")
            continue
        pl = r["plan"]
        dl = "; ".join(f"{k}: {v}" for k, v in r["dots"].items())
        gm = "; ".join(f"{k.split(' ', 1)[1]}: {v}" for k, v in r["gemms"].items())
        co = ", ".join(f"{k} {v['count']} ({fmt_bytes(v['largest_bytes'])})"
                       for k, v in sorted(r["collectives"].items())) or "none"
        la = r["launches"]
        unknown = (f" (+{la['unknown_trips']} loops of unknown trip count, counted once)"
                   if la["unknown_trips"] else "")
        lines.append(f"| {name} | {fmt_bytes(r['argument_bytes'])} "
                     f"({fmt_bytes(pl['weights_cache'])}) | {fmt_bytes(r['temp_bytes'])} "
                     f"({fmt_bytes(pl['activations_workspace'])}) | {dl} | {gm or 'none'} | {co} | "
                     f"{la['kernels']} ({la['in_graphs']}) / {la['host_launches']} / "
                     f"{la['while_iterations']}{unknown} |")
    return "\n".join(lines) + "\n"


def update_results(md: str, target: str, path: Path = RESULTS) -> None:
    """Replace (or append) the "Compiled for <TARGET>, no GPU" section of RESULTS.md."""
    title = f"## Compiled for {target.upper()}, no GPU"
    text = path.read_text() if path.exists() else ""
    body = f"{title}\n\n{md}"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: body + "\n", text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset of cases")
    ap.add_argument("--target", choices=sorted(TARGETS), default="h100")
    ap.add_argument("--out", default=str(HERE / "out"), help="deviceless.{json,md} go here")
    ap.add_argument("--only", choices=("kernels", "programs"), help="one half only")
    ap.add_argument("--match", default=None, help="only the cases whose name contains this")
    ap.add_argument("--keep", default=None, help="keep XLA dumps, PTX and cubins in this folder")
    ap.add_argument("--no-results", action="store_true", help="do not rewrite RESULTS.md")
    ap.add_argument("--mesh", metavar="D,E,T", default=None,
                    help="only the full model's two programs on this mesh (--context, --batch)")
    ap.add_argument("--context", type=int, default=131072, help="with --mesh (default 131072)")
    ap.add_argument("--batch", type=int, default=1, help="with --mesh (default 1)")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="deviceless-"))
    work.mkdir(parents=True, exist_ok=True)
    nvdisasm = toolchain(work)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.__version__ != "0.11.2":
        print(f"deviceless: warning: jax {jax.__version__}, the GPU machines run 0.11.2",
              file=sys.stderr)
    tg = Target(a.target, work, nvdisasm)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    res = {"target": a.target, "device": tg.kind, "jax": jax.__version__, "quick": a.quick,
           "commit": commit or "?",
           "kernels": {}, "programs": {}}

    def want(c):
        return (c.quick or not a.quick) and (a.match is None or a.match in c.name)

    jobs = []
    if a.mesh:
        from sharding.mesh import parse_mesh

        a.only, a.no_results = "programs", True
        jobs = [("programs", c, run_program) for c in mesh_cases(parse_mesh(a.mesh), a.context,
                                                                a.batch)]
    elif a.only != "programs":
        jobs += [("kernels", c, run_kernel) for c in kernel_cases() if want(c)]
    if a.only != "kernels" and not a.mesh:
        jobs += [("programs", c, run_program) for c in program_cases(a.target) if want(c)]
    for part, case, run in jobs:
        try:
            res[part][case.name] = run(tg, case)
        except Exception as e:  # noqa: BLE001  (recorded; the other cases still compile)
            msg = " ".join(str(e).split())[:400]
            res[part][case.name] = {"error": f"{type(e).__name__}: {msg}"}
            traceback.print_exc()
        r = res[part][case.name]
        print(f"{case.name}: " + (r["error"] if "error" in r else
              f"{r['compile_s']} s " + json.dumps({k: v for k, v in r.items()
                                                   if k in ("registers", "spill_bytes", "mma",
                                                            "blocks_per_sm", "temp_bytes",
                                                            "argument_bytes", "launches")})),
              flush=True)
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    res["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    (out / "deviceless.json").write_text(json.dumps(res, indent=1))
    (out / "deviceless.md").write_text(md)
    if not (a.quick or a.only or a.match or a.no_results):
        update_results(md, a.target)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(md)
    print(f"wrote {out}/deviceless.json and deviceless.md in {res['total_s']} s")
    return 1 if any("error" in r for p in ("kernels", "programs") for r in res[p].values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
