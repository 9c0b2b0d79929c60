"""The engine's own decode-step cost on a 126M-parameter DeepSeek-V3.2-architecture model, beside
llama.cpp's figures for the same architecture (issue 17).

    python -m benchmarks.step_cost [--lengths 1024 4096 16384] [--repeats 20] [--serve]
                                   [--weights narrow f32] [--demo N] [--profile DIR] [--json]

The model: hidden 1024, 4 layers (1 dense + 3 MoE), 16 routed experts top-4 (4 groups, 2 kept),
8 heads (MLA dims of the release: nope 128, rope 64, v 128), q_lora 384, kv_lora 256, MoE inter 256,
dense inter 2048, 8 indexer heads, index_topk 256, vocab 32768: 127M parameters (printed; FP8
block scales not counted). bf16
compute with FP8 weights and FP8 activation simulation (the default numerics), random weights.
One decode step: `engine.generate.forward` of a (1,1) token at the last slot of a cache of each
length, the cache donated; `--serve` also times `engine.step.step` over a paged pool (batch 1).
Median wall ms per step of --repeats after a warm-up, and the process CPU ms per step (both
threads). `--weights`: the weight storages timed side by side in this process at each length
(`checkpoint.storage`: "narrow" = the checkpoint's e4m3/bf16, "f32" = the float32 copies
`load_model` keeps on a CPU host; default: both), with the ratio narrow / f32; each row prints
the 1-minute load average before it. First it prints the MB of weights each storage reads per
token (`read_mb`) and the least step time that allows at the rate XLA:CPU reads a float32 matrix
in a matrix-vector product here (`read_gb_s`, a 512 MB matrix): the step's memory floor. `--demo N`: also the demo model's (`dsv32 demo`) greedy
decode tokens/s over N new tokens after a 64-token prompt (`Model.generate`'s decode_s: the
engine's decode steps, which give all but the first token), loaded
with each storage, alternated over 5 rounds, the median. `--profile DIR` traces a few steps per
length and storage (XLA:CPU per-op events) and prints the time per named scope
(attn/indexer/index_topk/...).

LLAMA_CPP_MS: llama.cpp's per-token decode time on this architecture and size (its `deepseek32`
support, flash attention on, 2 CPU threads), as reported in issue 17; llama.cpp is not run here.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import statistics
import time

LLAMA_CPP_MS = {1024: 5.5, 4096: 7.1, 16384: 13.3}

# XLA:CPU emits one trace event per executed op (thunk) only with this flag; it must be set before
# jax initializes its CPU backend.
if "--profile" in os.sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv32_jax.checkpoint import storage  # noqa: E402
from dsv32_jax.checkpoint.weights import init_params  # noqa: E402
from dsv32_jax.engine.generate import forward  # noqa: E402
from dsv32_jax.model.config import preset  # noqa: E402
from dsv32_jax.model.transformer import init_cache  # noqa: E402


def model_config(max_len: int):
    return dataclasses.replace(
        preset("small"), vocab_size=32768, dim=1024, inter_dim=2048, moe_inter_dim=256, n_layers=4,
        n_dense_layers=1, n_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, n_activated_experts=4,
        n_expert_groups=4, n_limited_groups=2, index_n_heads=8, index_head_dim=128,
        index_topk=256, rope_factor=4.0, original_seq_len=4096, max_seq_len=max(max_len, 8192))


def n_params(params) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(int(np.prod(a.shape)) for p, a in leaves if "scale" not in jax.tree_util.keystr(p))


def read_mb(params, cfg) -> float:
    """MB of weights a batch-1 decode step reads, as stored: every leaf once, but the embedding
    table (one row) and the routed experts' stacks (n_activated_experts of n_routed_experts)."""
    total = 0.0
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        keys, size = [getattr(k, "key", None) for k in path], a.size * a.dtype.itemsize
        if any(g in keys for g in storage.GATHERED):  # read by rows
            size = a.shape[-1] * a.dtype.itemsize
        elif "experts" in keys:  # the routed ones ("shared" is another key)
            size *= cfg.n_activated_experts / cfg.n_routed_experts
        total += size
    return total / 1e6


