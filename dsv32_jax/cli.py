"""`dsv32` command line. `dsv32 demo` is the embedded default job of `make demo`."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _cache_dir() -> str:
    root = os.environ.get("DSV32_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv32_jax")
    return root


def demo(args: argparse.Namespace) -> int:
    import jax

    import dsv32_jax
    from dsv32_jax.config import preset
    from dsv32_jax.synthetic import write_checkpoint

    cfg = preset(args.preset)
    ckpt = os.path.join(args.cache_dir or _cache_dir(), f"synthetic-{args.preset}-seed{args.seed}")
    print("dsv32 demo: DeepSeek-V3.2 architecture with RANDOM weights (a synthetic checkpoint in the "
          "released HF layout) - the outputs are not meaningful text.")
    if not os.path.isdir(ckpt):
        t = time.perf_counter()
        write_checkpoint(cfg, ckpt, seed=args.seed)
        print(f"wrote synthetic checkpoint ({args.preset}) to {ckpt} in {time.perf_counter() - t:.1f}s")
    else:
        print(f"using cached synthetic checkpoint {ckpt}")
    t = time.perf_counter()
    model = dsv32_jax.load_model(ckpt, dtype=args.dtype, fp8_activations=not args.no_fp8)
    c = model.config
    print(f"loaded in {time.perf_counter() - t:.1f}s: {c.n_layers} layers ({c.n_dense_layers} dense, "
          f"{c.n_moe_layers} MoE with {c.n_routed_experts} experts), dim {c.dim}, vocab {c.vocab_size}, "
          f"index_topk {c.index_topk}; numerics dtype={c.dtype} fp8_activations={c.fp8_activations}; "
          f"device {jax.devices()[0].device_kind}")
    tokens = np.random.default_rng(args.seed).integers(2, c.vocab_size, (args.batch, args.seq_len))
    t = time.perf_counter()
    logits = np.asarray(model.logits(tokens))
    first = time.perf_counter() - t
    t = time.perf_counter()
    logits = np.asarray(model.logits(tokens))
    steady = time.perf_counter() - t
    n_tok = tokens.size
    print(f"forward over {args.batch}x{args.seq_len} tokens: {first:.2f}s incl. compile, "
          f"{steady * 1e3:.1f} ms compiled ({n_tok / steady:.0f} tokens/s)")
    last = logits[:, -1].astype(np.float64)
    probs = np.exp(last - last.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for b in range(args.batch):
        top = np.argsort(-probs[b])[:5]
        cands = ", ".join(f"{int(i)} ({probs[b, i]:.3f})" for i in top)
        print(f"  sequence {b}: top next-token candidates: {cands}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:  # `dsv32 convert ...` is `python -m convert ...`
        from convert.cli import main as convert_main

        return convert_main(argv[1:])
    parser = argparse.ArgumentParser(prog="dsv32", description="DeepSeek-V3.2 in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="write a random synthetic checkpoint (cached), load it, run a forward")
    d.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--seq-len", type=int, default=64)
    d.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    d.add_argument("--no-fp8", action="store_true", help="do not simulate FP8 activations")
    d.add_argument("--cache-dir", default=None, help="default: $DSV32_CACHE or ~/.cache/dsv32_jax")
    d.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
