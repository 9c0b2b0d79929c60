"""What the `dsv32` commands share: their options, the lines on stderr (`say`, the compile notices), JAX's
persistent compilation cache, a checkpoint's config and tokenizer read before its weights, joining a
multi-process run, and a reply streamed to stdout with its rates."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from dsv32_jax import argtypes
from dsv32_jax.cachedir import cache_dir
from dsv32_jax.engine import checks

# ------------------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------------------


def compile_cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the compiled programs kept in $DSV32_CACHE/xla (default "
                        "~/.cache/dsv32_jax/xla), which spare a later run the compile (JAX's own "
                        "JAX_COMPILATION_CACHE_DIR, when set, still applies)")


def weights_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="auto", choices=["auto", "narrow", "f32"],
                   help="weight storage: auto (default) keeps float32 copies of the FP8/bf16 weights on a "
                        "CPU host (the same logits, up to ~6x faster decode steps there, 4x the FP8 weights' "
                        "memory), the checkpoint's dtypes on accelerators; narrow / f32 force one")
    p.add_argument("--matmul", default="xla", choices=["xla", "native"],
                   help="FP8 checkpoints on a CPU host, bf16 numerics: native runs the decode steps' FP8 "
                        "linears and the head with C++ kernels that read the stored e4m3 / bf16 weights "
                        "(built on first use with the host's C++ compiler; ~1.6x faster steps on a 127M "
                        "model, the FP8 weights' memory); xla (default) XLA's own products")


def attention_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", default="xla", choices=["xla", "pallas"],
                   help="sparse attention and the indexer: xla (default) or pallas (the Pallas GPU kernels; "
                        "off a GPU they run interpreted, for checking only: slow)")


def run_options(p: argparse.ArgumentParser, max_new: int = 64) -> None:
    """The options of a command that runs the model: sampling, numerics, output, --debug, the compile cache."""
    p.add_argument("--max-new-tokens", type=argtypes.checked(int, checks.check_max_new_tokens), default=max_new,
                   metavar="N", help=f"at most N new tokens (default {max_new})")
    p.add_argument("--temperature", type=argtypes.checked(float, checks.check_temperature), default=1.0,
                   help="sampling temperature >= 0; 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=argtypes.checked(float, checks.check_top_p), default=0.95,
                   help="nucleus mass in (0, 1]; 1 = no cut (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-fp8", action="store_true", help="do not simulate FP8 activations")
    weights_option(p)
    attention_option(p)
    speculative_option(p)
    p.add_argument("--show-special", action="store_true",
                   help="print special/reserved tokens in the output stream")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    compile_cache_option(p)


def speculative_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", type=argtypes.checked(int, checks.check_drafts), default=0, metavar="K",
                   help="speculative decoding: the checkpoint's MTP layer drafts K tokens (1-3) per forward of "
                        "the model (the same greedy output, the same distribution); default 0: off")


def checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory (HF layout, or from `dsv32 convert`)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer.json, or a directory holding one (default: the checkpoint's own)")


def mesh_options(p: argparse.ArgumentParser) -> None:
    """--mesh and the multi-process options (`join`)."""
    p.add_argument("--mesh", metavar="D,E,T", default=None, type=argtypes.mesh,
                   help="run sharded on a data,expert,tensor mesh of all devices (e.g. 1,8,1); "
                        "default: one device (several processes: 1,<all devices>,1)")
    p.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="multi-process run: process 0's address (or $DSV32_COORDINATOR)")
    p.add_argument("--num-processes", type=int, metavar="N", default=None,
                   help="multi-process run: how many processes (or $DSV32_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, metavar="I", default=None,
                   help="multi-process run: this process, 0..N-1 (or $DSV32_PROCESS_ID)")
    p.add_argument("--init-timeout", type=argtypes.seconds, metavar="S", default=None,
                   help="multi-process run: seconds for all processes to join (or "
                        "$DSV32_INIT_TIMEOUT; default 120)")
    p.add_argument("--heartbeat-timeout", type=argtypes.seconds, metavar="S", default=None,
                   help="multi-process run: seconds of silence after which a process is "
                        "taken for lost (or $DSV32_HEARTBEAT_TIMEOUT; default 60; a process "
                        "that dies is noticed at once)")


# ------------------------------------------------------------------------------------------------------------
# Lines on stderr, the compile cache, input text
# ------------------------------------------------------------------------------------------------------------


_open_line = False  # a "compiling ..." line on stderr waits for its time
_reply_open = False  # a reply is being printed on stdout, its line not ended
quiet = False  # a multi-process run's processes other than 0 print nothing
_joined = False  # this process is part of a multi-process run


def say(*parts, end: str = "\n") -> None:
    global _open_line
    if quiet:
        return
    if _open_line and end:  # an error in the middle of a compile: finish that line first
        print(file=sys.stderr)
    _open_line = not end
    print(*parts, file=sys.stderr, flush=True, end=end)


# persistent compilation cache events so far, and when the open compile line began: a step's line says
# "(from the compile cache)" when its programs were read, none compiled (a small program another run
# compiled identically, e.g. the step inputs' unpacking, is a hit beside a step program compiled afresh)
_cache = {"hits": 0, "misses": 0}
_cache_at_open = dict(_cache)


def _compile_notice(label: str, seconds: float | None) -> None:
    """`ChatSession.on_compile`: a line on stderr while a new shape compiles (10-25 s on a large model)."""
    global _open_line
    if seconds is None:
        _cache_at_open.update(_cache)
        if _reply_open and sys.stderr.isatty() and sys.stdout.isatty():  # not inside a reply's line
            print(file=sys.stderr)
        say(f"compiling {label} ...", end="")
    else:
        _open_line = False
        read = _cache["hits"] > _cache_at_open["hits"] and _cache["misses"] == _cache_at_open["misses"]
        say(f" {seconds:.1f}s" + (" (from the compile cache)" if read else ""))


def _count_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _cache["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":  # JAX's name for a compile written to the cache
        _cache["misses"] += 1


_listening = False  # _count_event is a JAX event listener, registered once per process


@contextlib.contextmanager
def compile_cache(enabled: bool):
    """JAX's persistent compilation cache in CACHE_DIR/xla for the command (CACHE_DIR: $DSV32_CACHE or
    ~/.cache/dsv32_jax), unless JAX_COMPILATION_CACHE_DIR names one already: a later run reads what an
    earlier one compiled. Every compile is kept (the ones worth keeping take seconds; a tiny model's take
    less). JAX's settings are restored afterwards, so that `main` called in a process (tests, notebooks)
    leaves no cache behind it."""
    global _listening
    if not enabled:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    ours = not saved["jax_compilation_cache_dir"]
    if ours:
        compilation_cache.reset_cache()  # JAX opens its cache once, on the first compile that has a directory
        jax.config.update(names[0], os.path.join(cache_dir(), "xla"))
        jax.config.update(names[1], 0.0)
    if not _listening:
        jax.monitoring.register_event_listener(_count_event)
        _listening = True
    try:
        yield
    finally:
        if ours:
            for name, value in saved.items():
                jax.config.update(name, value)
            compilation_cache.reset_cache()


_invalid_noted = False


def decoded(text: str, where: str) -> str:
    """Input text (argv, stdin) with each byte that is not valid UTF-8 as U+FFFD; said once per process."""
    global _invalid_noted
    from dsv32_jax.text.tokenizer import replace_invalid

    text, n = replace_invalid(text)
    if n and not _invalid_noted:
        _invalid_noted = True
        say(f"({where} holds bytes that are not UTF-8: each is read as U+FFFD; said once)")
    return text


def end(line: str, code: int) -> int:
    """Say why the command ends. In a multi-process run the others are told too, and the process
    ends here: JAX's shutdown at exit would wait for them, then abort."""
    say(line)
    if _joined:
        from sharding.distributed import leave

        leave(line)
        sys.stdout.flush()
        os._exit(code)
    return code


