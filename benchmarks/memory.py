"""Memory at the released widths, without the hardware: lower and compile one decode step and one
prefill chunk of the released config cut to 1 dense + 2 MoE layers, batch 1, with abstract params
(`jax.ShapeDtypeStruct`: nothing is allocated).

Reports, per program:
- the largest tensor any op of the lowered StableHLO produces (before optimization, so the same
  for every backend; in-place updates (dynamic_update_slice, scatter), reshapes, and control-flow
  / call results are not counted, as they alias buffers that exist anyway);
- XLA:CPU's compiled temp memory (`memory_analysis`) at 32K and 128K context, and its growth
  (XLA:CPU widens FP8/bf16 operands for whole arrays, so the absolute figure is inflated);
- XLA's `cost_analysis` bytes accessed against the ideal traffic of a decode step (loop bodies
  are counted once by XLA's cost model, so read it as a lower bound).

    python -m benchmarks.memory            # the table (a few minutes on 2 cores)
    python -m benchmarks.memory --json F   # also write the figures to F
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.memory --mesh 1,8,1
                                           # the same programs sharded: per-device figures and
                                           # the collectives of the compiled program
`tests/test_memory.py` gates the same figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.checkpoint.weights import abstract_params, flatten
from dsv32_jax.engine.generate import forward
from dsv32_jax.model.cache import bytes_per_token
from dsv32_jax.model.config import Config
from dsv32_jax.model.transformer import init_cache

GIB, MIB = 1 << 30, 1 << 20
BITS = {"f64": 64, "f32": 32, "bf16": 16, "f16": 16, "f8E4M3FN": 8, "f8E5M2": 8, "i64": 64,
        "ui64": 64, "i32": 32, "ui32": 32, "i16": 16, "i8": 8, "ui8": 8, "i1": 8}
NOT_COUNTED = ("dynamic_update_slice", "scatter", "reshape", "while", "case", "if", "call",
               "optimization_barrier", "return")


def released_cut(layers: int = 3, dense: int = 1) -> Config:
    """The released config with `layers` decoder layers, `dense` of them dense."""
    return dataclasses.replace(Config(), n_layers=layers, n_dense_layers=dense)


def abstract(cfg: Config):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract_params(cfg),
                        is_leaf=lambda x: hasattr(x, "names"))


def lower(cfg: Config, context: int, queries: int, impl: str = "xla", mesh=None, batch: int = 1):
    """forward() of `queries` new tokens written at the end of a `context`-slot cache; with a
    mesh, params and cache carry the shardings `load_model(mesh=)` gives them."""
    params = abstract(cfg)
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, context))
    if mesh is not None:
        from dsv32_jax.shardings import cache_shardings, param_shardings

        def put(x, s):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

        params = jax.tree.map(put, params, param_shardings(abstract_params(cfg), mesh))
        cache = jax.tree.map(put, cache, cache_shardings(cache, mesh))
    i32 = jnp.int32
    tokens = jax.ShapeDtypeStruct((batch, queries), i32)
    pos = jax.ShapeDtypeStruct((batch, queries), i32)
    last = jax.ShapeDtypeStruct((batch,), i32)
    if mesh is None:
        return forward.lower(params, tokens, pos, cache, last, cfg=cfg, impl=impl)
    with jax.set_mesh(mesh):
        return forward.lower(params, tokens, pos, cache, last, cfg=cfg, impl=impl)


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(hlo: str) -> dict[str, dict]:
    """Compiled HLO text -> {collective: {"count", "largest_bytes", "fp8"}} (fp8: how many move
    e4m3 operands)."""
    out = {}
    for line in hlo.splitlines():
        m = re.search(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        kind = m.group(2)
        size = 0
        for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            bits = {"f8e4m3fn": 8, "u8": 8, "s8": 8, "bf16": 16, "f16": 16, "u16": 16, "f32": 32,
                    "s32": 32, "u32": 32, "pred": 8}.get(dt, 0)
            size += math.prod(int(d) for d in dims.split(",") if d) * bits // 8  # a tuple: all
        row = out.setdefault(kind, {"count": 0, "largest_bytes": 0, "fp8": 0})
        row["count"] += 1
        row["largest_bytes"] = max(row["largest_bytes"], size)
        row["fp8"] += "f8e4m3" in m.group(1)
    return out


def measure_sharded(cfg: Config, mesh, context: int = 131072, batch: int = 1, chunk: int = 512):
    """Per-device figures of the sharded decode step and prefill chunk at `context`."""
    out = {"config": f"released widths, 1 dense + 2 MoE layers, batch {batch}, mesh "
                     f"{'x'.join(map(str, mesh.devices.shape))} (data, expert, tensor)"}
    for name, queries in (("decode", 1), ("prefill", chunk)):
        t0 = time.perf_counter()
        comp = lower(cfg, context, queries, mesh=mesh, batch=batch).compile()
        mem = comp.memory_analysis()
        out[name] = {"argument_bytes": int(mem.argument_size_in_bytes),
                     "temp_bytes": int(mem.temp_size_in_bytes),
                     "collectives": collectives(comp.as_text()),
                     "seconds": time.perf_counter() - t0}
    return out


def report_sharded(res: dict) -> str:
    lines = [f"# {res['config']}", "| program | per-device arguments | compiled temp (XLA:CPU) | "
             "collectives (count, largest) | FP8 operands moved |", "| --- | --- | --- | --- | --- |"]
    for name in ("decode", "prefill"):
        r = res[name]
        coll = ", ".join(f"{k} {v['count']} ({v['largest_bytes'] / MIB:.1f} MiB)"
                         for k, v in sorted(r["collectives"].items()))
        fp8 = sum(v["fp8"] for v in r["collectives"].values())
        lines.append(f"| {name} | {r['argument_bytes'] / GIB:.2f} GiB | {r['temp_bytes'] / GIB:.2f} GiB"
                     f" | {coll} | {fp8} |")
    return "\n".join(lines)


def _tensor_bytes(t: str) -> int:
    *dims, dtype = t.split("x")
    if dtype not in BITS:
        return 0
    return math.prod(int(d) for d in dims) * BITS[dtype] // 8 if all(d.isdigit() for d in dims) \
        else 0


def largest_tensors(stablehlo: str, top: int = 5) -> list[tuple[int, str, str]]:
    """[(bytes, op, result type)] of the largest op results in StableHLO text, largest first."""
    found = []
    for line in stablehlo.splitlines():
        m = re.match(r"\s*%[\w#:]+\s*=\s*\"?([\w.]+)", line)
        if not m:
            continue
        op = m.group(1).split(".")[-1]
        if op in NOT_COUNTED:
            continue
        sig = line.rsplit("->", 1)[1] if "->" in line else line.rsplit(" : ", 1)[-1]
        for t in re.findall(r"tensor<([^>]*)>", sig):
            found.append((_tensor_bytes(t), op, t))
    found.sort(reverse=True)
    return found[:top]


def decode_ideal_bytes(cfg: Config, context: int, batch: int = 1) -> int:
    """What one decode step of `batch` sequences must read: every dense weight once, the shared
    and the routed experts the batch touches in each MoE layer (8 at batch 1; the expected number
    of distinct experts, E * (1 - (1 - 8/E)^batch), beyond), an embedding row per sequence, the
    head; per sequence the indexer keys of every slot and the k selected latent rows of every
    layer; plus the new cache rows written."""
    e, k_act = cfg.n_routed_experts, cfg.n_activated_experts
    touched = e * (1 - (1 - k_act / e) ** batch)
    total = 0
    for path, spec in flatten(abstract_params(cfg)).items():
        if path == ("embed", "weight"):
            total += batch * spec.shape[1] * np.dtype(spec.dtype).itemsize
        elif "experts" in path:
            total += int(spec.nbytes * touched / e)
        else:
            total += spec.nbytes
    per = bytes_per_token(cfg)
    k = min(cfg.index_topk, context)
    total += batch * cfg.n_layers * (context * per["indexer"] + k * per["mla"] + per["total"])
    return total


def measure(cfg: Config, contexts=(32768, 131072), chunk: int = 512, compile_: bool = True):
    out = {"config": "released widths, 1 dense + 2 MoE layers, batch 1"}
    for name, queries in (("decode", 1), ("prefill", chunk)):
        for t in contexts:
            t0 = time.perf_counter()
            low = lower(cfg, t, queries)
            big = largest_tensors(low.as_text())
            row = {"largest_bytes": big[0][0], "largest": [f"{b / MIB:.1f} MiB {op} {ty}"
                                                           for b, op, ty in big[:3]]}
            if compile_:
                comp = low.compile()
                mem = comp.memory_analysis()
                row["temp_bytes"] = int(mem.temp_size_in_bytes)
                cost = comp.cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                row["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
                if name == "decode":
                    row["ideal_bytes"] = decode_ideal_bytes(cfg, t)
            row["seconds"] = time.perf_counter() - t0
            out[f"{name}@{t}"] = row
    return out


def report(res: dict, contexts=(32768, 131072)) -> str:
    lo, hi = contexts
    lines = [f"# {res['config']}", "| measure | value |", "| --- | --- |"]
    for name in ("decode", "prefill"):
        r = res[f"{name}@{hi}"]
        lines.append(f"| largest op result, {name} @ {hi // 1024}K | {r['largest_bytes'] / GIB:.3f} GiB"
                     f" ({r['largest'][0]}) |")
    d_lo, d_hi = res[f"decode@{lo}"], res[f"decode@{hi}"]
    if "temp_bytes" in d_hi:
        lines.append(f"| decode temp growth {lo // 1024}K -> {hi // 1024}K (XLA:CPU) | "
                     f"{(d_hi['temp_bytes'] - d_lo['temp_bytes']) / MIB:.1f} MiB |")
        for name in ("decode", "prefill"):
            r = res[f"{name}@{hi}"]
            lines.append(f"| compiled temp, {name} @ {hi // 1024}K (XLA:CPU) | "
                         f"{r['temp_bytes'] / GIB:.2f} GiB |")
        lines.append(f"| decode bytes accessed (XLA cost model) vs ideal @ {hi // 1024}K | "
                     f"{d_hi['bytes_accessed'] / GIB:.2f} GiB vs {d_hi['ideal_bytes'] / GIB:.2f} GiB"
                     f" ({d_hi['bytes_accessed'] / d_hi['ideal_bytes']:.2f}x) |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--no-compile", action="store_true", help="lowering only (largest tensors)")
    ap.add_argument("--mesh", metavar="D,E,T", help="sharded over this mesh of all devices")
    ap.add_argument("--batch", type=int, default=1, help="sequences (with --mesh; default 1)")
    args = ap.parse_args(argv)
    if args.mesh:
        from sharding.mesh import make_mesh, parse_mesh

        res = measure_sharded(released_cut(), make_mesh(*parse_mesh(args.mesh)), batch=args.batch)
        print(report_sharded(res))
    else:
        res = measure(released_cut(), compile_=not args.no_compile)
        print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
