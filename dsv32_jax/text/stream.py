"""An assistant reply as OpenAI chat-completion stream deltas, while it is generated.

``StreamParser(thinking_mode)`` is fed the completion's text in pieces (as it is detokenized); ``feed`` and
``finish`` return the ``delta`` objects of the chunks to send, in text order::

    {"reasoning_content": "..."}    {"content": "..."}
    {"tool_calls": [{"index": i, "id": "call_...", "type": "function",
                     "function": {"name": "...", "arguments": "{...}"}}]}

A tool call is sent whole, in one delta, once its invoke has been read to ``</｜DSML｜invoke>`` (OpenAI may
send a name first and the arguments in pieces; clients accumulate either way): the call goes out only after
it parsed. The parsing is ``chat.CompletionParser``, the one parser of ``parse_message_from_completion_text``:
text that may still become markup (the start of the tool-call opener, of ``</think>``, of EOS or another
control token) is held back until it is decided, so no markup reaches ``content`` or ``reasoning_content``
however the text is cut, and the deltas join to the non-streamed parse of the whole text. Malformed text
raises the same ChatFormatError as the non-streamed parse, from ``feed`` as soon as it is certain or from
``finish``, and leaves the parser as it was before that call (``pending`` is the text not sent). After
``finish``, ``message`` is the whole assistant message, its tool calls with the ids sent.
"""

from __future__ import annotations

import uuid
from typing import Any

from dsv32_jax.text.chat import CompletionParser


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class StreamParser:
    def __init__(self, thinking_mode: str) -> None:
        self._parser = CompletionParser(thinking_mode)
        self._ids: list[str] = []
        self.message: dict | None = None

    @property
    def pending(self) -> str:
        """The text fed but not sent yet: what may still become markup (``CompletionParser.pending``)."""
        return self._parser.pending

    def feed(self, piece: str) -> list[dict]:
        return self._deltas(self._parser.feed(piece))

    def finish(self) -> list[dict]:
        deltas = self._deltas(self._parser.close())
        msg = self._parser.message()
        calls = [{"id": i, **call} for i, call in zip(self._ids, msg["tool_calls"], strict=True)]
        self.message = {**msg, "tool_calls": calls}
        return deltas

    def _deltas(self, parts: list[tuple[str, Any]]) -> list[dict]:
        out = []
        for field, value in parts:
            if field == "tool_calls":
                self._ids.append(_call_id())
                value = [{"index": len(self._ids) - 1, "id": self._ids[-1], **value}]
            out.append({field: value})
        return out
