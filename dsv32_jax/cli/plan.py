"""`dsv32 plan`: the per-device memory of a config on a mesh (`sharding.plan`), and the meshes that fit;
nothing is loaded, no device is needed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import tempfile
from pathlib import Path

from dsv32_jax.cli import common
from dsv32_jax.model.config import Config, preset
from sharding import plan as planner
from sharding.mesh import parse_mesh


def add_parser(sub) -> None:
    pl = sub.add_parser("plan", help="per-device memory (weights, cache, activations, workspace) of a config "
                                     "on a mesh, and the meshes that fit; nothing is loaded")
    pl.add_argument("--config", default="671b", help="671b | small | tiny (presets), or an HF checkpoint "
                                                     "directory or its config.json (default 671b)")
    pl.add_argument("--devices", type=int, default=None, help="device count (default 8, or the --mesh size)")
    pl.add_argument("--device-memory", default="141GB", metavar="SIZE",
                    help="memory per device: 141GB, 80GiB, 141e9 ... (default 141GB, an H200)")
    pl.add_argument("--context", type=int, default=None, help="cache length in tokens (default: the model's "
                                                              "max_position_embeddings)")
    pl.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    pl.add_argument("--mesh", default=None, metavar="D,E,T", help="data,expert,tensor (default: search them)")
    pl.add_argument("--weights", choices=["fp8", "bf16"], default=None,
                    help="weight format (default: the config's own)")
    pl.add_argument("--capacity-factor", type=float, default=None, metavar="F",
                    help="expert-parallel send buffers of F x the mean load (default: exact, no pick dropped)")
    pl.add_argument("--headroom", type=float, default=0.10,
                    help="share of device memory left to the runtime (default 0.10)")
    pl.add_argument("--xla-gpu", action="store_true",
                    help="also compile the released model on the plan's mesh for an H100 (H200 with "
                         "--device-memory > 100GB) without a GPU and print XLA:GPU's per-device arguments "
                         "and temp beside the plan (needs `make gpu-venv`; minutes)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument("--debug", action="store_true", help="show the traceback of an error")
    pl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`dsv32 plan`: per-device memory of a config on a mesh (sharding.plan), without weights or devices."""

    def usage(msg: str) -> int:
        common.say(f"dsv32 plan: error: {msg} (see 'dsv32 plan --help')")
        return 2

    try:
        memory = planner.parse_bytes(args.device_memory)
        mesh = parse_mesh(args.mesh) if args.mesh is not None else None
    except ValueError as e:
        return usage(str(e))
    for name in ("devices", "context", "batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return usage(f"--{name} must be an integer >= 1, got {v}")
    if not 0 <= args.headroom < 1:
        return usage(f"--headroom must be in [0, 1), got {args.headroom}")
    if args.capacity_factor is not None and not args.capacity_factor > 0:
        return usage(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    devices = args.devices if args.devices is not None else (8 if mesh is None else mesh[0] * mesh[1] * mesh[2])
    if mesh is not None and mesh[0] * mesh[1] * mesh[2] != devices:
        return usage(f"--mesh {args.mesh} has {mesh[0] * mesh[1] * mesh[2]} devices, --devices says {devices}")
    cfg = preset(args.config) if args.config in ("671b", "small", "tiny") else Config.from_hf(args.config)
    cfg = dataclasses.replace(cfg, weight_dtype=args.weights or cfg.weight_dtype,
                              ep_capacity_factor=args.capacity_factor)
    context = args.context if args.context is not None else cfg.max_seq_len
    best = (planner.plan(cfg, mesh, context, args.batch, memory, args.headroom) if mesh is not None
            else planner.search(cfg, devices, context, args.batch, memory, args.headroom)[0])
    ranked = [] if mesh is not None else planner.search(cfg, devices, context, args.batch, memory, args.headroom)
    if args.xla_gpu and args.config != "671b":
        return usage("--xla-gpu compiles the released model: use it with --config 671b")
    xla = _xla_gpu(best.mesh, context, args.batch, "h200" if memory > 100e9 else "h100") if args.xla_gpu else None
    small = {} if mesh is not None else {
        name: planner.smallest(cfg, context, args.batch, int(size), args.headroom)
        for name, size in (("H100", planner.H100), ("H200", planner.H200))}
    if args.json:
        print(json.dumps({
            "config": args.config, "weights": cfg.weight_dtype, "capacity_factor": cfg.ep_capacity_factor,
            "devices": devices, "device_memory": memory, "context": context, "batch": args.batch,
            "headroom": args.headroom, "plan": best.to_json(),
            "meshes": [{"mesh": list(p.mesh), "total": p.total, "free": p.free, "fits": p.fits,
                        "problems": list(p.problems)} for p in ranked],
            "smallest": {name: {"device_memory": int(getattr(planner, name)), "devices": r["devices"],
                                "mesh": list(r["best"].mesh) if r["best"] else None,
                                "total": r["best"].total if r["best"] else None,
                                "fitting": [list(m) for m in r["fitting"]]}
                         for name, r in small.items()},
            **({"xla_gpu": xla} if xla else {})}, indent=2))
        return 0
    print(f"dsv32 plan: {args.config} ({cfg.weight_dtype} weights, {cfg.dtype} compute, expert-parallel "
          f"capacity {'exact' if cfg.ep_capacity_factor is None else cfg.ep_capacity_factor}), "
          f"{devices} x {memory / 1e9:.1f} GB")
    if mesh is None:
        fitting = [p for p in ranked if p.fits]
        print(f"best mesh of {devices} devices: " + ("the one leaving the most memory free (memory only: a tensor "
                                                     "group is best kept within one host's NVLink)" if fitting
                                                     else "none fits; the closest is shown"))
    print(planner.table(best))
    if xla:
        print(f"XLA:GPU, compiled for an {'H200' if memory > 100e9 else 'H100'} (no GPU; benchmarks/deviceless.py), "
              "per device, GB (the plan's figure in parentheses):")
        for phase in ("decode", "prefill"):
            x, ph = xla[phase], best.phases[phase]
            print(f"  {phase:<8} arguments {planner.gb(x['argument_bytes']):>7} (weights + cache "
                  f"{planner.gb(best.weights['total'] + best.cache)})   temp {planner.gb(x['temp_bytes']):>6} "
                  f"(activations + workspace {planner.gb(ph['total'])})")
    if ranked:
        print(f"meshes of {devices} devices (data,expert,tensor), best first: total / free GB per device")
        for p in ranked:
            state = "fits" if p.fits else ("cannot run: " + p.problems[0] if p.problems else "does not fit")
            print(f"  {','.join(map(str, p.mesh)):>9}  {p.total / 1e9:8.2f}  {p.free / 1e9:8.2f}  {state}")
    for name, r in small.items():
        size = getattr(planner, name) / 1e9
        if r["devices"] is None:
            print(f"smallest {name} ({size:.0f} GB) mesh: none of {planner.SEARCH_COUNTS[-1]} or fewer devices fits")
        else:
            p = r["best"]
            print(f"smallest {name} ({size:.0f} GB) mesh: {r['devices']} devices, best {','.join(map(str, p.mesh))} "
                  f"({p.total / 1e9:.2f} GB per device, {p.free / 1e9:.2f} GB free); fitting: "
                  f"{' '.join(','.join(map(str, m)) for m in r['fitting'])}")
    return 0


def _xla_gpu(mesh, context: int, batch: int, target: str) -> dict:
    """XLA:GPU's per-device figures of the released model's decode step and prefill chunk on
    `mesh`, compiled for a deviceless `target` (benchmarks/deviceless.py in the repository's GPU
    venv, or $DSV32_GPU_VENV; a few minutes) -> {phase: {"argument_bytes", "temp_bytes"}}."""
    repo = Path(__file__).resolve().parents[2]
    py = Path(os.environ.get("DSV32_GPU_VENV", repo / ".venv-gpu")) / "bin" / "python"
    if not (py.is_file() and (repo / "benchmarks" / "deviceless.py").is_file()):
        raise OSError(f"--xla-gpu needs the GPU venv of a source checkout: run `make gpu-venv` in "
                      f"{repo} (no {py})")
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([str(py), "-m", "benchmarks.deviceless", "--mesh", ",".join(map(str, mesh)),
                               "--context", str(context), "--batch", str(batch), "--target", target,
                               "--out", out], cwd=repo, capture_output=True, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        path = Path(out) / "deviceless.json"
        progs = json.loads(path.read_text())["programs"] if path.is_file() else {}
    failed = [v["error"] for v in progs.values() if "error" in v]
    if proc.returncode or failed or len(progs) != 2:
        tail = (failed or proc.stderr.strip().splitlines()[-1:] or ["no output"])[0]
        raise OSError(f"the XLA:GPU compile failed (exit {proc.returncode}): {tail}")
    return {v["phase"]: {"argument_bytes": v["argument_bytes"], "temp_bytes": v["temp_bytes"]}
            for v in progs.values()}
