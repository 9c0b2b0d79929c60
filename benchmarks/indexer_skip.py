"""Short contexts skip the indexer: prefill and decode-step time with the skip vs without.

    python -m benchmarks.indexer_skip [--contexts 512 2048] [--repeats 5]

The `tiny` preset cut to its one dense layer, at the released index_topk = 2048, random weights,
batch 1, in one process: for each context T, a prefill of T tokens into a T-slot cache and a
decode step at slot T-1 (static skip: T <= index_topk), and the same T tokens in a 2T-slot cache
(dynamic skip: a lax.cond on the positions, all below index_topk). "without" traces the same
forward with `attention.SKIP_SHORT = False` (the indexer's scores and top-k over every key).
Medians after a compile/warm-up run; CPU timings: ratios, not absolute speeds.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import median_time
from dsv32_jax.checkpoint.weights import init_params
from dsv32_jax.engine.generate import _apply
from dsv32_jax.model import attention
from dsv32_jax.model.config import preset
from dsv32_jax.model.transformer import init_cache


def _times(cfg, params, context: int, slots: int, skip: bool, repeats: int) -> tuple[float, float]:
    """(prefill s, decode-step s) of `context` tokens in a `slots`-slot cache."""
    attention.SKIP_SHORT = skip  # read when tracing: a fresh jit per setting
    fwd = jax.jit(lambda p, t, pos, c: _apply(p, t, pos, c, None, cfg, "xla", False)[:2],
                  donate_argnums=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, context)))
    pos = jnp.arange(context, dtype=jnp.int32)[None]
    prefill = median_time(lambda: fwd(params, tokens, pos, init_cache(cfg, 1, slots))[0], repeats)
    state = {"cache": init_cache(cfg, 1, slots)}  # values do not change the work

    def step():
        logits, state["cache"] = fwd(params, tokens[:, -1:], pos[:, -1:], state["cache"])
        return logits

    decode = median_time(step, 4 * repeats)
    attention.SKIP_SHORT = True
    return prefill, decode


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(preset("tiny"), n_layers=1, index_topk=2048, max_seq_len=8192)
    params = init_params(cfg)
    print(f"device: {jax.devices()[0].device_kind}; tiny preset, {cfg.n_layers} dense layer, "
          f"index_topk={cfg.index_topk}, batch 1; medians")
    print(f"{'context':>7} {'cache':>6} {'skip':>8} | {'prefill with':>12} {'without':>9} "
          f"{'ratio':>6} | {'decode with':>11} {'without':>9} {'ratio':>6}")
    for context in args.contexts:
        for slots, kind in ((context, "static"), (2 * context, "dynamic")):
            (p1, d1), (p0, d0) = (_times(cfg, params, context, slots, s, args.repeats)
                                  for s in (True, False))
            print(f"{context:>7} {slots:>6} {kind:>8} | {p1 * 1e3:>9.1f} ms {p0 * 1e3:>6.1f} ms "
                  f"{p0 / p1:>5.2f}x | {d1 * 1e3:>8.2f} ms {d0 * 1e3:>6.2f} ms {d0 / d1:>5.2f}x")


if __name__ == "__main__":
    main()
