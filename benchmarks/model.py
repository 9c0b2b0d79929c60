"""The model at the released widths on one GPU, with random FP8 weights made on the device.

1 dense + 4 MoE layers of the released config (about 50 GB of FP8 weights; no checkpoint is
read), timed with attention and `matmul_impl` each "xla" (the XLA path) or "pallas" (the Pallas
indexer / top-k / sparse MLA; the FP8 linear and grouped-expert kernels), all four pairs:
- prefill: tokens/s of a 4K and a 32K prompt (batch 1, 512-token chunks), and ms per layer per
  chunk;
- decode: the latency of one step (one new token per sequence, written at the end of the cache)
  at batch 1, 8, 64 and context 4K / 32K, per layer (step / layers: embedding and head
  included), next to its roofline: the bytes a step must read (`memory.decode_ideal_bytes`:
  dense weights, the routed experts the batch touches, the head, every indexer key, the top-k
  latent rows) at 3.35 TB/s; the cache is filled with random entries on the device.
Rows are run most-wanted first and those left after --budget-s are recorded as skipped; each
new shape compiles first (reported apart). The weights' values do not change the work: one random
(out, in) slab per tensor, repeated over experts and layers.

    python -m benchmarks.model --out DIR          # on a GPU (one device call, about 8 minutes)
    python -m benchmarks.model --quick            # the tiny preset on CPU: the code path only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import PEAK, _time, device_header, random_fp8
from benchmarks.memory import decode_ideal_bytes, released_cut
from dsv32_jax.checkpoint.weights import ParamSpec, abstract_params
from dsv32_jax.engine import generate as gen
from dsv32_jax.model.config import preset
from dsv32_jax.model.quant import FP8
from dsv32_jax.model.transformer import init_cache

RELEASED = {"prefill": (4096, 32768), "decode": [(1, 4096), (1, 32768), (8, 32768), (64, 32768),
                                                 (8, 4096), (64, 4096)]}
QUICK = {"prefill": (64,), "decode": [(1, 64), (2, 128)]}
# (attention impl, matmul_impl): the XLA path, the Pallas path end to end, and each switch alone
COMBOS = (("xla", "xla"), ("pallas", "pallas"), ("pallas", "xla"), ("xla", "pallas"))


def random_params(cfg, seed: int = 0) -> dict:
    """Params of cfg's layout made on the device: FP8 weights from random bytes (the top exponent
    bit cleared: |w| < 2, never NaN), block scales in^-0.5, bf16 matrices N(0, 0.02), vectors 1
    (norms) or 0 (the router bias). Each tensor's trailing (out, in) slab is drawn once and
    repeated over its leading (layer, expert) dims, so no temporary is larger than one slab."""
    is_spec = lambda x: isinstance(x, ParamSpec)  # noqa: E731
    flat, tree = jax.tree_util.tree_flatten_with_path(abstract_params(cfg), is_leaf=is_spec)

    def make(key, spec: ParamSpec, name: str):
        shape, dtype = spec.shape, jnp.dtype(spec.dtype)
        matrix = len([n for n in spec.names if n != "layers"]) >= 2  # else a vector per layer
        slab = shape[-2:] if matrix else shape[-1:]
        if dtype == jnp.dtype(FP8):
            return random_fp8(key, shape, len(slab))
        if name.endswith("scale"):  # (out/128, in/128) block scales
            x = jnp.full(slab, (shape[-1] * 128) ** -0.5, dtype)
        elif matrix:
            x = (0.02 * jax.random.normal(key, slab, jnp.float32)).astype(dtype)
        else:
            x = jnp.full(slab, 0.0 if "bias" in name else 1.0, dtype)
        return jnp.broadcast_to(x, shape)

    fn = jax.jit(make, static_argnums=(1, 2))
    leaves = [jax.block_until_ready(fn(jax.random.key(seed + i), spec, str(path[-1].key)))
              for i, (path, spec) in enumerate(flat)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def prefill_row(params, cfg, prompt: int, repeats: int, impl: str = "xla") -> dict:
    tokens = np.random.default_rng(prompt).integers(0, cfg.vocab_size, (1, prompt), dtype=np.int32)
    lengths = np.full(1, prompt, np.int32)
    chunk = min(gen.PREFILL_CHUNK, prompt)

    def run():
        cache = init_cache(cfg, 1, prompt)
        logits, cache, _ = gen.prefill(params, cfg, impl, tokens, lengths, cache, chunk=chunk)
        jax.block_until_ready((logits, cache))

    t0 = time.perf_counter()
    run()  # the first call: compile included
    first = time.perf_counter() - t0
    t = _time(run, (), repeats)
    chunks = prompt // chunk
    return {"tokens_per_s": prompt / t, "ms": t * 1e3, "chunk": chunk, "ms_per_layer_per_chunk":
            t * 1e3 / chunks / cfg.n_layers, "first_call_s": first}


def random_cache(cfg, batch: int, context: int, seed: int = 0) -> dict:
    """`init_cache`'s layout filled on the device with random entries (every slot valid, as if the
    context had been prefilled): FP8 bytes from random bits (top exponent bit cleared), bf16 bit
    patterns of N(0, 1) values, f32 scales in [0.5, 1)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, context))

    @partial(jax.jit, static_argnums=(1, 2))
    def fill(key, shape, dtype):
        if dtype == jnp.uint8:
            return jax.random.bits(key, shape, jnp.uint8) & jnp.uint8(0xBF)
        if dtype == jnp.uint16:
            return jax.lax.bitcast_convert_type(
                jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16), jnp.uint16)
        return jax.random.uniform(key, shape, dtype, 0.5, 1.0)

    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [fill(k, x.shape, jnp.dtype(x.dtype))
                                     for k, x in zip(keys, leaves)])


