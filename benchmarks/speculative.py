"""Speculative decoding with the MTP layer on the trained demo model: acceptance per draft position
and decode tokens/s with and without, measured side by side in one run.

    python -m benchmarks.speculative [--n 16] [--max-new-tokens 64] [--reps 3] [--json]
                                     [--served-only]

Prompts: held-out demo chats (`benchmarks.mtp_acceptance.held_out`), each continued for
max_new_tokens greedy tokens with no stop token: the model finishes its reply and writes further
turns of the corpus's kind (its replies alone are ~10 tokens, too short to time a decode). The same
prompts and tokens for every k (greedy speculative output is the plain output, token for token).

  acceptance   k = 1, 2, 3 at T = 0 and T = 1 (top-p 1): per draft position j, the fraction of
               iterations whose drafts 1..j were all accepted; tokens per forward of the model
               (1 + the mean accepted drafts)
  speed        decode tokens/s (`Model.generate`'s decode_s: the engine's decode steps)
               at batch 1 and 8, k = 0 (plain) .. 3, T = 0; repetitions interleaved, median; the
               ratio to k = 0 of the same batch
  costs        one forward of the model over 1..4 tokens and one of the MTP layer, each jitted
               alone (the decode cache at 256 slots; each call's dispatch included), and the
               speedup they predict: tokens per forward x t(1) / (t_main(k+1) + t_mtp(k+1) +
               (k-1) t_mtp(1)); against the measured ratio it says how much of an iteration's
               time lies outside the two models' forwards
  served       the serving engine (`engine.core.Engine`, in this process: no HTTP) with k = 0..3, every
               chat submitted at once, max_batch 1 and 8: output tokens/s from the first submit to
               the last token (prefills included), after an untimed run of the same load (its
               compiles); the ratio to k = 0; drafts accepted / drafted (`--served-only`: this
               part alone)

Numerics as `dsv32 demo` runs: bf16 compute, simulated FP8 activations.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.mtp_acceptance import held_out
from dsv32_jax.train.demo import DEMO_DIR

KS = (1, 2, 3)


def acceptance(model, prompts, max_new: int, temperature: float, k: int, batch: int = 8) -> dict:
    accepted, iters = np.zeros(k), 0
    for i in range(0, len(prompts), batch):
        st = {}
        model.generate(prompts[i:i + batch], max_new, temperature=temperature, top_p=1.0, seed=i,
                       stop_tokens=[], speculative=k, stats=st)
        accepted += st["accepted"]
        iters += st["iterations"]
    return {"per_position": (accepted / iters).round(3).tolist(),
            "tokens_per_forward": round(1 + accepted.sum() / iters, 3), "iterations": iters}


def decode_rate(model, prompts, max_new: int, k: int, batch: int) -> float:
    """Decode tokens/s over the prompts in batches (greedy, no stops: batch x max_new tokens)."""
    tokens, seconds = 0, 0.0
    for i in range(0, len(prompts), batch):
        st = {}
        out = model.generate(prompts[i:i + batch], max_new, temperature=0.0, stop_tokens=[],
                             speculative=k, stats=st)
        tokens += sum(map(len, out))
        seconds += st["decode_s"]
    return tokens / seconds


def served(model, prompts, max_new: int, k: int, max_batch: int) -> dict:
    """The chats through a serving engine with k drafts (0: off) -> output tok/s, drafts accepted."""
    import threading

    from dsv32_jax.engine.core import Engine
    from dsv32_jax.engine.scheduler import Sampling

    eng = Engine(model, max_batch=max_batch, chunk=128, prefix_cache=False, speculative=k)
    eng.start()

    def run() -> float:
        left, done = [len(prompts)], threading.Event()

        def emit(new, finish):
            if finish is not None:
                left[0] -= 1
                if not left[0]:
                    done.set()

        t = time.perf_counter()
        for p in prompts:
            eng.submit(p, Sampling(max_tokens=max_new, temperature=0.0), emit)
        done.wait()
        return time.perf_counter() - t

    try:
        run()  # compiles
        before = eng.metrics()
        wall = run()
        m = eng.metrics()
    finally:
        eng.stop(drain=False)
    drafted = m["draft_tokens"] - before["draft_tokens"]
    return {"tok_s": round(len(prompts) * max_new / wall, 1),
            "accepted": round((m["accepted_draft_tokens"] - before["accepted_draft_tokens"])
                              / drafted, 3) if drafted else None}


def _ms(f, *args, n: int = 30) -> float:
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            r = f(*args)
        jax.block_until_ready(r)
        best = min(best, (time.perf_counter() - t) / n * 1e3)
    return best


def costs(model, length: int = 256) -> dict:
    """ms of one forward of the model over S tokens and of the MTP layer over S, S = 1..4."""
    from dsv32_jax.model.mtp import init_mtp_cache, mtp_forward
    from dsv32_jax.model.transformer import Transformer, init_cache, variables

    cfg = model.config
    main = jax.jit(lambda p, t, q, c: Transformer(cfg).apply(variables(p), t, q, c, hidden=True)[0])
    mtp = jax.jit(lambda p, h, t, q, c: mtp_forward(p, cfg, h, t, q, c)[0])
    cache, mtp_cache = init_cache(cfg, 1, length), init_mtp_cache(cfg, 1, length)
    out = {"main": {}, "mtp": {}}
    for s in range(1, max(KS) + 2):
        tokens, pos = jnp.zeros((1, s), jnp.int32), 100 + jnp.arange(s)[None]
        h = jnp.zeros((1, s, cfg.dim), cfg.dtype)
        out["main"][s] = round(_ms(main, model.params, tokens, pos, cache), 3)
        out["mtp"][s] = round(_ms(mtp, model.mtp, h, tokens, pos, mtp_cache), 3)
    return out


def bound(c: dict, k: int, tokens_per_forward: float) -> float:
    """The speedup the standalone costs predict at this acceptance, nothing else counted."""
    per_iteration = c["main"][k + 1] + c["mtp"][k + 1] + (k - 1) * c["mtp"][1]
    return tokens_per_forward * c["main"][1] / per_iteration


def main(argv=None) -> int:
    from dsv32_jax.engine.runner import load_model
    from dsv32_jax.text.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(prog="python -m benchmarks.speculative")
    ap.add_argument("--model", default=DEMO_DIR)
    ap.add_argument("--n", type=int, default=16, help="held-out conversations")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--served-only", action="store_true", help="only the serving engine's part")
    args = ap.parse_args(argv)
    tok = Tokenizer.load(args.model)
    model = load_model(args.model, mtp=True)
    prompts = [tok.encode(c) for c in held_out(args.n)]
    r = {"device": jax.devices()[0].device_kind, "prompts": args.n,
         "max_new_tokens": args.max_new_tokens, "acceptance": {}, "speed": {}, "served": {}}
    for batch in (1, 8):
        got = {k: served(model, prompts, args.max_new_tokens, k, batch) for k in (0, *KS)}
        r["served"][f"max_batch {batch}"] = {
            f"k={k}": {**v, "ratio": round(v["tok_s"] / got[0]["tok_s"], 2)} for k, v in got.items()}
    if args.served_only:
        print(json.dumps(r["served"]))
        return 0
    for t in (0.0, 1.0):
        for k in KS:
            r["acceptance"][f"T={t:g} k={k}"] = acceptance(model, prompts, args.max_new_tokens, t, k)
    for batch in (1, 8):
        part = prompts[:max(batch, len(prompts) // 2)] if batch == 1 else prompts
        runs = {k: [] for k in (0, *KS)}
        for rep in range(args.reps + 1):  # the first: compile
            for k in runs:
                rate = decode_rate(model, part, args.max_new_tokens, k, batch)
                if rep:
                    runs[k].append(rate)
        base = float(np.median(runs[0]))
        r["speed"][f"batch {batch}"] = {
            f"k={k}": {"tok_s": round(float(np.median(v)), 1),
                       "ratio": round(float(np.median(v)) / base, 2)} for k, v in runs.items()}
    r["costs_ms"] = costs(model)
    r["bound"] = {f"k={k}": round(bound(r["costs_ms"], k, r["acceptance"][f"T=0 k={k}"]
                                        ["tokens_per_forward"]), 2) for k in KS}
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"speculative decoding, demo model, {args.n} held-out chats x {args.max_new_tokens} "
          f"tokens, {r['device']}")
    for name, a in r["acceptance"].items():
        print(f"  {name}: acceptance per draft position "
              f"{' / '.join(f'{x:.3f}' for x in a['per_position'])}, "
              f"{a['tokens_per_forward']:.2f} tokens per forward ({a['iterations']} iterations)")
    for name, s in r["speed"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v['tok_s']:.0f} tok/s ({v['ratio']:.2f}x)"
                                        for k, v in s.items()))
    for name, s in r["served"].items():
        print(f"  served, {name}: " + ", ".join(
            f"{k} {v['tok_s']:.0f} tok/s ({v['ratio']:.2f}x"
            + (f", {v['accepted']:.2f} of drafts accepted)" if v["accepted"] is not None else ")")
            for k, v in s.items()))
    c = r["costs_ms"]
    print("  one forward, ms: model " + " / ".join(f"S={s} {v}" for s, v in c["main"].items())
          + "; MTP layer " + " / ".join(f"S={s} {v}" for s, v in c["mtp"].items()))
    print("  speedup those standalone costs predict at the T=0 acceptance: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in r["bound"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
