"""`dsv32 generate`: complete one prompt, the text streamed to stdout and the rates to stderr."""

from __future__ import annotations

import argparse

from dsv32_jax.cli import common
from dsv32_jax.engine.checks import check_budget


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="complete one prompt")
    common.checkpoint_options(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="no chat template: continue the raw text")
    g.add_argument("--thinking", action="store_true", help="thinking mode chat template")
    common.run_options(g)
    common.mesh_options(g)
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    common.join(args)
    cfg, tok = common.open_checkpoint(args)
    ids = common.prompt_ids(tok, args.prompt, args.raw, args.thinking, cfg.max_seq_len)
    n = check_budget(len(ids), args.max_new_tokens, cfg.max_seq_len)
    session = common.chat_session(common.load_weights(args.ckpt, args), args)
    _, stats = common.stream_reply(session, tok, ids, n, args)
    common.say(common.rates(stats))
    return 0
