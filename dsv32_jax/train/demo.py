"""The demo model: a tiny DeepSeek-V3.2 trained from scratch on the project's own chat corpus
(`train.corpus`), in the release's order: dense pre-training, the indexer's dense warm-up, then
sparse training over the indexer's top-k; then its multi-token-prediction layer alone on top of
the frozen model (the `mtp` stage: the model's weights are the sparse stage's, bit for bit). Its
final checkpoint is shipped as package data (`dsv32_jax/demo_model/`) and `dsv32 demo` generates
with it.

    python -m dsv32_jax.train.demo OUT      # ~20-40 min on 2 CPU cores; then copies OUT/model
                                            # into dsv32_jax/demo_model with --install
    python -m dsv32_jax.train.demo OUT --init dsv32_jax/demo_model   # the MTP stage alone

One run at a time writes OUT: the run holds `dsv32_jax.dirlock` on it (each stage's directory has
its own lock as well); a second run into the same OUT says who writes it and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time

from dsv32_jax.dirlock import hold
from dsv32_jax.model.config import preset
from dsv32_jax.train import step as S

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_model")
VOCAB = 1024
BATCH, SEQ = 16, 128  # sequences of 128 tokens, index_topk 16: the sparse attention really selects
STAGES = (("dense", 400, S.Hparams(lr=3e-3, warmup_steps=40)),
          ("warmup", 100, S.Hparams(indexer_lr=3e-3, warmup_steps=10)),
          ("sparse", 200, S.Hparams(lr=1e-3, indexer_lr=1e-3, warmup_steps=20)))
MTP = ("mtp", 800, S.Hparams(lr=3e-3, indexer_lr=3e-3, warmup_steps=30, mtp_weight=1.0))


def demo_config(dtype: str = "float32"):
    cfg = preset("tiny", vocab_size=VOCAB, dim=128, inter_dim=384, moe_inter_dim=64, n_layers=3,
                 n_dense_layers=1, n_heads=4, q_lora_rank=96, kv_lora_rank=128, qk_nope_head_dim=32,
                 qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=8, n_activated_experts=2,
                 n_expert_groups=4, n_limited_groups=2, index_n_heads=4, index_head_dim=128,
                 index_topk=16, rope_factor=1.0, original_seq_len=512, max_seq_len=512,
                 n_mtp_layers=0, weight_dtype="bf16", fp8_activations=False)
    return S.train_config(cfg, dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv32_jax.train.demo")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--install", action="store_true", help=f"copy the model into {DEMO_DIR}")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="skip the model's stages: train only the MTP stage on DIR's model and "
                        "tokenizer (e.g. dsv32_jax/demo_model)")
    args = p.parse_args(argv)
    try:  # one run at a time into OUT, as every writer of a directory (its stages lock their own)
        lock = hold(args.out, "python -m dsv32_jax.train.demo")
    except (ValueError, OSError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    with lock:
        return _train(args)


def _train(args) -> int:
    from dsv32_jax.text.tokenizer import Tokenizer, build_synthetic_tokenizer
    from dsv32_jax.train import corpus
    from dsv32_jax.train.data import Batches, tokenize_file
    from dsv32_jax.train.loop import Run, plot, read_metrics

    os.makedirs(args.out, exist_ok=True)
    data = corpus.write_corpus(os.path.join(args.out, "corpus.txt"))
    tok_dir = os.path.join(args.out, "tokenizer")
    with open(data, encoding="utf-8") as f:
        paras = [q for q in f.read().split("\n\n") if q.strip()]
    if args.init:  # the model's own tokenizer (the demo's is the one built below)
        os.makedirs(tok_dir, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(args.init, name), tok_dir)
        tok = Tokenizer.load(tok_dir)
    else:
        tok = build_synthetic_tokenizer(VOCAB, tok_dir, model_max_length=512, texts=paras)
    tokens = tokenize_file(data, tok)
    print(f"corpus: {os.path.getsize(data)} bytes, {len(paras)} conversations, {len(tokens)} tokens",
          flush=True)
    cfg = demo_config(args.dtype)
    init = args.init
    stages = (MTP,) if init else (*STAGES, MTP)
    t0 = time.perf_counter()
    for stage, steps, hp in stages:
        steps = max(1, int(steps * args.scale))
        out = os.path.join(args.out, stage)
        run = Run(out, dataclasses.replace(cfg, n_mtp_layers=int(stage == "mtp")), stage, steps,
                  Batches(tokens, BATCH, SEQ, seed=1), hp, init=init, ckpt_every=50,
                  tokenizer_dir=tok_dir, data=data)

        def show(m, stage=stage, steps=steps):
            if m["step"] % 10 == 0 or m["step"] in (1, steps):
                print(f"{stage} {m['step']}/{steps} lm {m['lm']:.3f} kl {m['kl']:.4f} "
                      f"recall {m['recall']:.3f}" + (f" mtp {m['mtp']:.3f} mtp_kl "
                                                     f"{m['mtp_kl']:.4f}" if "mtp" in m else "")
                      + f" ({m['seconds']:.2f}s/step, "
                      f"{time.perf_counter() - t0:.0f}s total)", flush=True)

        run.train(show)
        summary = run.finish()
        f, l = summary["first"], summary["last"]
        print(f"== {stage}: lm {f['lm']:.3f} -> {l['lm']:.3f}, kl {f['kl']:.4f} -> {l['kl']:.4f}, "
              f"recall {f['recall']:.3f} -> {l['recall']:.3f}"
              + (f", mtp {f['mtp']:.3f} -> {l['mtp']:.3f}" if "mtp" in f else ""), flush=True)
        init = out
    final = os.path.join(args.out, "model")
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(os.path.join(args.out, "mtp", "hf"), final)
    curves = plot(args.out, [m for stage, _, _ in stages
                             for m in read_metrics(os.path.join(args.out, stage))])
    print(f"trained in {time.perf_counter() - t0:.0f}s; model in {final}"
          + (f"; curves {curves}" if curves else ""))
    if args.install:
        for name in os.listdir(final):  # file by file: the package's __init__.py stays
            shutil.copy(os.path.join(final, name), DEMO_DIR)
        print(f"installed into {DEMO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
