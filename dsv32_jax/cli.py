"""`dsv32` command line: demo (the embedded default of `make demo`), generate, chat, convert."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _cache_dir() -> str:
    return os.environ.get("DSV32_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv32_jax")


def _load(path: str, args: argparse.Namespace):
    import dsv32_jax
    from dsv32_jax.text.tokenizer import Tokenizer

    t = time.perf_counter()
    print(f"loading {path} ...", file=sys.stderr, flush=True)
    model = dsv32_jax.load_model(path, dtype=args.dtype, fp8_activations=not args.no_fp8,
                                 progress=True)
    tok = Tokenizer.load(path)
    print(f"loaded in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    return model, tok


def _stream_reply(model, tok, prompt_ids: list[int], args, out=sys.stdout) -> tuple[list[int], dict]:
    """Generate for one prompt, printing text as it comes. Returns (new ids, timing stats)."""
    stats: dict = {}
    dec = tok.stream(skip_special_tokens=not args.show_special)
    new: list[int] = []
    for step in model.generate_stream([prompt_ids], args.max_new_tokens, args.temperature,
                                      args.top_p, args.seed, [tok.eos_id], stats):
        if step[0] is None:
            break
        new.append(step[0])
        print(dec.push(step[0]), end="", file=out, flush=True)
    print(dec.flush(), file=out, flush=True)
    return new, stats


def _rates(stats: dict) -> str:
    pre = stats["prefill_tokens"] / stats["prefill_s"]
    dec = stats["decode_steps"] / stats["decode_s"] if stats["decode_steps"] else float("nan")
    return (f"prefill {stats['prefill_tokens']} tokens in {stats['prefill_s']:.2f}s ({pre:.1f} tok/s), "
            f"decode {stats['decode_steps']} tokens in {stats['decode_s']:.2f}s ({dec:.1f} tok/s)")


def _prompt_ids(tok, text: str, raw: bool, thinking: bool) -> list[int]:
    from dsv32_jax.text.chat import encode_messages

    if raw:
        return tok.encode(text)
    mode = "thinking" if thinking else "chat"
    return tok.encode(encode_messages([{"role": "user", "content": text}], thinking_mode=mode))


def generate(args: argparse.Namespace) -> int:
    model, tok = _load(args.ckpt, args)
    ids = _prompt_ids(tok, args.prompt, args.raw, args.thinking)
    _, stats = _stream_reply(model, tok, ids, args)
    print(_rates(stats), file=sys.stderr)
    return 0


def chat(args: argparse.Namespace) -> int:
    from dsv32_jax.text.chat import EOS, ChatFormatError, encode_messages, parse_message_from_completion_text

    model, tok = _load(args.ckpt, args)
    mode = "thinking" if args.thinking else "chat"
    history: list[dict] = []
    print(f"chat ({mode} mode). /clear resets the conversation, /exit quits.", file=sys.stderr)
    for line in sys.stdin:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/clear":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = tok.encode(encode_messages(history, thinking_mode=mode))
        new, stats = _stream_reply(model, tok, ids, args)
        completion = tok.decode(new)
        try:
            history.append(parse_message_from_completion_text(completion, mode))
        except ChatFormatError as e:  # e.g. cut off by --max-new-tokens: keep the raw text
            print(f"(reply kept as plain text: {e})", file=sys.stderr)
            history.append({"role": "assistant", "content": completion.removesuffix(EOS)})
        print(_rates(stats), file=sys.stderr)
    return 0


def demo(args: argparse.Namespace) -> int:
    import jax

    import dsv32_jax
    from dsv32_jax.model.cache import bytes_per_token
    from dsv32_jax.text.chat import encode_messages
    from dsv32_jax.model.config import preset
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from dsv32_jax.text.tokenizer import Tokenizer

    cfg = preset(args.preset)
    ckpt = os.path.join(args.cache_dir or _cache_dir(), f"synthetic-{args.preset}-seed{args.seed}")
    print("dsv32 demo: the DeepSeek-V3.2 architecture with RANDOM weights (a synthetic checkpoint "
          "in the released HF layout), so the generated text is meaningless.")
    if not os.path.isdir(ckpt):
        t = time.perf_counter()
        write_checkpoint(cfg, ckpt, seed=args.seed)
        print(f"wrote synthetic checkpoint ({args.preset}) to {ckpt} in {time.perf_counter() - t:.1f}s")
    else:
        print(f"using cached synthetic checkpoint {ckpt}")
    t = time.perf_counter()
    model = dsv32_jax.load_model(ckpt, dtype=args.dtype, fp8_activations=not args.no_fp8)
    tok = Tokenizer.load(ckpt)
    c = model.config
    print(f"loaded in {time.perf_counter() - t:.1f}s: {c.n_layers} layers ({c.n_dense_layers} dense, "
          f"{c.n_moe_layers} MoE, {c.n_routed_experts} experts), dim {c.dim}, vocab {c.vocab_size}; "
          f"numerics dtype={c.dtype} fp8_activations={c.fp8_activations}; "
          f"device {jax.devices()[0].device_kind}")
    messages = [{"role": "user", "content": args.prompt}]
    prompt = encode_messages(messages, thinking_mode="chat")
    ids = tok.encode(prompt)
    print(f"prompt ({len(ids)} tokens, chat template): {prompt!r}")
    t = time.perf_counter()
    for i, _ in enumerate(model.generate_stream([ids], args.max_new_tokens, args.temperature,
                                                args.top_p, args.seed, [tok.eos_id])):
        if i == 1:  # the prefill and decode-step programs of this bucket are compiled now
            break
    print(f"compiled in {time.perf_counter() - t:.1f}s; generating {args.max_new_tokens} tokens:")
    new, stats = _stream_reply(model, tok, ids, args)
    print(_rates(stats))
    bpt = bytes_per_token(c)
    end = len(ids) + len(new)
    print(f"cache: {bpt['mla']} B/token/layer MLA + {bpt['indexer']} B indexer keys "
          f"({bpt['total'] * c.n_layers} B/token for {c.n_layers} layers)")
    print(f"indexer: the last decode step attended {min(c.index_topk, end)} of the {end} keys "
          f"available (index_topk={c.index_topk})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:  # `dsv32 convert ...` is `python -m convert ...`
        from convert.cli import main as convert_main

        return convert_main(argv[1:])
    parser = argparse.ArgumentParser(prog="dsv32", description="DeepSeek-V3.2 in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, max_new=64):
        p.add_argument("--max-new-tokens", type=int, default=max_new)
        p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=0.95)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
        p.add_argument("--no-fp8", action="store_true", help="do not simulate FP8 activations")
        p.add_argument("--show-special", action="store_true",
                       help="print special/reserved tokens in the output stream")

    d = sub.add_parser("demo", help="random synthetic checkpoint (cached): load, chat-template a "
                                    "prompt, generate with streaming, report speeds")
    d.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    d.add_argument("--prompt", default="Explain sparse attention in one sentence.")
    d.add_argument("--cache-dir", default=None, help="default: $DSV32_CACHE or ~/.cache/dsv32_jax")
    common(d, max_new=32)
    d.set_defaults(func=demo)
    g = sub.add_parser("generate", help="complete one prompt")
    g.add_argument("--ckpt", required=True, help="checkpoint directory (HF layout)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="no chat template: continue the raw text")
    g.add_argument("--thinking", action="store_true", help="thinking mode chat template")
    common(g)
    g.set_defaults(func=generate)
    c = sub.add_parser("chat", help="interactive chat on stdin (/clear, /exit)")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--thinking", action="store_true")
    common(c, max_new=256)
    c.set_defaults(func=chat)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