def read_gb_s(mb: int = 512, repeats: int = 9) -> float:
    """GB/s at which XLA:CPU reads a float32 matrix in a matrix-vector product (mb MB, larger
    than the caches): the rate a decode step's weight reads can reach on this machine."""
    w = jnp.ones((mb * 2**20 // 4 // 1024, 1024), jnp.float32)  # K = the model's width
    x = jnp.ones((1, 1024), jnp.float32)
    mv = jax.jit(lambda x, w: x @ w.T)
    ms, _ = _median_ms(lambda: mv(x, w), repeats)
    return w.size * 4 / ms / 1e6


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    """(median wall ms per call, mean process CPU ms per call: all threads, less sensitive than
    the wall time to other processes on a shared machine)."""
    jax.block_until_ready(fn())  # compile + warm up
    jax.block_until_ready(fn())
    times = []
    cpu = time.process_time()
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), 1e3 * (time.process_time() - cpu) / repeats


def demo_tok_s(storages, new_tokens: int, rounds: int = 5) -> dict[str, float]:
    """The demo model's greedy decode tokens/s per weight storage (median of `rounds`)."""
    from dsv32_jax.engine.runner import load_model
    from dsv32_jax.train.demo import DEMO_DIR

    models = {w: load_model(DEMO_DIR, weights=w) for w in storages}
    prompt = [[int(t) for t in np.random.default_rng(0).integers(2, 1000, 64)]]
    rates = collections.defaultdict(list)
    for r in range(rounds + 1):  # round 0 compiles
        for w, model in models.items():
            stats = {}
            out = model.generate(prompt, new_tokens, temperature=0.0, stop_tokens=[],
                                 stats=stats)
            if r:
                rates[w].append((len(out[0]) - 1) / stats["decode_s"])  # the 1st: prefill's
    return {w: statistics.median(v) for w, v in rates.items()}


def decode_step(params, cfg, length: int):
    """A function running one decode step at slot length-1 (the cache passed on, donated)."""
    state = {"cache": init_cache(cfg, 1, length)}
    tok, pos, last = (jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), length - 1, jnp.int32),
                      jnp.zeros(1, jnp.int32))

    def step():
        logits, state["cache"], _ = forward(params, tok, pos, state["cache"], last, cfg=cfg)
        return logits

    return step


def serve_step(params, cfg, length: int):
    """One `engine.step.step` of a batch of 1 decoding at slot length-1 over a paged pool."""
    from dsv32_jax.model.cache import PAGE
    from dsv32_jax.engine.step import pools, step

    n = length // PAGE
    state = {"pools": pools(cfg, n + 1)}
    table = jnp.arange(1, n + 1, dtype=jnp.int32)[None]
    args = (table, jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), length - 1, jnp.int32),
            jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
            jnp.zeros(1, jnp.float32), jnp.ones(1, jnp.float32))

    def run():
        token, state["pools"] = step(params, state["pools"], *args, cfg=cfg, impl="xla")
        return token

    return run


# ---- profile: per-op trace events -> named scopes -------------------------------------------
CONTROL = re.compile(r"(while|cond|conditional|call)\b")  # events spanning their body's events


def op_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (the jax named-scope path; "" if none)."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo_text, re.M):
        name = re.search(r'op_name="([^"]*)"', m.group(2))
        out[m.group(1)] = name.group(1) if name else ""
    return out


def scope_of(op_name: str) -> str:
    parts = op_name.split("/")
    if "attn" in parts or "moe" in parts or "ffn" in parts:  # "ffn": the dense layer's FFN
        for s in ("index_topk", "sparse_attention", "indexer", "q", "kv"):
            if s in parts:
                return "attn/" + s
        for s in ("experts", "shared_experts", "gate"):
            if s in parts:
                return "moe/" + s
        for s in ("attn", "moe", "ffn"):
            if s in parts:
                return s + "/other"
    if "fp32_by_spec" in parts:
        return "head"
    return "other" if op_name else "unnamed (no op_name)"


