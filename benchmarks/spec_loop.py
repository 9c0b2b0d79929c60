"""Where a speculative iteration's time goes: the plain and the speculative decode loops on the
trained demo model, timed side by side in one process, and optionally traced per op.

    python -m benchmarks.spec_loop [--batch 1 8] [--ks 1 2 3] [--max-new-tokens 64] [--reps 5]
                                   [--profile DIR] [--json]

Each loop is `engine.generate.decode_loop` / `engine.speculative.decode_loop` called directly on
one prefilled batch (greedy, no stop token, max_new tokens per sequence), the caches rebuilt
outside the timing; the fastest of --reps calls after a compile call, the loops' calls interleaved
(the least disturbed figure on a shared machine). Per step: ms per plain step, ms per speculative
iteration (the loop's time / its iterations; at batch > 1 the iterations of every sequence are
counted, so only the batch-1 figure is per iteration), decode tokens/s and the ratio to plain.
`--profile DIR` traces one call of each loop (XLA:CPU per-op events, `benchmarks.step_cost`)
and prints the top ops and the time per named scope per step / iteration.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import time
from functools import partial

if "--profile" in os.sys.argv:  # before jax initializes its CPU backend (`step_cost`)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.mtp_acceptance import held_out  # noqa: E402
from benchmarks.step_cost import CONTROL, op_scopes, scope_of  # noqa: E402
from dsv32_jax.train.demo import DEMO_DIR  # noqa: E402


class Loops:
    """The demo model, one prefilled batch, and the two decode loops' calls on it."""

    def __init__(self, model, prompts, max_new: int):
        from dsv32_jax.engine import generate as gen
        from dsv32_jax.model.mtp import init_mtp_cache
        from dsv32_jax.model.transformer import init_cache

        self.m, self.cfg, self.max_new = model, model.config, max_new
        tokens, self.lengths, self.n_out, total, self.stop = gen.setup(
            self.cfg, prompts, max_new, [])
        b = len(prompts)
        self.fresh = lambda: (init_cache(self.cfg, b, total), init_mtp_cache(self.cfg, b, total))
        cache, mtp_cache = self.fresh()
        before = jnp.zeros((b, self.cfg.dim), self.cfg.dtype)
        self.logits, cache, (mtp_cache, self.h) = gen.prefill(
            model.params, self.cfg, "xla", tokens, self.lengths, cache,
            mtp=(model.mtp, mtp_cache, before))
        self.cache, self.mtp_cache = cache, mtp_cache  # the prefilled caches (copied per call)

    def plain(self):
        from dsv32_jax.engine import generate as gen

        cache = jax.tree.map(jnp.copy, self.cache)
        jax.block_until_ready(cache)
        t = time.perf_counter()
        out, _ = gen.decode_loop(self.m.params, cache, self.logits, self.lengths,
                                 np.int32(self.max_new), jax.random.key(0), np.float32(0),
                                 np.float32(1), self.stop, cfg=self.cfg, impl="xla",
                                 n_out=self.n_out)
        out = np.asarray(out)
        return time.perf_counter() - t, self.max_new - 1, out  # the first token: the prefill's

    def spec(self, k: int):
        from dsv32_jax.engine import speculative as spec

        cache, mtp_cache = jax.tree.map(jnp.copy, (self.cache, self.mtp_cache))
        jax.block_until_ready((cache, mtp_cache))
        t = time.perf_counter()
        out, _, iters, _, _ = spec.decode_loop(
            self.m.params, self.m.mtp, cache, mtp_cache, self.logits, self.h, self.lengths,
            np.int32(self.max_new), jax.random.key(0), np.float32(0), np.float32(1), self.stop,
            cfg=self.cfg, impl="xla", k=k, n_out=self.n_out)
        out = np.asarray(out)
        return time.perf_counter() - t, int(iters), out


