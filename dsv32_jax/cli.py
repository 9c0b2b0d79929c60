"""`dsv32` command line: demo (the embedded default of `make demo`), generate, chat, train, convert,
plan.

Every user error (a bad argument, a missing or broken checkpoint, a prompt that does not fit) ends the
command with one line on stderr: usage errors exit 2, the others 1; ``--debug`` shows the traceback
instead. What can be checked without the weights (config.json, the tokenizer, the prompt length) is
checked before they are loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time

# User errors: the project's error types are ValueError subclasses (ConfigError, CheckpointError,
# SafetensorsError, TokenizerError, ChatFormatError, ConvertError, OrbaxCheckpointError); files are OSError.
USER_ERRORS = (ValueError, OSError)


def _checked(convert, check):
    """An argparse `type` that converts the text, then validates it with a `dsv32_jax.engine.checks` check."""

    def parse(text: str):
        from dsv32_jax.engine import checks

        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {convert.__name__}") from None
        try:
            return getattr(checks, check)(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _seconds(text: str) -> float:
    """An argparse `type`: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds > 0")
    return value


def _cache_dir() -> str:
    return os.environ.get("DSV32_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv32_jax")


_open_line = False  # a "compiling ..." line on stderr waits for its time
_quiet = False  # a multi-process run's processes other than 0 print nothing
_joined = False  # this process is part of a multi-process run


def _say(*parts, end: str = "\n") -> None:
    global _open_line
    if _quiet:
        return
    if _open_line and end:  # an error in the middle of a compile: finish that line first
        print(file=sys.stderr)
    _open_line = not end
    print(*parts, file=sys.stderr, flush=True, end=end)


_cache_hits = [0, 0]  # persistent compilation cache hits: so far, and when the open compile line began


def _compile_notice(label: str, seconds: float | None) -> None:
    """`ChatSession.on_compile`: a line on stderr while a new shape compiles (10-25 s on a large model)."""
    global _open_line
    if seconds is None:
        _cache_hits[1] = _cache_hits[0]
        _say(f"compiling {label} ...", end="")
    else:
        _open_line = False
        _say(f" {seconds:.1f}s" + (" (from the compile cache)" if _cache_hits[0] > _cache_hits[1] else ""))


def _count_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _cache_hits[0] += 1


_listening = False  # _count_hit is a JAX event listener, registered once per process


@contextlib.contextmanager
def _compile_cache(enabled: bool):
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
        jax.config.update(names[0], os.path.join(_cache_dir(), "xla"))
        jax.config.update(names[1], 0.0)
    if not _listening:
        jax.monitoring.register_event_listener(_count_hit)
        _listening = True
    try:
        yield
    finally:
        if ours:
            for name, value in saved.items():
                jax.config.update(name, value)
            compilation_cache.reset_cache()


_invalid_noted = False


def _decoded(text: str, where: str) -> str:
    """Input text (argv, stdin) with each byte that is not valid UTF-8 as U+FFFD; said once per process."""
    global _invalid_noted
    from dsv32_jax.text.tokenizer import replace_invalid

    text, n = replace_invalid(text)
    if n and not _invalid_noted:
        _invalid_noted = True
        _say(f"({where} holds bytes that are not UTF-8: each is read as U+FFFD; said once)")
    return text


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


def _open(args: argparse.Namespace):
    """(config, tokenizer) of --ckpt, checked before any weight is read."""
    cfg = _read_config(args.ckpt, args)
    return cfg, _tokenizer(args.ckpt, args.tokenizer, cfg)


def _join(args: argparse.Namespace) -> None:
    """Join a multi-process run (--coordinator/--num-processes/--process-id or DSV32_* variables)
    before anything touches a device; only process 0 prints from then on."""
    global _quiet, _joined
    from sharding.distributed import initialize

    if initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout,
                  args.heartbeat_timeout):
        import jax

        _joined, _quiet = True, jax.process_index() != 0


