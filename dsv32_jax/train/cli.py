"""`dsv32 train`: one stage of training (dense | warmup | sparse | mtp) on a text file, with a
progress bar, checkpoints (resumed when OUT holds the same run), curves and the trained model in
OUT/hf."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

from dsv32_jax import argtypes
from dsv32_jax.argtypes import positive_int
from dsv32_jax.train.model import REMAT, STAGES


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train one stage (dense | warmup: the indexer's dense warm-up | "
                                     "sparse: DSA training | mtp: the MTP layer alone) on a text "
                                     "file; resumable")
    t.add_argument("--preset", default=None, choices=["tiny", "small"],
                   help="the model to train from random weights (default tiny); with --init the "
                        "model is --init's")
    t.add_argument("--data", required=True, metavar="FILE.txt",
                   help="UTF-8 text; paragraphs (blank-line separated) are documents")
    t.add_argument("--steps", type=positive_int, required=True, metavar="N")
    t.add_argument("--stage", default=None, choices=list(STAGES),
                   help="dense: LM loss, dense attention, indexer frozen; warmup: main model "
                        "frozen, the indexer learns the dense attention (KL); sparse: attention over "
                        "the indexer's top-k, LM loss on the model, KL on the selected keys for the "
                        "indexer; mtp: the model frozen, only its MTP layer learns (the MTP loss) "
                        "(default: warmup with --init, dense without)")
    t.add_argument("--out", default=None, help="run directory (default runs/MODEL-STAGE); an "
                                                "existing run of the same settings is resumed")
    t.add_argument("--init", default=None, metavar="CKPT",
                   help="start from a bf16 HF checkpoint, a `dsv32 convert --weights bf16` "
                        "directory or a run directory (default: random init)")
    t.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or a directory holding one (default: --init's, else a "
                        "synthetic byte-level BPE of the preset's vocabulary)")
    t.add_argument("--batch", type=positive_int, default=8)
    t.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per sequence (default min(128, max_position_embeddings))")
    t.add_argument("--lr", type=float, default=3e-3, help="main model peak LR")
    t.add_argument("--indexer-lr", type=float, default=3e-3)
    t.add_argument("--warmup-steps", type=int, default=20)
    t.add_argument("--clip", type=float, default=1.0, help="global-norm clip per param group")
    t.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype (masters are float32)")
    t.add_argument("--remat", default="none", choices=list(REMAT))
    t.add_argument("--mtp-weight", type=argtypes.nonnegative_float, default=0.3, metavar="LAMBDA",
                   help="weight of the multi-token-prediction loss (the MTP layer predicts the "
                        "token after next from the model's hidden state and the next token; "
                        "default 0.3); 0: no MTP layer is trained (nor needed)")
    t.add_argument("--mesh", metavar="D,E,T", default=None, type=argtypes.mesh,
                   help="train sharded on a data,expert,tensor mesh of all devices (batch over "
                        "data, experts over every device); default one device")
    t.add_argument("--ckpt-every", type=positive_int, default=50, metavar="N")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--debug", action="store_true", help="show the traceback of an error")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsv32_jax.model.config import preset
    from dsv32_jax.train import step as S
    from dsv32_jax.train.data import Batches, tokenize_file
    from dsv32_jax.train.loop import Run, TrainError, check_init

    init, stage = args.init, args.stage or ("warmup" if args.init else "dense")
    if init is not None:
        if args.preset is not None:
            raise TrainError("--preset and --init exclude each other: with --init the model is "
                             "--init's")
        if not os.path.isdir(init):
            raise FileNotFoundError(f"{init}: no such checkpoint or run directory")
        model = check_init(init)[1]
    else:
        model = preset(args.preset or "tiny")
    cfg = S.train_config(model, args.dtype)
    if args.mtp_weight > 0 and not cfg.n_mtp_layers:
        print("dsv32 train: note: the model has no MTP layer (num_nextn_predict_layers=0): one is "
              "added, from random weights (--mtp-weight 0: none)", file=sys.stderr, flush=True)
        cfg = dataclasses.replace(cfg, n_mtp_layers=1)
    seq = args.seq_len or min(128, cfg.max_seq_len)
    if seq > cfg.max_seq_len:
        raise TrainError(f"--seq-len {seq} exceeds the model's max_position_embeddings {cfg.max_seq_len}")
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"{args.data}: no such data file")
    name = os.path.basename(os.path.normpath(init)) if init else args.preset or "tiny"
    out = args.out or os.path.join("runs", f"{name}-{stage}")
    mesh = None
    if args.mesh is not None:
        from sharding.mesh import make_mesh

        mesh = make_mesh(*args.mesh)
        if args.batch % mesh.shape["data"]:
            raise TrainError(f"--mesh {','.join(map(str, args.mesh))}: --batch {args.batch} must "
                             f"split over its data axis ({mesh.shape['data']})")
    hp = S.Hparams(lr=args.lr, indexer_lr=args.indexer_lr, warmup_steps=args.warmup_steps,
                   clip=args.clip, remat=args.remat, mtp_weight=args.mtp_weight)
    if stage == "warmup" and init is None:
        print("dsv32 train: note: warm-up on random weights trains only the indexer (of a model "
              "that knows nothing): --stage dense trains the model", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="dsv32-tokenizer-") as tmp:  # Run copies it into OUT
        tok, tok_dir = _tokenizer(args.tokenizer, init, cfg.vocab_size, tmp)
        tokens = tokenize_file(args.data, tok)
        run_ = Run(out, cfg, stage, args.steps, Batches(tokens, args.batch, seq, args.seed), hp,
                   init=init, seed=args.seed, ckpt_every=args.ckpt_every, tokenizer_dir=tok_dir,
                   data=args.data, mesh=mesh)
    with run_:  # lets OUT go (its lock) however the run ends
        return _train(run_, args, cfg, stage, name, len(tokens), seq, out)


def _tokenizer(option: str | None, init: str | None, vocab_size: int, tmp: str):
    """(tokenizer, its directory): --tokenizer, else --init's, else a synthetic one built in `tmp`
    (nothing is written into OUT before the run has checked it)."""
    from dsv32_jax.text.tokenizer import Tokenizer, build_synthetic_tokenizer
    from dsv32_jax.train.loop import TrainError

    if option is None and init is not None:
        for d in (init, os.path.join(init, "hf")):
            if os.path.isfile(os.path.join(d, "tokenizer.json")):
                option = d
                break
    if option is None:
        tok = build_synthetic_tokenizer(vocab_size, tmp)
    else:
        tok = Tokenizer.load(option)
    if tok.vocab_size > vocab_size:
        raise TrainError(f"{tok.path}: {tok.vocab_size} tokens do not fit the model's vocabulary "
                         f"of {vocab_size}")
    return tok, os.path.dirname(tok.path)


def _train(run_, args: argparse.Namespace, cfg, stage: str, name: str, n_tokens: int, seq: int,
           out: str) -> int:
    from tqdm import tqdm

    print(f"dsv32 train: {stage} stage, {name} ({cfg.n_layers} layers, dim "
          f"{cfg.dim}, index_topk {cfg.index_topk}), {n_tokens} tokens, batch {args.batch} x "
          f"{seq}; {out}" + (f" (resumed at step {run_.start})" if run_.start else ""),
          file=sys.stderr, flush=True)
    if run_.start < args.steps:
        print("compiling train step ...", end="", file=sys.stderr, flush=True)
        print(f" {run_.compile():.1f}s", file=sys.stderr, flush=True)
    bar = tqdm(total=args.steps, initial=run_.start, desc=stage, disable=args.no_progress,
               file=sys.stderr)

    def show(m):
        bar.update(1)
        bar.set_postfix_str(f"lm {m['lm']:.3f} kl {m['kl']:.4f} recall {m['recall']:.3f}"
                            + (f" mtp {m['mtp']:.3f}" if "mtp" in m else ""))

    try:
        run_.train(show)
    finally:
        bar.close()
    summary = run_.finish()
    f, last = summary["first"], summary["last"]
    if f is not None:
        print(f"{stage}: steps {f['step']}..{last['step']}: lm {f['lm']:.3f} -> {last['lm']:.3f}, "
              f"kl {f['kl']:.4f} -> {last['kl']:.4f}, "
              f"recall {f['recall']:.3f} -> {last['recall']:.3f}"
              + (f", mtp {f['mtp']:.3f} -> {last['mtp']:.3f}" if "mtp" in f else ""))
    print(f"model: {summary['hf']} (bf16, HF layout); metrics: {os.path.join(out, 'metrics.jsonl')}; "
          + (f"curves: {summary['plot']}" if summary["plot"] else
             "no curves plot: matplotlib is not installed (pip install matplotlib)"))
    return 0