def profile(step, hlo_text: str, trace_dir: str, steps: int = 5) -> dict[str, float]:
    """ms per step by scope (and 'total_events', the sum of op events) from a jax.profiler trace."""
    jax.block_until_ready(step())
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            jax.block_until_ready(step())
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    names = op_scopes(hlo_text)
    per_scope: dict[str, float] = collections.Counter()
    per_op: dict[str, float] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in names and not CONTROL.match(ev.name):
                    per_scope[scope_of(names[ev.name])] += ev.duration_ns / 1e6 / steps
                    per_op[ev.name] += ev.duration_ns / 1e6 / steps
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return {"scopes": dict(per_scope), "top_ops": [(k, names[k], v) for k, v in top]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--serve", action="store_true", help="also time engine.step.step (paged)")
    ap.add_argument("--weights", nargs="+", choices=["narrow", "f32", "native"],
                    default=["narrow", "f32"],
                    help="weight storages to time side by side (checkpoint.storage); native: "
                         "matmul_impl='native' on its e4m3 bits (dsv32_jax.native)")
    ap.add_argument("--demo", type=int, metavar="N", default=0,
                    help="also the demo model's decode tokens/s over N new tokens per storage")
    ap.add_argument("--profile", metavar="DIR", help="trace and print the per-scope breakdown")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = model_config(2 * max(args.lengths))
    narrow = init_params(cfg)
    stores = {w: storage.store(narrow, "auto", native=True) if w == "native"
              else storage.store(narrow, w) for w in args.weights}
    cfgs = {w: dataclasses.replace(cfg, matmul_impl="native") if w == "native" else cfg
            for w in args.weights}
    result = {"device": jax.devices()[0].device_kind, "threads": os.cpu_count(),
              "params": n_params(narrow), "rows": []}
    print(f"{result['params'] / 1e6:.1f}M parameters, {result['device']}", flush=True)
    result["read_gb_s"] = read_gb_s()
    result["read_mb"] = {w: read_mb(p, cfgs[w]) for w, p in stores.items()}
    for w, mb in result["read_mb"].items():
        print(f"{w:>6}: {mb:.0f} MB of weights read per token; at {result['read_gb_s']:.1f} GB/s "
              f"(this machine's float32 matrix-vector read rate) >= {mb / result['read_gb_s']:.1f} "
              f"ms a step", flush=True)
    for length in args.lengths:
        for weights, params in stores.items():
            row = {"length": length, "weights": weights, "llama_cpp_ms": LLAMA_CPP_MS.get(length),
                   "load": os.getloadavg()[0]}
            step = decode_step(params, cfgs[weights], length)
            row["ours_ms"], row["ours_cpu_ms"] = _median_ms(step, args.repeats)
            if args.serve:
                row["serve_ms"], row["serve_cpu_ms"] = _median_ms(serve_step(params, cfgs[weights],
                                                                             length),
                                                                  args.repeats)
            if args.profile:
                cache = init_cache(cfg, 1, length)
                hlo = forward.lower(params, jnp.zeros((1, 1), jnp.int32),
                                    jnp.full((1, 1), length - 1, jnp.int32), cache,
                                    jnp.zeros(1, jnp.int32), cfg=cfgs[weights]).compile().as_text()
                row["profile"] = profile(step, hlo,
                                         os.path.join(args.profile, f"{length}-{weights}"))
            result["rows"].append(row)
            print(_row_text(row), flush=True)
        by = {r["weights"]: r for r in result["rows"] if r["length"] == length}
        if "narrow" in by and "f32" in by:
            n, f = by["narrow"], by["f32"]
            print(f"context {length:>6}: narrow / f32 = {n['ours_ms'] / f['ours_ms']:.2f}x wall, "
                  f"{n['ours_cpu_ms'] / f['ours_cpu_ms']:.2f}x cpu", flush=True)
    if args.demo:
        result["demo_tok_s"] = demo_tok_s(args.weights, args.demo)
        print(f"demo model decode (load {os.getloadavg()[0]:.1f}): " + ", ".join(
            f"{w} {v:.1f} tok/s" for w, v in result["demo_tok_s"].items()), flush=True)
    if args.json:
        print(json.dumps(result, indent=1))


def _row_text(row) -> str:
    ref = row["llama_cpp_ms"]
    text = (f"context {row['length']:>6} {row['weights']:>6} (load {row['load']:.1f}): "
            f"ours {row['ours_ms']:7.1f} ms/step "
            f"(cpu {row['ours_cpu_ms']:6.1f})"
            + (f"  serve {row['serve_ms']:7.1f} (cpu {row['serve_cpu_ms']:6.1f})"
               if "serve_ms" in row else "")
            + (f"  llama.cpp {ref:5.1f}  ratio {row['ours_ms'] / ref:5.1f}x" if ref else ""))
    if "profile" in row:
        scopes = row["profile"]["scopes"]
        total = sum(scopes.values())
        text += f"\n  op events {total:.1f} ms/step:"
        for k, v in sorted(scopes.items(), key=lambda kv: -kv[1]):
            text += f"\n    {k:<24} {v:7.2f} ms {100 * v / total:5.1f}%"
        text += "\n  top ops:" + "".join(f"\n    {v:7.2f} ms  {k}  {n[-90:]}"
                                         for k, n, v in row["profile"]["top_ops"])
    return text


if __name__ == "__main__":
    main()
