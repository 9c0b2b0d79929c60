"""`dsv32 demo`: the tiny trained demo model (dsv32_jax/demo_model) in a short chat, or with --random the
architecture with random weights (a synthetic checkpoint, cached)."""

from __future__ import annotations

import argparse
import os
import time

from dsv32_jax.cli import common
from dsv32_jax.cli.chat import Conversation


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="the tiny trained demo model in a short chat (sparse attention "
                                    "selecting); --random: a random synthetic checkpoint (cached)")
    d.add_argument("--random", action="store_true",
                   help="the architecture with random weights (synthetic checkpoint) instead")
    d.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="with --random")
    d.add_argument("--prompt", default="Explain sparse attention in one sentence.")
    d.add_argument("--cache-dir", default=None, help="with --random; default: $DSV32_CACHE or "
                                                     "~/.cache/dsv32_jax")
    common.run_options(d, max_new=32)
    d.set_defaults(temperature=0.0)  # greedy: the trained model's most likely reply
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The trained demo model (shipped in dsv32_jax/demo_model) in a short chat; --random: the
    architecture with random weights (a synthetic checkpoint)."""
    return _random(args) if args.random else _trained(args)


DEMO_TURNS = ("Hello! My name is Alice.", None, "What color is the sky?", "What is my name?")  # None: --prompt


def _trained(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    import dsv32_jax
    from dsv32_jax.checkpoint.hf import is_hf_dir
    from dsv32_jax.text.tokenizer import Tokenizer
    from dsv32_jax.train.demo import DEMO_DIR

    if not is_hf_dir(DEMO_DIR):
        raise FileNotFoundError(f"{DEMO_DIR}: the trained demo model is not installed (train it with "
                                "`python -m dsv32_jax.train.demo OUT --install`); `dsv32 demo --random` "
                                "runs the random-weights demo")
    t = time.perf_counter()
    tok = Tokenizer.load(DEMO_DIR)
    model = dsv32_jax.load_model(DEMO_DIR, dtype=args.dtype, fp8_activations=not args.no_fp8,
                                 mtp=args.speculative > 0, weights=args.weights,
                                 matmul_impl=args.matmul)
    c = model.config
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(model.params))
    print(f"dsv32 demo: a tiny DeepSeek-V3.2 ({n_params / 1e6:.2f}M params: {c.n_layers} layers, "
          f"{c.n_routed_experts} routed experts, dim {c.dim}, vocab {c.vocab_size}) trained on this "
          "machine's CPU from scratch on the project's own chat corpus: dense attention first, then "
          "the indexer's dense warm-up, then sparse attention over the indexer's top-"
          f"{c.index_topk} keys (DSA). Loaded from {DEMO_DIR} in {time.perf_counter() - t:.1f}s; "
          f"numerics dtype={c.dtype} fp8_activations={c.fp8_activations}; device "
          f"{jax.devices()[0].device_kind}.")
    session = common.chat_session(model, args)
    convo = Conversation(tok, "chat", session.max_len)
    stats = None
    for text in DEMO_TURNS:
        text = args.prompt if text is None else text
        context, n, notes = convo.plan({"role": "user", "content": text}, args.max_new_tokens)
        for note in notes:
            print(note)
        print(f"User: {text}")
        print("Assistant: ", end="", flush=True)
        reply, stats = common.stream_reply(session, tok, session.prepare(context), n, args)
        convo.add_reply(reply)
        end = len(context) + len(reply)
        print(f"    [{end} tokens in context; each new token attended "
              f"{min(c.index_topk, end)} of them, picked by the indexer]")
    print(common.rates(stats))
    return 0


def _random(args: argparse.Namespace) -> int:
    import jax

    import dsv32_jax
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from dsv32_jax.engine.checks import check_budget
    from dsv32_jax.model.cache import bytes_per_token
    from dsv32_jax.model.config import preset
    from dsv32_jax.text.chat import encode_messages
    from dsv32_jax.text.tokenizer import Tokenizer

    cfg = preset(args.preset)
    ckpt = os.path.join(args.cache_dir or common.cache_dir(), f"synthetic-{args.preset}-seed{args.seed}")
    print("dsv32 demo: the DeepSeek-V3.2 architecture with RANDOM weights (a synthetic checkpoint "
          "in the released HF layout), so the generated text is meaningless.")
    if not os.path.isdir(ckpt):
        t = time.perf_counter()
        write_checkpoint(cfg, ckpt, seed=args.seed)
        print(f"wrote synthetic checkpoint ({args.preset}) to {ckpt} in {time.perf_counter() - t:.1f}s")
    else:
        print(f"using cached synthetic checkpoint {ckpt}")
    tok = Tokenizer.load(ckpt)
    prompt = encode_messages([{"role": "user", "content": args.prompt}], thinking_mode="chat")
    ids = common.prompt_ids(tok, args.prompt, False, False, cfg.max_seq_len)
    n = check_budget(len(ids), args.max_new_tokens, cfg.max_seq_len)
    t = time.perf_counter()
    model = dsv32_jax.load_model(ckpt, dtype=args.dtype, fp8_activations=not args.no_fp8,
                                 mtp=args.speculative > 0, weights=args.weights,
                                 matmul_impl=args.matmul)
    c = model.config
    print(f"loaded in {time.perf_counter() - t:.1f}s: {c.n_layers} layers ({c.n_dense_layers} dense, "
          f"{c.n_moe_layers} MoE, {c.n_routed_experts} experts), dim {c.dim}, vocab {c.vocab_size}; "
          f"numerics dtype={c.dtype} fp8_activations={c.fp8_activations}; "
          f"device {jax.devices()[0].device_kind}")
    print(f"prompt ({len(ids)} tokens, chat template): {prompt!r}")
    print(f"generating {n} tokens (each new shape is compiled first, timed apart):", flush=True)
    new, stats = common.stream_reply(common.chat_session(model, args), tok, ids, n, args)
    print(common.rates(stats))
    bpt = bytes_per_token(c)
    end = len(ids) + len(new)
    print(f"cache: {bpt['mla']} B/token/layer MLA + {bpt['indexer']} B indexer keys "
          f"({bpt['total'] * c.n_layers} B/token for {c.n_layers} layers)")
    print(f"indexer: the last decode step attended {min(c.index_topk, end)} of the {end} keys "
          f"available (index_topk={c.index_topk})")
    return 0