def timed(runs: dict, reps: int, max_new: int) -> dict:
    """{name: run} -> {name: figures}: the runs interleaved, `reps` rounds after a compile call,
    the fastest call of each (the least disturbed on a shared machine)."""
    for run in runs.values():
        run()  # compile
    best = {name: (float("inf"), 0, None) for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            best[name] = min(best[name], run(), key=lambda r: r[0])
    out = {}
    for name, (s, steps, tokens) in best.items():
        out[name] = {"s": s, "steps": steps, "ms_per_step": 1e3 * s / steps,
                     "tok_s": tokens.shape[0] * max_new / s, "out": tokens}
    return out


def trace(run, trace_dir: str) -> dict:
    """Per-op time of one call of `run` (after a warm one): {op: ms}."""
    run()
    with jax.profiler.trace(trace_dir):
        _, steps, _ = run()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    per_op = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for ev in line.events:
                per_op[ev.name] += ev.duration_ns / 1e6
    return per_op, steps


def report(per_op, hlo: str, steps: int, top: int) -> str:
    names = op_scopes(hlo)
    ops = {k: v / steps for k, v in per_op.items() if k in names and not CONTROL.match(k)}
    scopes = collections.Counter()
    for k, v in ops.items():
        scopes[scope_of(names[k])] += v
    kinds = collections.Counter()
    for k, v in ops.items():
        kinds[re.sub(r"\.\d+$", "", k)] += v
    lines = [f"    op events {sum(ops.values()):.3f} ms per step ({steps} steps); by kind: "
             + ", ".join(f"{k} {v:.3f}" for k, v in kinds.most_common(12))]
    lines += [f"    {k:<24} {v:7.3f} ms" for k, v in sorted(scopes.items(), key=lambda x: -x[1])]
    lines += [f"    {v:7.4f} ms  {k}  {names[k][-100:]}"
              for k, v in sorted(ops.items(), key=lambda x: -x[1])[:top]]
    return "\n".join(lines)


def forwards(model, reps: int, length: int = 256, n: int = 50) -> dict:
    """ms of one forward of the model and of the MTP layer over S = 1..4 tokens at batch 1,
    n of them in one on-device loop (no dispatch), best of `reps` calls."""
    from dsv32_jax.model.mtp import init_mtp_cache, mtp_forward
    from dsv32_jax.model.transformer import Transformer, init_cache, variables

    cfg = model.config

    def looped(f):  # f -> (logits, cache); the logits summed so that none is dead code
        @jax.jit
        def run(p, c, t, q, h):
            def body(i, carry):
                logits, c = f(p, carry[1], t, q + i % 2, h)
                return carry[0] + logits.sum(), c
            return jax.lax.fori_loop(0, n, body, (jnp.float32(0), c))
        return run

    main = looped(lambda p, c, t, q, h: Transformer(cfg).apply(variables(p), t, q, c))
    mtp = looped(lambda p, c, t, q, h: mtp_forward(p, cfg, h, t, q, c)[::2])
    out = {"main": {}, "mtp": {}}
    for s in range(1, 5):
        t, q = jnp.zeros((1, s), jnp.int32), 100 + jnp.arange(s)[None]
        h = jnp.zeros((1, s, cfg.dim), cfg.dtype)
        for name, f, p, c in (("main", main, model.params, init_cache(cfg, 1, length)),
                              ("mtp", mtp, model.mtp, init_mtp_cache(cfg, 1, length))):
            jax.block_until_ready(f(p, c, t, q, h))
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(p, c, t, q, h))
                best = min(best, time.perf_counter() - t0)
            out[name][s] = round(1e3 * best / n, 3)
    return out


def main(argv=None) -> int:
    from dsv32_jax.engine import generate as gen
    from dsv32_jax.engine import speculative as spec
    from dsv32_jax.engine.runner import load_model
    from dsv32_jax.text.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(prog="python -m benchmarks.spec_loop")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", metavar="DIR")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--forwards", action="store_true",
                    help="also time the model's and the MTP layer's forward over 1..4 tokens")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    tok = Tokenizer.load(DEMO_DIR)
    model = load_model(DEMO_DIR, mtp=True)
    prompts = [tok.encode(c) for c in held_out(max(args.batch, default=1))]
    result = {"load_before": os.getloadavg()[0], "rows": []}
    if args.forwards:
        result["forwards_ms"] = forwards(model, args.reps)
        print("one forward, ms (in a loop): " + json.dumps(result["forwards_ms"]), flush=True)
    for b in args.batch:
        loops = Loops(model, prompts[:b], args.max_new_tokens)
        runs = {0: loops.plain, **{k: partial(loops.spec, k) for k in args.ks}}
        r = timed(runs, args.reps, args.max_new_tokens)
        plain = r.pop(0)
        row = {"batch": b, "plain_ms_step": round(plain["ms_per_step"], 3),
               "plain_tok_s": round(plain["tok_s"], 1), "spec": {}}
        for k, v in r.items():
            n = args.max_new_tokens
            assert (v["out"][:, :n] == plain["out"][:, :n]).all(), "greedy speculative != plain"
            row["spec"][k] = {"ms_iter": round(v["ms_per_step"], 3), "iters": v["steps"],
                              "tok_s": round(v["tok_s"], 1),
                              "ratio": round(v["tok_s"] / plain["tok_s"], 2)}
        result["rows"].append(row)
        print(f"batch {b}: plain {row['plain_ms_step']:.3f} ms/step {row['plain_tok_s']:.0f} tok/s;"
              + "".join(f" k={k} {v['ms_iter']:.3f} ms/iter ({v['iters']} iters) "
                        f"{v['tok_s']:.0f} tok/s {v['ratio']:.2f}x;" for k, v in row["spec"].items())
              + f" load {os.getloadavg()[0]:.2f}", flush=True)
        if args.profile:
            cache, mtp_cache = loops.cache, loops.mtp_cache
            common = (loops.logits,)
            hlo = gen.decode_loop.lower(
                model.params, cache, *common, loops.lengths, np.int32(1), jax.random.key(0),
                np.float32(0), np.float32(1), loops.stop, cfg=loops.cfg, impl="xla",
                n_out=loops.n_out).compile().as_text()
            per_op, steps = trace(loops.plain, os.path.join(args.profile, f"plain{b}"))
            print(f"  plain, batch {b}:\n" + report(per_op, hlo, steps, args.top), flush=True)
            for k in args.ks:
                hlo = spec.decode_loop.lower(
                    model.params, model.mtp, cache, mtp_cache, loops.logits, loops.h,
                    loops.lengths, np.int32(1), jax.random.key(0), np.float32(0), np.float32(1),
                    loops.stop, cfg=loops.cfg, impl="xla", k=k,
                    n_out=loops.n_out).compile().as_text()
                per_op, steps = trace(lambda: loops.spec(k), os.path.join(args.profile, f"k{k}b{b}"))
                print(f"  speculative k={k}, batch {b}:\n" + report(per_op, hlo, steps, args.top),
                      flush=True)
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