# ------------------------------------------------------------------------------------------------------------
# Checkpoint: what can be checked before the weights, then the weights
# ------------------------------------------------------------------------------------------------------------


def _read_config(path: str, args: argparse.Namespace):
    """The checkpoint's Config from config.json alone (no weights read), in the layout load_model reads."""
    from dsv32_jax.checkpoint import orbax_layout
    from dsv32_jax.checkpoint.hf import is_hf_dir
    from dsv32_jax.model.config import Config

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: not a directory (--ckpt takes a checkpoint directory)")
    numerics = dict(dtype=args.dtype, fp8_activations=not args.no_fp8)
    if orbax_layout.is_orbax_dir(path):
        return orbax_layout.load_config(path, **numerics)
    if not is_hf_dir(path):
        raise ValueError(f"{path}: not a checkpoint directory: expected config.json and *.safetensors (the "
                         "Hugging Face layout), or a directory written by `dsv32 convert`")
    return Config.from_hf(path, **numerics)


def _tokenizer(ckpt: str, option: str | None, cfg):
    from dsv32_jax.text.tokenizer import Tokenizer

    if option is None and not os.path.isfile(os.path.join(ckpt, "tokenizer.json")):
        raise FileNotFoundError(f"{ckpt} has no tokenizer.json: pass --tokenizer PATH (a tokenizer.json, or a "
                                "directory holding one)")
    tok = Tokenizer.load(ckpt if option is None else option)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tok.path}: the tokenizer has {tok.vocab_size} entries but the model's vocabulary "
                         f"has {cfg.vocab_size}: they do not belong together")
    return tok


