"""`dsv32` command line: demo (the embedded default of `make demo`), generate, chat, train, convert,
plan, serve. One module per command (`demo`, `generate`, `chat`, `plan`, `serve` here, `dsv32_jax.train.cli`,
`convert.cli`), each with its `add_parser` and `run`; what they share is `dsv32_jax.cli.common`.

Every user error (a bad argument, a missing or broken checkpoint, a prompt that does not fit) ends the
command with one line on stderr: usage errors exit 2, the others 1; ``--debug`` shows the traceback
instead. What can be checked without the weights (config.json, the tokenizer, the prompt length) is
checked before they are loaded.
"""

from __future__ import annotations

import argparse
import sys

from dsv32_jax import argtypes
from dsv32_jax.cli import chat, common, demo, generate, plan, serve
from dsv32_jax.train import cli as train

# User errors: the project's error types are ValueError subclasses (ConfigError, CheckpointError,
# SafetensorsError, TokenizerError, ChatFormatError, ConvertError, OrbaxCheckpointError); files are OSError;
# a path not built yet says so with NotImplementedError (e.g. the Pallas FP8 matmul on a mesh).
USER_ERRORS = (ValueError, OSError, NotImplementedError)


def _parser() -> argparse.ArgumentParser:
    parser = argtypes.Parser(prog="dsv32", description="DeepSeek-V3.2 in JAX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(sub)
    train.add_parser(sub)
    common.compile_cache_option(sub.choices["train"])
    generate.add_parser(sub)
    chat.add_parser(sub)
    plan.add_parser(sub)
    serve.add_parser(sub)
    # Listed for --help only: main() hands `dsv32 convert ...` to convert.cli before parsing.
    sub.add_parser("convert", add_help=False,
                   help="convert the released HF checkpoint to Orbax (see `dsv32 convert --help`)")
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:  # `dsv32 convert ...` is `python -m convert ...`
        from convert.cli import main as convert_main

        return convert_main(argv[1:])
    args = _parser().parse_args(argv)
    prog = f"dsv32 {args.command}"
    if getattr(args, "prompt", None) is not None:
        args.prompt = common.decoded(args.prompt, "--prompt")
    try:
        with common.compile_cache(hasattr(args, "no_compile_cache") and not args.no_compile_cache):
            return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        return common.end(f"{prog}: interrupted", 130)
    except USER_ERRORS as e:
        if args.debug:
            raise
        return common.end(f"{prog}: error: {_one_line(e)}", 1)
