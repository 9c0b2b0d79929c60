"""Decode-step time of this tree against another git revision, side by side in one run.

    python -m benchmarks.ab_decode --before REV [--contexts 1024 4096] [--rounds 3]

Checks REV out into a temporary git worktree, then alternates the same measurement in both trees
(separate processes, so each imports its own dsv32_jax) for --rounds rounds and prints the
median per-step times and their ratio. The measurement uses only the public API of every version
(`dsv32_jax.Model(config, params).generate_stream`): the `small` preset with random weights, batch 1, a
prompt filling the context, greedy; the step time is measured per decoded token
(`generate_stream`, which exists in every version, one jitted step per token): the median time
between tokens over 32 steps after a warm-up. CPU timings: ratios, not absolute speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

MEASURE = r"""
import json, statistics, sys, time
import numpy as np
import dsv32_jax
try:
    from dsv32_jax.checkpoint.weights import init_params
except ImportError:  # before the package re-cut
    from dsv32_jax.weights import init_params
context = int(sys.argv[1])
cfg = dsv32_jax.preset("small")
model = dsv32_jax.Model(cfg, init_params(cfg))
prompt = list(np.random.default_rng(0).integers(2, cfg.vocab_size, context - 40))
def steps(n):
    times, t = [], time.perf_counter()
    for _ in model.generate_stream([prompt], n, temperature=0, stop_tokens=[]):
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times[1:]  # the first interval includes the prefill
steps(4)  # compile and warm up
print(json.dumps({"step_s": statistics.median(steps(33))}))
"""


def _measure(tree: str, context: int) -> float:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(context)], cwd=tree, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["step_s"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare against")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "before")
        subprocess.run(["git", "-C", here, "worktree", "add", "--detach", old, args.before],
                       check=True, capture_output=True)
        try:
            print(f"decode step, small preset, batch 1: this tree vs {args.before}")
            for context in args.contexts:
                times = {"before": [], "after": []}
                for _ in range(args.rounds):  # alternate, so drift hits both alike
                    times["before"].append(_measure(old, context))
                    times["after"].append(_measure(here, context))
                b, a = (statistics.median(times[k]) for k in ("before", "after"))
                print(f"context {context:>6}: before {b * 1e3:8.2f} ms  after {a * 1e3:8.2f} ms  "
                      f"before/after {b / a:5.2f}x")
        finally:
            subprocess.run(["git", "-C", here, "worktree", "remove", "--force", old],
                           capture_output=True)


if __name__ == "__main__":
    main()