def _mesh(args: argparse.Namespace):
    """--mesh d,e,t; without it one device, or in a multi-process run (1, every device, 1)."""
    import jax

    from sharding.mesh import make_mesh

    if args.mesh is not None:
        return make_mesh(*args.mesh)
    return make_mesh(expert=jax.device_count()) if jax.process_count() > 1 else None


def _load_weights(path: str, args: argparse.Namespace):
    import dsv32_jax

    t = time.perf_counter()
    mesh = _mesh(args)
    where = "" if mesh is None else f" on a {'x'.join(map(str, mesh.devices.shape))} mesh"
    _say(f"loading {path}{where} ...")
    model = dsv32_jax.load_model(path, dtype=args.dtype, fp8_activations=not args.no_fp8, mesh=mesh,
                                 progress=not _quiet)
    _say(f"loaded in {time.perf_counter() - t:.1f}s")
    if mesh is not None and model.config.n_moe_layers:
        from sharding.rules import expert_layout

        _say(expert_layout(model.config.n_routed_experts, mesh.shape))
    return model


PROMPT = "> "


def _read_line() -> str:
    """One line of stdin ("" at its end), after the prompt marker when a person types (stdin is a
    terminal; piped input gets none, so that stdout holds only the replies)."""
    if not _quiet and sys.stdin.isatty():
        print(PROMPT, end="", flush=True)
    return sys.stdin.readline()


def _lines():
    """The chat's input lines: stdin, or in a multi-process run process 0's stdin sent to all. Bytes that are
    not valid UTF-8 are read as U+FFFD (said once), whatever the locale."""
    import jax

    if hasattr(sys.stdin, "reconfigure"):  # keep undecodable bytes (as lone surrogates) for _decoded
        sys.stdin.reconfigure(errors="surrogateescape")
    if jax.process_count() == 1:
        for line in iter(_read_line, ""):
            yield _decoded(line, "stdin")
        return
    import numpy as np
    from jax.experimental import multihost_utils

    while True:
        data = b""
        if jax.process_index() == 0:
            line = _read_line()
            data = _decoded(line, "stdin").encode() if line else b""
        n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if data else -1)))
        if n < 0:
            return
        buf = np.frombuffer(data, np.uint8) if data else np.zeros(n, np.uint8)
        yield bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode()


def _session(model):
    from dsv32_jax.engine.session import ChatSession

    return ChatSession(model, on_compile=_compile_notice)


# ------------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------------


def _stream_reply(session, tok, new_ids: list[int], max_new: int, args, out=None) -> tuple[list[int], dict]:
    """Generate after `new_ids`, printing text as it comes. Returns (new ids, timing stats)."""
    out = (open(os.devnull, "w") if _quiet else sys.stdout) if out is None else out
    stats: dict = {}
    dec = tok.stream(skip_special_tokens=not args.show_special)
    new: list[int] = []
    steps = session.stream(new_ids, max_new, args.temperature, args.top_p, args.seed, [tok.eos_id], stats)
    try:
        for token in steps:
            new.append(token)
            print(dec.push(token), end="", file=out, flush=True)
    finally:
        print(dec.flush(), file=out, flush=True)
    return new, stats


def _rate(n: int, s: float) -> str:
    return f"{n / s:.1f}" if n and s > 0 else "nan"


def _rates(stats: dict) -> str:
    """Steady-state speeds, with the compile time (first use of a shape) reported apart."""
    line = (f"prefill {stats['prefill_tokens']} tokens in {stats['prefill_s']:.2f}s "
            f"({_rate(stats['prefill_tokens'], stats['prefill_s'])} tok/s), "
            f"decode {stats['decode_steps']} tokens in {stats['decode_s']:.2f}s "
            f"({_rate(stats['decode_steps'], stats['decode_s'])} tok/s)")
    if stats.get("compiled"):
        line += f"; compile {stats['compile_s']:.1f}s apart ({', '.join(stats['compiled'])})"
    return line


def _prompt_ids(tok, text: str, raw: bool, thinking: bool, max_len: int) -> list[int]:
    """The prompt's ids: `text` as the user message of the chat template (read as text), or with `raw` as it is
    (control-token strings in it become control tokens); refused unread when longer than the context takes."""
    from dsv32_jax.engine.checks import check_text_bytes

    check_text_bytes(text, max_len, "the prompt")
    if raw:
        return tok.encode(text)
    return tok.encode_chat([{"role": "user", "content": text}], "thinking" if thinking else "chat")


