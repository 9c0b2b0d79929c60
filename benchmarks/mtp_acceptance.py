"""How often the demo model's MTP layer drafts the token the model itself would say next-next:
the first draft's acceptance rate of speculative decoding, on held-out demo chats.

    python -m benchmarks.mtp_acceptance [--model DIR] [--n 200] [--json]

Held-out prompts: chat conversations of the demo corpus's generator (`train.corpus`) drawn with
another seed, less every one that is also in the training corpus; each prompt is a conversation
up to its last assistant turn's start (earlier turns in context, as `dsv32 demo` chats). The model
continues each greedily; on prompt + continuation, at every position i from the prompt's last token
on, with t_{i+1} the model's greedy token:

  T=0   the MTP argmax at i == the model's argmax at i+1 (its greedy t_{i+2}): a greedy first
        draft is accepted exactly when they agree
  T=1   sum_x min(p(x), q(x)), p the model's distribution of t_{i+2}, q the MTP layer's: the
        probability that the speculative-sampling rule accepts a first draft drawn from q

Numerics as `dsv32 demo` runs: bf16 compute, simulated FP8 activations (--dtype, --no-fp8).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.text.chat import ASSISTANT, THINK_END
from dsv32_jax.train.demo import DEMO_DIR

HELD_OUT_SEED = 7  # the training corpus is conversations(6000, seed=0)
TURN = ASSISTANT + THINK_END  # the chat template's start of an assistant reply (chat mode)


def held_out(n: int) -> list[str]:
    """n conversations none of which is in the training corpus, cut after the last TURN."""
    from dsv32_jax.train import corpus

    seen = set(corpus.conversations())
    out, k = [], 2 * n
    while len(out) < n:
        out = [c for c in corpus.conversations(k, HELD_OUT_SEED) if c not in seen][:n]
        k *= 2
    return [c[:c.rindex(TURN) + len(TURN)] for c in out]


@jax.jit
def _figures(logits, mtp_logits, mask):
    """logits (B,S,V) of the model, mtp_logits (B,S-1,V) at positions 0..S-2 -> per position
    (T=0 agreement, T=1 acceptance) (B,S-1), where mask (B,S-1)."""
    p = jax.nn.softmax(logits[:, 1:], -1)  # t_{i+2} given t_{..i+1}
    q = jax.nn.softmax(mtp_logits, -1)
    agree = jnp.argmax(mtp_logits, -1) == jnp.argmax(logits[:, 1:], -1)
    return jnp.where(mask, agree, 0), jnp.where(mask, jnp.minimum(p, q).sum(-1), 0.0)


def measure(model, mtp: dict, prompts: list[list[int]], max_new: int, stop: int,
            batch: int = 16) -> dict:
    """-> {"drafted": {"t0", "t1": means over the drafted positions, "positions": their count},
    "prompt": the same teacher-forced over the prompts' own text (t_{i+1} the text's token), for
    contrast: the user's turns, which the model cannot predict as well as its own replies}."""
    from dsv32_jax.engine.generate import bucket
    from dsv32_jax.model.mtp import init_mtp_cache, mtp_forward
    from dsv32_jax.model.transformer import Transformer, variables

    cfg = model.config
    forward = jax.jit(lambda p, t: Transformer(cfg).apply(variables(p), t, hidden=True))
    sums = np.zeros((2, 3))  # drafted | prompt positions: T=0 agreements, T=1 acceptances, count
    for s in range(0, len(prompts), batch):
        part = prompts[s:s + batch]
        outs = model.generate(part, max_new, temperature=0.0, stop_tokens=[stop])
        seqs = [p + o for p, o in zip(part, outs)]
        n = bucket(max(map(len, seqs)))
        tokens = np.array([q + [0] * (n - len(q)) for q in seqs], np.int32)  # pads after: unseen
        logits, _, h = forward(model.params, tokens)
        pos = jnp.broadcast_to(jnp.arange(n - 1), (len(seqs), n - 1))
        mtp_logits, _, _ = mtp_forward(mtp, cfg, h[:, :-1], tokens[:, 1:], pos,
                                       init_mtp_cache(cfg, len(seqs), n - 1))
        i = np.arange(n - 1)[None]  # drafted at i = len(prompt)-1 .. len(seq)-2
        start = np.array([len(p) - 1 for p in part])[:, None]
        drafted = (i >= start) & (i <= np.array([len(q) - 2 for q in seqs])[:, None])
        for k, mask in enumerate((drafted, i < start)):
            a, b = _figures(logits, mtp_logits, mask)
            sums[k] += (float(a.sum()), float(b.sum()), int(mask.sum()))
    return {name: {"t0": a / c, "t1": b / c, "positions": int(c)}
            for name, (a, b, c) in zip(("drafted", "prompt"), sums)}


def main(argv=None) -> int:
    from dsv32_jax.engine.runner import load_model, load_mtp
    from dsv32_jax.text.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(prog="python -m benchmarks.mtp_acceptance")
    ap.add_argument("--model", default=DEMO_DIR)
    ap.add_argument("--n", type=int, default=200, help="held-out conversations")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    tok = Tokenizer.load(args.model)
    model = load_model(args.model, dtype=args.dtype, fp8_activations=not args.no_fp8)
    mtp = load_mtp(args.model, model.config)
    prompts = [tok.encode(c) for c in held_out(args.n)]
    r = measure(model, mtp, prompts, args.max_new_tokens, tok.eos_id)
    r.update(conversations=args.n, dtype=model.config.dtype,
             fp8_activations=model.config.fp8_activations)
    if args.json:
        print(json.dumps(r))
    else:
        d, q = r["drafted"], r["prompt"]
        print(f"MTP first-draft acceptance on {args.n} held-out demo chats ({d['positions']} drafted "
              f"positions, {r['dtype']}, fp8_activations={r['fp8_activations']}): "
              f"T=0 {d['t0']:.3f} (argmax agreement), T=1 {d['t1']:.3f} (E sum min(p, q))")
        print(f"  for contrast, teacher-forced on the prompts' own text ({q['positions']} "
              f"positions): T=0 {q['t0']:.3f}, T=1 {q['t1']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