def open_checkpoint(args: argparse.Namespace):
    """(config, tokenizer) of --ckpt, checked before any weight is read."""
    cfg = _read_config(args.ckpt, args)
    return cfg, _tokenizer(args.ckpt, args.tokenizer, cfg)


def join(args: argparse.Namespace) -> None:
    """Join a multi-process run (--coordinator/--num-processes/--process-id or DSV32_* variables)
    before anything touches a device; only process 0 prints from then on."""
    global quiet, _joined
    from sharding.distributed import initialize

    if initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout,
                  args.heartbeat_timeout):
        import jax

        _joined, quiet = True, jax.process_index() != 0


def _mesh(args: argparse.Namespace):
    """--mesh d,e,t; without it one device, or in a multi-process run (1, every device, 1)."""
    import jax

    from sharding.mesh import make_mesh

    if args.mesh is not None:
        return make_mesh(*args.mesh)
    return make_mesh(expert=jax.device_count()) if jax.process_count() > 1 else None


def load_weights(path: str, args: argparse.Namespace):
    import dsv32_jax

    t = time.perf_counter()
    mesh = _mesh(args)
    where = "" if mesh is None else f" on a {'x'.join(map(str, mesh.devices.shape))} mesh"
    say(f"loading {path}{where} ...")
    model = dsv32_jax.load_model(path, dtype=args.dtype, fp8_activations=not args.no_fp8, mesh=mesh,
                                 progress=not quiet, weights=args.weights,
                                 matmul_impl=getattr(args, "matmul", "xla"),
                                 attention_impl=args.attention, mtp=getattr(args, "speculative", 0) > 0)
    say(f"loaded in {time.perf_counter() - t:.1f}s")
    if mesh is not None and model.config.n_moe_layers:
        from sharding.rules import expert_layout

        say(expert_layout(model.config.n_routed_experts, mesh.shape))
    return model


def chat_session(model, args: argparse.Namespace):
    from dsv32_jax.engine.session import ChatSession

    return ChatSession(model, on_compile=_compile_notice, speculative=args.speculative)


# ------------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------------


def stream_reply(session, tok, new_ids: list[int], max_new: int, args, out=None) -> tuple[list[int], dict]:
    """Generate after `new_ids`, printing text as it comes. Returns (new ids, timing stats)."""
    out = (open(os.devnull, "w") if quiet else sys.stdout) if out is None else out
    stats: dict = {}
    dec = tok.stream(skip_special_tokens=not args.show_special)
    new: list[int] = []
    steps = session.stream(new_ids, max_new, args.temperature, args.top_p, args.seed, [tok.eos_id], stats)
    global _reply_open
    _reply_open = True
    try:
        for token in steps:
            new.append(token)
            print(dec.push(token), end="", file=out, flush=True)
    finally:
        _reply_open = False
        print(dec.flush(), file=out, flush=True)
    return new, stats


def _rate(n: int, s: float) -> str:
    return f"{n / s:.1f}" if n and s > 0 else "nan"


def rates(stats: dict) -> str:
    """Steady-state speeds, with the compile time (first use of a shape) reported apart."""
    line = (f"prefill {stats['prefill_tokens']} tokens in {stats['prefill_s']:.2f}s "
            f"({_rate(stats['prefill_tokens'], stats['prefill_s'])} tok/s), "
            f"decode {stats['decode_steps']} tokens in {stats['decode_s']:.2f}s "
            f"({_rate(stats['decode_steps'], stats['decode_s'])} tok/s)")
    if stats.get("iterations"):
        k, n = len(stats["accepted"]), stats["iterations"]
        line += (f"; speculative k={k}: {n} forwards of the model, "
                 f"{stats['decode_steps'] / n:.2f} tokens each, draft acceptance "
                 + " / ".join(f"{a / n:.2f}" for a in stats["accepted"]))
    if stats.get("compiled"):
        line += f"; compile {stats['compile_s']:.1f}s apart ({', '.join(stats['compiled'])})"
    return line


def prompt_ids(tok, text: str, raw: bool, thinking: bool, max_len: int) -> list[int]:
    """The prompt's ids: `text` as the user message of the chat template (read as text), or with `raw` as it is
    (control-token strings in it become control tokens); refused unread when longer than the context takes."""
    checks.check_text_bytes(text, max_len, "the prompt")
    if raw:
        return tok.encode(text)
    return tok.encode_chat([{"role": "user", "content": text}], "thinking" if thinking else "chat")
