"""`dsv32 chat`: an interactive chat on stdin; each turn continues from the cache of the previous one, and
the oldest turns are dropped when the context is full."""

from __future__ import annotations

import argparse
import re
import sys

from dsv32_jax.cli import common


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="interactive chat on stdin (/help, /clear, /exit); continues from the cache of "
                                    "the previous turn, drops the oldest turns when the context is full")
    common.checkpoint_options(c)
    c.add_argument("--thinking", action="store_true", help="thinking mode chat template")
    common.run_options(c, max_new=256)
    common.mesh_options(c)
    c.set_defaults(func=run)


PROMPT = "> "


def _read_line() -> str:
    """One line of stdin ("" at its end), after the prompt marker when a person types (stdin is a
    terminal; piped input gets none, so that stdout holds only the replies)."""
    if not common.quiet and sys.stdin.isatty():
        print(PROMPT, end="", flush=True)
    return sys.stdin.readline()


def _lines():
    """The chat's input lines: stdin, or in a multi-process run process 0's stdin sent to all. Bytes that are
    not valid UTF-8 are read as U+FFFD (said once), whatever the locale."""
    import jax

    if hasattr(sys.stdin, "reconfigure"):  # keep undecodable bytes (as lone surrogates) for common.decoded
        sys.stdin.reconfigure(errors="surrogateescape")
    if jax.process_count() == 1:
        for line in iter(_read_line, ""):
            yield common.decoded(line, "stdin")
        return
    import numpy as np
    from jax.experimental import multihost_utils

    while True:
        data = b""
        if jax.process_index() == 0:
            line = _read_line()
            data = common.decoded(line, "stdin").encode() if line else b""
        n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if data else -1)))
        if n < 0:
            return
        buf = np.frombuffer(data, np.uint8) if data else np.zeros(n, np.uint8)
        yield bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode()


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


def run(args: argparse.Namespace) -> int:
    common.join(args)
    _, tok = common.open_checkpoint(args)
    session = common.chat_session(common.load_weights(args.ckpt, args), args)
    mode = "thinking" if args.thinking else "chat"
    convo = Conversation(tok, mode, session.max_len)
    common.say(f"chat ({mode} mode, context {session.max_len} tokens). /help lists the commands, /exit quits.")
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
                common.say("(conversation cleared)")
            else:
                common.say(CHAT_HELP if text == "/help" else f"(unknown command {text!r}: /help lists the commands)")
            continue
        try:
            context, n, notes = convo.plan({"role": "user", "content": text}, args.max_new_tokens)
        except ValueError as e:
            common.say(f"({e})")
            continue
        for note in notes:
            common.say(note)
        new_ids = session.prepare(context)
        try:
            reply, stats = common.stream_reply(session, tok, new_ids, n, args)
        except KeyboardInterrupt:  # stop this reply, keep the conversation without this turn
            common.say("(interrupted: this message and its partial reply are dropped from the conversation)")
            continue
        result = convo.add_reply(reply)
        if result["note"]:
            common.say(result["note"])
        common.say(common.rates(stats))
    return 0