def step_row(params, cfg, batch: int, context: int, repeats: int, impl: str = "xla",
             queries: int = 1) -> tuple[dict, np.ndarray]:
    """One forward of `queries` new tokens per sequence at the end of a random `context`-slot
    cache (queries=1: a decode step; 512: a prefill chunk), attention `impl`. -> (the row: ms,
    per layer, first call (compile included), and for a decode step its roofline; the first
    call's logits (B, V) f32 on the host, for comparing implementations on the same inputs)."""
    state = {"cache": random_cache(cfg, batch, context)}
    tok = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, queries), np.int32)
    pos = np.broadcast_to(context - queries + np.arange(queries, dtype=np.int32), (batch, queries))
    last = np.full(batch, queries - 1, np.int32)

    def run():
        logits, state["cache"], _ = gen.forward(params, tok, pos, state["cache"], last, cfg=cfg,
                                                impl=impl)
        return jax.block_until_ready(logits)

    t0 = time.perf_counter()
    logits = np.asarray(run(), np.float32)  # the first call: compile included
    first = time.perf_counter() - t0
    t = _time(run, (), repeats)
    row = {"ms": t * 1e3, "ms_per_layer": t * 1e3 / cfg.n_layers, "first_call_s": first}
    if queries == 1:
        ideal = decode_ideal_bytes(cfg, context, batch)
        roof = ideal / PEAK["hbm"]
        row.update(ideal_gb=ideal / 1e9, roofline_ms=roof * 1e3, x_roofline=t / roof,
                   gbs=ideal / t / 1e9)
    else:
        row["tokens_per_s"] = batch * queries / t
    return row, logits


def decode_row(params, cfg, batch: int, context: int, repeats: int, impl: str = "xla") -> dict:
    return step_row(params, cfg, batch, context, repeats, impl)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset on CPU (code path only)")
    ap.add_argument("--out", default=None, help="write model.json and model.md here")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the rows left after this many seconds (default 420)")
    a = ap.parse_args(argv)
    deadline = time.perf_counter() + a.budget_s
    repeats = a.repeats or (2 if a.quick else 5)
    head = device_header()
    print(head, flush=True)
    base = dataclasses.replace(preset("tiny"), n_layers=3, n_dense_layers=1) if a.quick else \
        released_cut(layers=5, dense=1)
    t0 = time.perf_counter()
    params = random_params(base)
    made = time.perf_counter() - t0
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    print(f"params: {nbytes / 1e9:.2f} GB made in {made:.1f}s", flush=True)
    shapes = QUICK if a.quick else RELEASED
    jobs = [("decode", b, t) for b, t in shapes["decode"][:2]]
    jobs += [("prefill", p, None) for p in shapes["prefill"]]
    jobs += [("decode", b, t) for b, t in shapes["decode"][2:]]
    rows = []
    for kind, n, context in jobs:
        for attn, impl in COMBOS:
            cfg = dataclasses.replace(base, matmul_impl=impl)
            row = {"kind": kind, "attention": attn, "impl": impl}
            row.update({"prompt": n} if kind == "prefill" else {"batch": n, "context": context})
            if time.perf_counter() > deadline:
                row["error"] = "skipped: --budget-s spent"
            else:
                try:
                    row.update(prefill_row(params, cfg, n, repeats, attn) if kind == "prefill"
                               else decode_row(params, cfg, n, context, repeats, attn))
                except Exception as e:  # noqa: BLE001  (an OOM or a compile failure: recorded)
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    what = "the tiny preset" if a.quick else "the released widths"
    md = [f"# The model at {what}, {base.n_layers} layers "
          f"({base.n_dense_layers} dense), random FP8 weights ({nbytes / 1e9:.1f} GB) -- {head}", "",
          "| step | attention / matmul_impl | shape | ms | per layer | tokens/s or x roofline |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"prompt {r['prompt']}" if r["kind"] == "prefill" else \
            f"batch {r['batch']}, context {r['context']}"
        head_ = f"| {r['kind']} | {r['attention']} / {r['impl']} | {shape} |"
        if "error" in r:
            md.append(f"{head_} {r['error'][:100]} | | |")
        elif r["kind"] == "prefill":
            md.append(f"{head_} {r['ms']:.1f} | {r['ms_per_layer_per_chunk']:.2f} ms / "
                      f"{r['chunk']}-token chunk | {r['tokens_per_s']:.0f} tok/s |")
        else:
            md.append(f"{head_} {r['ms']:.3f} | {r['ms_per_layer']:.3f} | {r['x_roofline']:.2f}x "
                      f"of {r['roofline_ms']:.3f} ms ({r['ideal_gb']:.2f} GB) |")
    print("\n".join(md))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.json").write_text(json.dumps({"device": head, "rows": rows}, indent=1))
        (out / "model.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