def generate(args: argparse.Namespace) -> int:
    from dsv32_jax.engine.checks import check_budget

    _join(args)
    cfg, tok = _open(args)
    ids = _prompt_ids(tok, args.prompt, args.raw, args.thinking, cfg.max_seq_len)
    n = check_budget(len(ids), args.max_new_tokens, cfg.max_seq_len)
    session = _session(_load_weights(args.ckpt, args))
    _, stats = _stream_reply(session, tok, ids, n, args)
    _say(_rates(stats))
    return 0


class Conversation:
    """A chat as turns of token ids that always fit a context of `max_len` positions.

    The token history is BOS, then per turn the user message as the chat template writes it followed by the
    reply as generated (and EOS when the reply was cut off). Earlier turns keep their reasoning (the template's
    ``drop_thinking=False``), so the history only grows by appending and the session's cache can be reused.
    When a new message and a reply no longer fit, the oldest turns are dropped.
    """

    def __init__(self, tok, thinking_mode: str, max_len: int) -> None:
        self.tok, self.mode, self.max_len = tok, thinking_mode, max_len
        self.turns: list[tuple[list[dict], list[int]]] = []  # (messages, ids) per completed turn
        self.clip_noted = False

    @property
    def messages(self) -> list[dict]:
        return [m for msgs, _ in self.turns for m in msgs]

    def context(self) -> list[int]:
        return [self.tok.bos_id] + [t for _, ids in self.turns for t in ids]

    def clear(self) -> None:
        self.turns.clear()

    def plan(self, user: dict, want: int) -> tuple[list[int], int, list[str]]:
        """Fit the next user message: -> (the token context to generate after, new-token budget, notes for
        the user). Drops the oldest turns when needed; raises ValueError if the message alone cannot fit (a
        message of more than `checks.BYTES_PER_POSITION` bytes a position is refused before it is tokenized)."""
        from dsv32_jax.engine.checks import check_text_bytes

        check_text_bytes(user.get("content") or "", self.max_len)
        user_ids = self.tok.encode_chat([user], self.mode, context=self.messages, drop_thinking=False,
                                        add_default_bos_token=False)
        cap = self.max_len - 1 - len(user_ids)  # the most any reply can have, with every earlier turn dropped
        if cap < 1:
            raise ValueError(f"this message is {len(user_ids)} tokens with the chat template; the context holds "
                             f"{self.max_len} positions: shorten it")
        notes = []
        n = min(want, cap)
        keep_reply = min(n, max(16, self.max_len // 8))  # keep history while at least this much reply fits
        dropped = 0
        while self.turns and len(self.context()) + len(user_ids) + keep_reply > self.max_len:
            self.turns.pop(0)
            dropped += 1
        if dropped:
            notes.append(f"(dropped the {'oldest turn' if dropped == 1 else f'{dropped} oldest turns'} to fit the "
                         f"context of {self.max_len} tokens; /clear starts afresh)")
        context = self.context() + user_ids
        n = min(n, self.max_len - len(context))
        if n < want and not self.clip_noted:
            self.clip_noted = True
            notes.append(f"(replies are limited to the room left in the context of {self.max_len} tokens: "
                         f"this one to {n} new tokens instead of {want})")
        self._pending = (user, user_ids)
        return context, n, notes

    def add_reply(self, reply_ids: list[int]) -> dict:
        """Record the reply to the planned message -> the assistant message (plain text if it does not parse)."""
        from dsv32_jax.text.chat import EOS, ChatFormatError, parse_message_from_completion_text

        user, user_ids = self._pending
        completion = self.tok.decode(reply_ids)
        try:
            msg = parse_message_from_completion_text(completion, self.mode)
            note = None
        except ChatFormatError as e:  # e.g. cut off by the budget: keep the raw text
            msg = {"role": "assistant", "content": completion.removesuffix(EOS)}
            note = f"(reply kept as plain text: {e})"
        ids = user_ids + reply_ids
        if not reply_ids or reply_ids[-1] != self.tok.eos_id:  # cut off: close the turn as the template does
            ids.append(self.tok.eos_id)
            note = f"(reply cut off after {len(reply_ids)} tokens: kept as plain text)"
        self.turns.append(([user, msg], ids))
        return {"message": msg, "note": note}


CHAT_HELP = ("(commands: /help this list; /clear forget the conversation; /exit quit, as does end of input "
             "(Ctrl-D). A line whose first word is /letters is a command, never sent to the model. Ctrl-C "
             "stops a reply and drops that turn, the message and its partial reply, from the conversation)")


def chat(args: argparse.Namespace) -> int:
    _join(args)
    _, tok = _open(args)
    session = _session(_load_weights(args.ckpt, args))
    mode = "thinking" if args.thinking else "chat"
    convo = Conversation(tok, mode, session.max_len)
    _say(f"chat ({mode} mode, context {session.max_len} tokens). /help lists the commands, /exit quits.")
    for line in _lines():
        text = line.strip()
        if not text:
            continue
        if re.fullmatch(r"/[A-Za-z]+", text.split()[0]):
            if text == "/exit":
                break
            if text == "/clear":
                convo.clear()
                session.reset()
                _say("(conversation cleared)")
            else:
                _say(CHAT_HELP if text == "/help" else f"(unknown command {text!r}: /help lists the commands)")
            continue
        try:
            context, n, notes = convo.plan({"role": "user", "content": text}, args.max_new_tokens)
        except ValueError as e:
            _say(f"({e})")
            continue
        for note in notes:
            _say(note)
        new_ids = session.prepare(context)
        try:
            reply, stats = _stream_reply(session, tok, new_ids, n, args)
        except KeyboardInterrupt:  # stop this reply, keep the conversation without this turn
            _say("(interrupted: this message and its partial reply are dropped from the conversation)")
            continue
        result = convo.add_reply(reply)
        if result["note"]:
            _say(result["note"])
        _say(_rates(stats))
    return 0


def demo(args: argparse.Namespace) -> int:
    """The trained demo model (shipped in dsv32_jax/demo_model) in a short chat; --random: the
    architecture with random weights (a synthetic checkpoint)."""
    return random_demo(args) if args.random else trained_demo(args)


DEMO_TURNS = ("Hello! My name is Alice.", None, "What color is the sky?", "What is my name?")  # None: --prompt


def trained_demo(args: argparse.Namespace) -> int:
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
    model = dsv32_jax.load_model(DEMO_DIR, dtype=args.dtype, fp8_activations=not args.no_fp8)
    c = model.config
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(model.params))
    print(f"dsv32 demo: a tiny DeepSeek-V3.2 ({n_params / 1e6:.2f}M params: {c.n_layers} layers, "
          f"{c.n_routed_experts} routed experts, dim {c.dim}, vocab {c.vocab_size}) trained on this "
          "machine's CPU from scratch on the project's own chat corpus: dense attention first, then "
          "the indexer's dense warm-up, then sparse attention over the indexer's top-"
          f"{c.index_topk} keys (DSA). Loaded from {DEMO_DIR} in {time.perf_counter() - t:.1f}s; "
          f"numerics dtype={c.dtype} fp8_activations={c.fp8_activations}; device "
          f"{jax.devices()[0].device_kind}.")
    session = _session(model)
    convo = Conversation(tok, "chat", session.max_len)
    stats = None
    for text in DEMO_TURNS:
        text = args.prompt if text is None else text
        context, n, notes = convo.plan({"role": "user", "content": text}, args.max_new_tokens)
        for note in notes:
            print(note)
        print(f"User: {text}")
        print("Assistant: ", end="", flush=True)
        reply, stats = _stream_reply(session, tok, session.prepare(context), n, args)
        convo.add_reply(reply)
        end = len(context) + len(reply)
        print(f"    [{end} tokens in context; each new token attended "
              f"{min(c.index_topk, end)} of them, picked by the indexer]")
    print(_rates(stats))
    return 0


def random_demo(args: argparse.Namespace) -> int:
    import jax

    import dsv32_jax
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from dsv32_jax.engine.checks import check_budget
    from dsv32_jax.model.cache import bytes_per_token
    from dsv32_jax.model.config import preset
    from dsv32_jax.text.chat import encode_messages
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
    tok = Tokenizer.load(ckpt)
    prompt = encode_messages([{"role": "user", "content": args.prompt}], thinking_mode="chat")
    ids = _prompt_ids(tok, args.prompt, False, False, cfg.max_seq_len)
    n = check_budget(len(ids), args.max_new_tokens, cfg.max_seq_len)
    t = time.perf_counter()
    model = dsv32_jax.load_model(ckpt, dtype=args.dtype, fp8_activations=not args.no_fp8)
    c = model.config
    print(f"loaded in {time.perf_counter() - t:.1f}s: {c.n_layers} layers ({c.n_dense_layers} dense, "
          f"{c.n_moe_layers} MoE, {c.n_routed_experts} experts), dim {c.dim}, vocab {c.vocab_size}; "
          f"numerics dtype={c.dtype} fp8_activations={c.fp8_activations}; "
          f"device {jax.devices()[0].device_kind}")
    print(f"prompt ({len(ids)} tokens, chat template): {prompt!r}")
    print(f"generating {n} tokens (each new shape is compiled first, timed apart):", flush=True)
    new, stats = _stream_reply(_session(model), tok, ids, n, args)
    print(_rates(stats))
    bpt = bytes_per_token(c)
    end = len(ids) + len(new)
    print(f"cache: {bpt['mla']} B/token/layer MLA + {bpt['indexer']} B indexer keys "
          f"({bpt['total'] * c.n_layers} B/token for {c.n_layers} layers)")
    print(f"indexer: the last decode step attended {min(c.index_topk, end)} of the {end} keys "
          f"available (index_topk={c.index_topk})")
    return 0


def _xla_gpu(mesh, context: int, batch: int, target: str) -> dict:
    """XLA:GPU's per-device figures of the released model's decode step and prefill chunk on
    `mesh`, compiled for a deviceless `target` (benchmarks/deviceless.py in the repository's GPU
    venv, or $DSV32_GPU_VENV; a few minutes) -> {phase: {"argument_bytes", "temp_bytes"}}."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    py = Path(os.environ.get("DSV32_GPU_VENV", repo / ".venv-gpu")) / "bin" / "python"
    if not (py.is_file() and (repo / "benchmarks" / "deviceless.py").is_file()):
        raise OSError(f"--xla-gpu needs the GPU venv of a source checkout: run `make gpu-venv` in "
                      f"{repo} (no {py})")
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([str(py), "-m", "benchmarks.deviceless", "--mesh", ",".join(map(str, mesh)),
                               "--context", str(context), "--batch", str(batch), "--target", target,
                               "--out", out], cwd=repo, capture_output=True, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        path = Path(out) / "deviceless.json"
        progs = json.loads(path.read_text())["programs"] if path.is_file() else {}
    failed = [v["error"] for v in progs.values() if "error" in v]
    if proc.returncode or failed or len(progs) != 2:
        tail = (failed or proc.stderr.strip().splitlines()[-1:] or ["no output"])[0]
        raise OSError(f"the XLA:GPU compile failed (exit {proc.returncode}): {tail}")
    return {v["phase"]: {"argument_bytes": v["argument_bytes"], "temp_bytes": v["temp_bytes"]}
            for v in progs.values()}


def plan(args: argparse.Namespace) -> int:
    """`dsv32 plan`: per-device memory of a config on a mesh (sharding.plan), without weights or devices."""
    import json

    from sharding import plan as planner
    from sharding.mesh import parse_mesh

    def usage(msg: str) -> int:
        _say(f"dsv32 plan: error: {msg} (see 'dsv32 plan --help')")
        return 2

    try:
        memory = planner.parse_bytes(args.device_memory)
        mesh = parse_mesh(args.mesh) if args.mesh is not None else None
    except ValueError as e:
        return usage(str(e))
    for name in ("devices", "context", "batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return usage(f"--{name} must be an integer >= 1, got {v}")
    if not 0 <= args.headroom < 1:
        return usage(f"--headroom must be in [0, 1), got {args.headroom}")
    if args.capacity_factor is not None and not args.capacity_factor > 0:
        return usage(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    devices = args.devices if args.devices is not None else (8 if mesh is None else mesh[0] * mesh[1] * mesh[2])
    if mesh is not None and mesh[0] * mesh[1] * mesh[2] != devices:
        return usage(f"--mesh {args.mesh} has {mesh[0] * mesh[1] * mesh[2]} devices, --devices says {devices}")
    import dataclasses

    from dsv32_jax.model.config import Config, preset

    cfg = preset(args.config) if args.config in ("671b", "small", "tiny") else Config.from_hf(args.config)
    cfg = dataclasses.replace(cfg, weight_dtype=args.weights or cfg.weight_dtype,
                              ep_capacity_factor=args.capacity_factor)
    context = args.context if args.context is not None else cfg.max_seq_len
    best = (planner.plan(cfg, mesh, context, args.batch, memory, args.headroom) if mesh is not None
            else planner.search(cfg, devices, context, args.batch, memory, args.headroom)[0])
    ranked = [] if mesh is not None else planner.search(cfg, devices, context, args.batch, memory, args.headroom)
    if args.xla_gpu and args.config != "671b":
        return usage("--xla-gpu compiles the released model: use it with --config 671b")
    xla = _xla_gpu(best.mesh, context, args.batch, "h200" if memory > 100e9 else "h100") if args.xla_gpu else None
    small = {} if mesh is not None else {
        name: planner.smallest(cfg, context, args.batch, int(size), args.headroom)
        for name, size in (("H100", planner.H100), ("H200", planner.H200))}
    if args.json:
        print(json.dumps({
            "config": args.config, "weights": cfg.weight_dtype, "capacity_factor": cfg.ep_capacity_factor,
            "devices": devices, "device_memory": memory, "context": context, "batch": args.batch,
            "headroom": args.headroom, "plan": best.to_json(),
            "meshes": [{"mesh": list(p.mesh), "total": p.total, "free": p.free, "fits": p.fits,
                        "problems": list(p.problems)} for p in ranked],
            "smallest": {name: {"device_memory": int(getattr(planner, name)), "devices": r["devices"],
                                "mesh": list(r["best"].mesh) if r["best"] else None,
                                "total": r["best"].total if r["best"] else None,
                                "fitting": [list(m) for m in r["fitting"]]}
                         for name, r in small.items()},
            **({"xla_gpu": xla} if xla else {})}, indent=2))
        return 0
    print(f"dsv32 plan: {args.config} ({cfg.weight_dtype} weights, {cfg.dtype} compute, expert-parallel "
          f"capacity {'exact' if cfg.ep_capacity_factor is None else cfg.ep_capacity_factor}), "
          f"{devices} x {memory / 1e9:.1f} GB")
    if mesh is None:
        fitting = [p for p in ranked if p.fits]
        print(f"best mesh of {devices} devices: " + ("the one leaving the most memory free (memory only: a tensor "
                                                     "group is best kept within one host's NVLink)" if fitting
                                                     else "none fits; the closest is shown"))
    print(planner.table(best))
    if xla:
        print(f"XLA:GPU, compiled for an {'H200' if memory > 100e9 else 'H100'} (no GPU; benchmarks/deviceless.py), "
              "per device, GB (the plan's figure in parentheses):")
        for phase in ("decode", "prefill"):
            x, ph = xla[phase], best.phases[phase]
            print(f"  {phase:<8} arguments {planner.gb(x['argument_bytes']):>7} (weights + cache "
                  f"{planner.gb(best.weights['total'] + best.cache)})   temp {planner.gb(x['temp_bytes']):>6} "
                  f"(activations + workspace {planner.gb(ph['total'])})")
    if ranked:
        print(f"meshes of {devices} devices (data,expert,tensor), best first: total / free GB per device")
        for p in ranked:
            state = "fits" if p.fits else ("cannot run: " + p.problems[0] if p.problems else "does not fit")
            print(f"  {','.join(map(str, p.mesh)):>9}  {p.total / 1e9:8.2f}  {p.free / 1e9:8.2f}  {state}")
    for name, r in small.items():
        size = getattr(planner, name) / 1e9
        if r["devices"] is None:
            print(f"smallest {name} ({size:.0f} GB) mesh: none of {planner.SEARCH_COUNTS[-1]} or fewer devices fits")
        else:
            p = r["best"]
            print(f"smallest {name} ({size:.0f} GB) mesh: {r['devices']} devices, best {','.join(map(str, p.mesh))} "
                  f"({p.total / 1e9:.2f} GB per device, {p.free / 1e9:.2f} GB free); fitting: "
                  f"{' '.join(','.join(map(str, m)) for m in r['fitting'])}")
    return 0


# ------------------------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _compile_cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the compiled programs kept in $DSV32_CACHE/xla (default "
                        "~/.cache/dsv32_jax/xla), which spare a later run the compile (JAX's own "
                        "JAX_COMPILATION_CACHE_DIR, when set, still applies)")


def _parser() -> argparse.ArgumentParser:
    from dsv32_jax import argtypes

    parser = argtypes.Parser(prog="dsv32", description="DeepSeek-V3.2 in JAX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p, max_new=64):
        p.add_argument("--max-new-tokens", type=_checked(int, "check_max_new_tokens"), default=max_new,
                       metavar="N", help=f"at most N new tokens (default {max_new})")
        p.add_argument("--temperature", type=_checked(float, "check_temperature"), default=1.0,
                       help="sampling temperature >= 0; 0 = greedy (default 1.0)")
        p.add_argument("--top-p", type=_checked(float, "check_top_p"), default=0.95,
                       help="nucleus mass in (0, 1]; 1 = no cut (default 0.95)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
        p.add_argument("--no-fp8", action="store_true", help="do not simulate FP8 activations")
        p.add_argument("--show-special", action="store_true",
                       help="print special/reserved tokens in the output stream")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        _compile_cache_option(p)

    d = sub.add_parser("demo", help="the tiny trained demo model in a short chat (sparse attention "
                                    "selecting); --random: a random synthetic checkpoint (cached)")
    d.add_argument("--random", action="store_true",
                   help="the architecture with random weights (synthetic checkpoint) instead")
    d.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="with --random")
    d.add_argument("--prompt", default="Explain sparse attention in one sentence.")
    d.add_argument("--cache-dir", default=None, help="with --random; default: $DSV32_CACHE or "
                                                     "~/.cache/dsv32_jax")
    common(d, max_new=32)
    d.set_defaults(temperature=0.0)  # greedy: the trained model's most likely reply
    from dsv32_jax.train.cli import add_parser as add_train

    add_train(sub)
    _compile_cache_option(sub.choices["train"])
    d.set_defaults(func=demo)
    tok_help = "tokenizer.json, or a directory holding one (default: the checkpoint's own)"
    g = sub.add_parser("generate", help="complete one prompt")
    g.add_argument("--ckpt", required=True, help="checkpoint directory (HF layout, or from `dsv32 convert`)")
    g.add_argument("--tokenizer", metavar="PATH", default=None, help=tok_help)
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="no chat template: continue the raw text")
    g.add_argument("--thinking", action="store_true", help="thinking mode chat template")
    common(g)
    g.set_defaults(func=generate)
    c = sub.add_parser("chat", help="interactive chat on stdin (/help, /clear, /exit); continues from the cache of "
                                    "the previous turn, drops the oldest turns when the context is full")
    c.add_argument("--ckpt", required=True, help="checkpoint directory (HF layout, or from `dsv32 convert`)")
    c.add_argument("--tokenizer", metavar="PATH", default=None, help=tok_help)
    c.add_argument("--thinking", action="store_true", help="thinking mode chat template")
    common(c, max_new=256)
    for p in (g, c):
        p.add_argument("--mesh", metavar="D,E,T", default=None, type=argtypes.mesh,
                       help="run sharded on a data,expert,tensor mesh of all devices (e.g. 1,8,1); "
                            "default: one device (several processes: 1,<all devices>,1)")
        p.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="multi-process run: process 0's address (or $DSV32_COORDINATOR)")
        p.add_argument("--num-processes", type=int, metavar="N", default=None,
                       help="multi-process run: how many processes (or $DSV32_NUM_PROCESSES)")
        p.add_argument("--process-id", type=int, metavar="I", default=None,
                       help="multi-process run: this process, 0..N-1 (or $DSV32_PROCESS_ID)")
        p.add_argument("--init-timeout", type=_seconds, metavar="S", default=None,
                       help="multi-process run: seconds for all processes to join (or "
                            "$DSV32_INIT_TIMEOUT; default 120)")
        p.add_argument("--heartbeat-timeout", type=_seconds, metavar="S", default=None,
                       help="multi-process run: seconds of silence after which a process is "
                            "taken for lost (or $DSV32_HEARTBEAT_TIMEOUT; default 60; a process "
                            "that dies is noticed at once)")
    c.set_defaults(func=chat)
    pl = sub.add_parser("plan", help="per-device memory (weights, cache, activations, workspace) of a config "
                                     "on a mesh, and the meshes that fit; nothing is loaded")
    pl.add_argument("--config", default="671b", help="671b | small | tiny (presets), or an HF checkpoint "
                                                     "directory or its config.json (default 671b)")
    pl.add_argument("--devices", type=int, default=None, help="device count (default 8, or the --mesh size)")
    pl.add_argument("--device-memory", default="141GB", metavar="SIZE",
                    help="memory per device: 141GB, 80GiB, 141e9 ... (default 141GB, an H200)")
    pl.add_argument("--context", type=int, default=None, help="cache length in tokens (default: the model's "
                                                              "max_position_embeddings)")
    pl.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    pl.add_argument("--mesh", default=None, metavar="D,E,T", help="data,expert,tensor (default: search them)")
    pl.add_argument("--weights", choices=["fp8", "bf16"], default=None,
                    help="weight format (default: the config's own)")
    pl.add_argument("--capacity-factor", type=float, default=None, metavar="F",
                    help="expert-parallel send buffers of F x the mean load (default: exact, no pick dropped)")
    pl.add_argument("--headroom", type=float, default=0.10,
                    help="share of device memory left to the runtime (default 0.10)")
    pl.add_argument("--xla-gpu", action="store_true",
                    help="also compile the released model on the plan's mesh for an H100 (H200 with "
                         "--device-memory > 100GB) without a GPU and print XLA:GPU's per-device arguments "
                         "and temp beside the plan (needs `make gpu-venv`; minutes)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument("--debug", action="store_true", help="show the traceback of an error")
    pl.set_defaults(func=plan)
    # Listed for --help only: main() hands `dsv32 convert ...` to convert.cli before parsing.
    sub.add_parser("convert", add_help=False,
                   help="convert the released HF checkpoint to Orbax (see `dsv32 convert --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:  # `dsv32 convert ...` is `python -m convert ...`
        from convert.cli import main as convert_main

        return convert_main(argv[1:])
    args = _parser().parse_args(argv)
    prog = f"dsv32 {args.command}"
    if getattr(args, "prompt", None) is not None:
        args.prompt = _decoded(args.prompt, "--prompt")
    try:
        with _compile_cache(hasattr(args, "no_compile_cache") and not args.no_compile_cache):
            return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        return _end(f"{prog}: interrupted", 130)
    except USER_ERRORS as e:
        if args.debug:
            raise
        return _end(f"{prog}: error: {_one_line(e)}", 1)


def _end(line: str, code: int) -> int:
    """Say why the command ends. In a multi-process run the others are told too, and the process
    ends here: JAX's shutdown at exit would wait for them, then abort."""
    _say(line)
    if _joined:
        from sharding.distributed import leave

        leave(line)
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
