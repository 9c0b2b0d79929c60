"""Sparse (top-k gathered) vs dense masked attention: prefill and one decode step vs context length.

    python -m benchmarks.decode [--lengths 512 1024 ...] [--topk 128] [--json]

Both paths run the same model (the `small` preset, 2 layers, random weights) in one process; the
ratio dense/sparse is printed per length, with the crossover (first length where sparse wins).
Times are medians of --repeats runs after a compile/warm-up run; absolute times are only meaningful
for the device printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.checkpoint.weights import init_params
from dsv32_jax.engine.generate import forward
from dsv32_jax.model.config import preset
from dsv32_jax.model.transformer import init_cache


def median_time(fn, repeats: int) -> float:
    """Median seconds of fn() (blocked on) over `repeats` runs, after one compile/warm-up run."""
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(lengths, topk: int, repeats: int, batch: int = 1, prefill: bool = True) -> dict:
    cfg = dataclasses.replace(preset("small"), n_layers=2, n_dense_layers=1, index_topk=topk,
                              max_seq_len=max(2 * max(lengths), 8192))
    params = init_params(cfg)
    rows = []
    for length in lengths:
        row = {"length": length}
        last = jnp.zeros(batch, jnp.int32)
        for impl in ("xla", "xla_dense"):
            if prefill:
                tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length)))
                pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
                row[f"prefill_{impl}_s"] = median_time(lambda: forward(
                    params, tokens, pos, init_cache(cfg, batch, length), last + length - 1,
                    cfg=cfg, impl=impl)[0], repeats)
            state = {"cache": init_cache(cfg, batch, length)}  # values do not change the work

            def step():  # one decode step at the last slot; the cache is donated and passed on
                logits, state["cache"], _ = forward(
                    params, jnp.zeros((batch, 1), jnp.int32), jnp.full((batch, 1), length - 1),
                    state["cache"], last, cfg=cfg, impl=impl)
                return logits

            row[f"decode_{impl}_s"] = median_time(step, repeats)
        if prefill:
            row["prefill_dense_over_sparse"] = row["prefill_xla_dense_s"] / row["prefill_xla_s"]
        row["decode_dense_over_sparse"] = row["decode_xla_dense_s"] / row["decode_xla_s"]
        rows.append(row)
    crossover = {k: next((r["length"] for r in rows if r.get(f"{k}_dense_over_sparse", 0) > 1), None)
                 for k in ("prefill", "decode")}
    return {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "config": {"preset": "small", "n_layers": 2, "index_topk": topk, "batch": batch},
            "rows": rows, "crossover": crossover}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--topk", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-prefill", action="store_true", help="decode steps only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    res = run(args.lengths, args.topk, args.repeats, args.batch, not args.no_prefill)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"device: {res['device']} ({res['platform']}); small preset, 2 layers, "
          f"index_topk={args.topk}, batch={args.batch}")
    head = f"{'length':>7} | {'decode sparse':>13} {'dense':>9} {'dense/sparse':>12}"
    if not args.no_prefill:
        head += f" | {'prefill sparse':>14} {'dense':>9} {'dense/sparse':>12}"
    print(head)
    for r in res["rows"]:
        line = (f"{r['length']:>7} | {r['decode_xla_s'] * 1e3:>10.2f} ms {r['decode_xla_dense_s'] * 1e3:>6.2f} ms"
                f" {r['decode_dense_over_sparse']:>11.2f}x")
        if not args.no_prefill:
            line += (f" | {r['prefill_xla_s'] * 1e3:>11.1f} ms {r['prefill_xla_dense_s'] * 1e3:>6.1f} ms"
                     f" {r['prefill_dense_over_sparse']:>11.2f}x")
        print(line)
    print(f"crossover (first length where sparse is faster): {res['crossover']}")


if __name__ == "__main__":
    main()
