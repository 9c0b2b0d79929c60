"""DeepSeek-V3.2 chat prompt format (the release ships code, not a Jinja template).

``encode_messages`` turns OpenAI-style messages into the exact prompt string; ``render_messages`` gives the same
prompt as pieces, where what came from the messages (``Content``) is told apart from the template's own markup, so
that a tokenizer can read content as plain text (``Tokenizer.encode_chat``); ``parse_message_from_completion_text``
turns generated text back into an assistant message, by ``CompletionParser``, which reads it in pieces as it is
generated (``dsv32_jax.text.stream`` makes OpenAI stream deltas of it). Layout of a conversation::

    BOS system[tools block]  <｜User｜>question<｜Assistant｜><think>   (or </think>)
    reasoning</think>answer-or-empty[\\n\\n<｜DSML｜function_calls>...</｜DSML｜function_calls>]EOS
    \\n\\n<function_results>\\n<result>...</result>...\\n</function_results>\\n\\n<think>   (or </think>)

A turn opens thinking (``<think>``) only in thinking mode and only from the last user/developer message on,
unless ``drop_thinking=False`` keeps every earlier turn's reasoning too. Pure standard library.
"""

from __future__ import annotations

import json
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
# Control tokens of the format; each is one added token of the V3.2 vocabulary (BOS=0, EOS=1).
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END]

# DSML tool-call markup. "｜DSML｜" is written with fullwidth bars like the tokens above, but it is markup
# text, not listed in SPECIAL_TOKENS.
DSML = "｜DSML｜"
FUNCTION_CALLS_START = f"<{DSML}function_calls>"
FUNCTION_CALLS_END = f"</{DSML}function_calls>"
INVOKE_START = f"<{DSML}invoke"
INVOKE_END = f"</{DSML}invoke>"
PARAMETER_START = f"<{DSML}parameter"
PARAMETER_END = f"</{DSML}parameter>"
FUNCTION_RESULTS_START = "<function_results>"
FUNCTION_RESULTS_END = "</function_results>"

THINKING_MODES = ("chat", "thinking")
_USER_ROLES = ("user", "developer")
_CALLS_OPENER = "\n\n" + FUNCTION_CALLS_START  # how a tool-call block follows the assistant's content
_DEVELOPER_QUERY = "\n\n# The user's message is: "
_RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
_TOOLS_HEADER = f"""## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "{FUNCTION_CALLS_START}" block like the following as part of your reply to \
the user:
{FUNCTION_CALLS_START}
{INVOKE_START} name="$FUNCTION_NAME">
{PARAMETER_START} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_END}
...
{INVOKE_END}
{INVOKE_START} name="$FUNCTION_NAME2">
...
{INVOKE_END}
{FUNCTION_CALLS_END}

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects \
should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for \
other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking \
block. Here is an example:

{FUNCTION_CALLS_START}
...
{FUNCTION_CALLS_END}

{FUNCTION_RESULTS_START}
...
{FUNCTION_RESULTS_END}

{THINK_START}...thinking about results{THINK_END}

Here are the functions available in JSONSchema format:
<functions>
"""


class ChatFormatError(ValueError):
    """A message list that cannot be encoded, or a completion that does not follow the format."""


class Content(str):
    """A piece of a rendered prompt that came from a message (content, reasoning, tool names, arguments and
    schemas): text, whatever control-token strings it holds. Every other piece is the template's markup."""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _is_thinking(thinking_mode: str) -> bool:
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    return thinking_mode == "thinking"


# ----------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------


def _role(msg: Any) -> str:
    if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
        raise ChatFormatError(f"each message must be a dict with a string 'role', got {msg!r}")
    return msg["role"]


def _text(msg: dict, what: str = "content") -> str:
    value = msg.get(what)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ChatFormatError(f"{msg['role']} message {what} must be a string, got {type(value).__name__}")
    return value


def _attachments(msg: dict) -> list[str]:
    """The tools block and the response-format block a system/developer message carries, each after a blank line."""
    out = []
    if msg.get("tools"):
        try:
            schemas = [_json(tool["function"]) for tool in msg["tools"]]
        except (KeyError, TypeError):
            raise ChatFormatError("tools must look like [{'type': 'function', 'function': {...}}, ...]") from None
        out += ["\n\n" + _TOOLS_HEADER, Content("\n".join(schemas)), "\n</functions>\n"]
    if msg.get("response_format"):
        out += ["\n\n" + _RESPONSE_FORMAT_HEADER, Content(_json(msg["response_format"]))]
    return out


def _encode_invoke(call: Any) -> list[str]:
    """One OpenAI tool call as a DSML invoke; strings go verbatim (string="true"), other values as JSON."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatFormatError(f"tool call must be {{'function': {{'name': ..., 'arguments': ...}}}}, got {call!r}")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as err:
            raise ChatFormatError(f"arguments of tool call {fn['name']!r} are not valid JSON: {err}") from None
    if not isinstance(args, dict):
        raise ChatFormatError(f"arguments of tool call {fn['name']!r} must be a JSON object, got {args!r}")
    out = [f'{INVOKE_START} name="', Content(fn["name"]), '">\n']
    for i, (key, value) in enumerate(args.items()):
        text = isinstance(value, str)
        out += ["\n" if i else "", f'{PARAMETER_START} name="', Content(key),
                f'" string="{"true" if text else "false"}">', Content(value if text else _json(value)), PARAMETER_END]
    return [*out, f"\n{INVOKE_END}"]


def _encode_assistant(msg: dict, show_reasoning: bool, needs_reasoning: bool) -> list[str]:
    calls = msg.get("tool_calls") or []
    reasoning = _text(msg, "reasoning_content")
    if needs_reasoning and not (reasoning or calls):
        raise ChatFormatError(
            "in thinking mode an assistant message after the last user message needs reasoning_content or tool_calls"
        )
    out = [Content(reasoning), THINK_END] if show_reasoning else []
    out.append(Content(_text(msg)))
    if calls:
        out.append(f"{_CALLS_OPENER}\n")
        for i, call in enumerate(calls):
            out += ["\n" if i else "", *_encode_invoke(call)]
        out.append(f"\n{FUNCTION_CALLS_END}")
    return [*out, EOS]


def _encode_tool_result(convo: list[dict], i: int, think_tag: str) -> list[str]:
    """The i-th message, a tool result: the n-th answer to the tool calls of the nearest assistant before it."""
    j = i - 1
    while j >= 0 and _role(convo[j]) == "tool":
        j -= 1
    calls = convo[j].get("tool_calls") if j >= 0 and _role(convo[j]) == "assistant" else None
    if not calls:
        raise ChatFormatError(f"tool message #{i} does not follow an assistant message with tool_calls")
    n = i - j
    if n > len(calls):
        raise ChatFormatError(f"tool message #{i} is result {n}, but the assistant made only {len(calls)} tool call(s)")
    out = [("\n\n" + FUNCTION_RESULTS_START if n == 1 else "") + "\n<result>", Content(_text(convo[i])), "</result>"]
    if n == len(calls):
        return [*out, f"\n{FUNCTION_RESULTS_END}\n\n", think_tag]
    if i + 1 < len(convo) and _role(convo[i + 1]) != "tool":
        raise ChatFormatError(f"message #{i + 1} comes before all {len(calls)} tool results were given")
    return out


def _encode_one(convo: list[dict], i: int, think: bool, needs_reasoning: bool) -> list[str]:
    msg = convo[i]
    role = _role(msg)
    if msg.get("tools") and role not in ("system", "developer"):
        raise ChatFormatError(f"tools can be attached to a system or developer message, not to a {role} message")
    think_tag = THINK_START if think else THINK_END
    if role == "system":
        return [Content(_text(msg)), *_attachments(msg)]
    if role == "user":
        return [USER, Content(_text(msg)), ASSISTANT, think_tag]
    if role == "developer":
        if not _text(msg):
            raise ChatFormatError("a developer message needs non-empty content (the user's query)")
        return [USER, *_attachments(msg), _DEVELOPER_QUERY, Content(_text(msg)), ASSISTANT, think_tag]
    if role == "tool":
        return _encode_tool_result(convo, i, think_tag)
    if role == "assistant":
        return _encode_assistant(msg, think, needs_reasoning)
    raise ChatFormatError(f"unknown role {role!r}; expected system, developer, user, assistant or tool")


def render_messages(
    messages: list[dict],
    thinking_mode: str = "thinking",
    context: list[dict] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
) -> list[str]:
    """The prompt of ``encode_messages`` (same arguments) as pieces that join to it: the pieces that came from
    the messages are ``Content``; the others are the template's markup, where alone control tokens belong."""
    thinking = _is_thinking(thinking_mode)
    convo = [*(context or []), *messages]
    last_user = max((i for i, msg in enumerate(convo) if _role(msg) in _USER_ROLES), default=-1)
    start = len(convo) - len(messages)
    out = [BOS] if add_default_bos_token and start == 0 else []
    for i in range(start, len(convo)):
        think = thinking and (not drop_thinking or i >= last_user)
        out += _encode_one(convo, i, think, needs_reasoning=thinking and i > last_user)
    return out


def encode_messages(
    messages: list[dict],
    thinking_mode: str = "thinking",
    context: list[dict] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
) -> str:
    """Encode OpenAI-style ``messages`` into the V3.2 prompt string (to tokenize it, ``Tokenizer.encode_chat``).

    ``context``: earlier messages already in the prompt; only ``messages`` are encoded (no BOS), rendered as they
    would be at the end of ``context + messages``. ``drop_thinking``: earlier turns' reasoning is left out (the
    official behaviour); with False, turns before the last user message keep ``<think>reasoning</think>`` too, so
    the prompt only ever grows by appending. Tools go in ``messages[i]["tools"]`` of a system/developer message.
    """
    return "".join(render_messages(messages, thinking_mode, context, drop_thinking, add_default_bos_token))


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------


_FORBIDDEN = (*SPECIAL_TOKENS, DSML)  # never inside reasoning or content
_REASONING_TOKENS = _FORBIDDEN  # THINK_END ends the reasoning; any other is an error
_CONTENT_TOKENS = (*_FORBIDDEN, _CALLS_OPENER)  # EOS or the opener ends the content; any other is an error
_EXCERPT = 40  # characters of offending text an error quotes


class _NeedMore(Exception):
    """The completion so far stops where the next decision needs more of it (only while more may come)."""


class _Reader:
    """A cursor over completion text; every unmet expectation raises ChatFormatError. Unless ``final``, the text
    may yet grow: whatever more text could change (a literal cut off at the end, an error's excerpt still short)
    raises _NeedMore instead, so that a decision made is the one the whole text would give."""

    def __init__(self, text: str, pos: int, final: bool = True) -> None:
        self.text, self.pos, self.final = text, pos, final

    def at(self, literal: str) -> bool:
        if self.text.startswith(literal, self.pos):
            return True
        if not self.final and literal.startswith(self.text[self.pos :]):
            raise _NeedMore
        return False

    def excerpt(self) -> str:
        if not self.final and len(self.text) - self.pos < _EXCERPT:
            raise _NeedMore
        return repr(self.text[self.pos : self.pos + _EXCERPT])

    def expect(self, literal: str, where: str) -> None:
        if not self.at(literal):
            if self.pos >= len(self.text):
                raise ChatFormatError(f"unterminated tool call: the text ends where {literal!r} was expected {where}")
            raise ChatFormatError(f"expected {literal!r} {where}, found {self.excerpt()}")
        self.pos += len(literal)

    def until(self, literal: str, where: str) -> str:
        end = self.text.find(literal, self.pos)
        if end < 0:
            if not self.final:
                raise _NeedMore
            raise ChatFormatError(f"unterminated tool call: expected {literal!r} {where}")
        out, self.pos = self.text[self.pos : end], end + len(literal)
        return out


def _name(value: str, what: str) -> str:
    if not value or any(c in value for c in '"<>\n'):
        raise ChatFormatError(f"malformed {what} {value[:60]!r} in the tool-call block")
    return value


def _parse_invoke(reader: _Reader) -> dict:
    reader.expect(f'{INVOKE_START} name="', f"(an invoke or {FUNCTION_CALLS_END!r})")
    name = _name(reader.until('">\n', "after the tool name"), "tool name")
    args: dict[str, Any] = {}
    while reader.at(PARAMETER_START):
        reader.expect(f'{PARAMETER_START} name="', "to start a parameter")
        key = _name(reader.until('" string="', "after the parameter name"), "parameter name")
        flag = reader.until('">', f"after the string attribute of parameter {key!r}")
        raw = reader.until(PARAMETER_END, f"to close parameter {key!r}")
        reader.expect("\n", f"after parameter {key!r}")
        if flag not in ("true", "false"):
            raise ChatFormatError(f'parameter {key!r} has string="{flag[:20]}", expected "true" or "false"')
        if DSML in raw:
            raise ChatFormatError(f"parameter {key!r} runs into DSML markup: {raw[:60]!r}")
        if key in args:
            raise ChatFormatError(f"duplicate parameter {key!r} in the call to {name!r}")
        try:
            args[key] = raw if flag == "true" else json.loads(raw)
        except json.JSONDecodeError:
            raise ChatFormatError(f'parameter {key!r} has string="false" but is not JSON: {raw[:60]!r}') from None
    if not args:
        reader.expect("\n", f"in the argument-less call to {name!r}")
    reader.expect(INVOKE_END + "\n", f"(a parameter or the end of the call to {name!r})")
    return {"type": "function", "function": {"name": name, "arguments": _json(args)}}


def _parse_call(reader: _Reader, first: bool) -> dict | None:
    """The next invoke of a tool-call block, or None at the block's end (after at least one invoke)."""
    if not first and reader.at(FUNCTION_CALLS_END):
        reader.pos += len(FUNCTION_CALLS_END)
        return None
    return _parse_invoke(reader)


def _scan(text: str, pos: int, tokens: tuple[str, ...], final: bool) -> tuple[int, str | None]:
    """The first of ``tokens`` in ``text`` from ``pos``: (where it starts, it). Without one: (where the decided
    text ends, None), which is the text's end, or, unless ``final``, where a tail starts that may become a token."""
    hits = [(at, token) for token in tokens if (at := text.find(token, pos)) >= 0]
    first = min(hits, default=(len(text), None))
    if final:
        return first
    start = max(pos, len(text) - max(map(len, tokens)) + 1)
    tail = next((q for q in range(start, len(text)) if any(len(text) - q < len(t) and t.startswith(text[q:])
                                                           for t in tokens)), len(text))
    return first if first[0] < tail else (tail, None)


class CompletionParser:
    """Parses a completion (the generated text after the prompt) piece by piece, as it is generated.

    ``feed(piece)`` reads on as far as the text so far decides and returns what it decided, in text order:
    ``("reasoning_content", text)``, ``("content", text)`` and ``("tool_calls", call)`` parts, each final
    whatever text follows (text that may yet become markup is held back until it is decided: ``pending``);
    ``close()`` reads to the end and returns the rest; then ``message()`` is the whole message. A ChatFormatError
    is raised as soon as it is certain (by ``close()`` at the latest), at the first place where the text departs
    from the format, with the same message wherever the text was cut; the call that raises it changes nothing
    (the parser is as before it, so a caller may feed something else or give up and use ``pending`` as it is).
    The grammar, left to right, the reasoning in thinking mode only::

        [reasoning</think>] content [\\n\\n<｜DSML｜function_calls>\\n invoke... </｜DSML｜function_calls>] EOS

    EOS may be absent only after a tool-call block; no control token and no DSML markup may stand in
    reasoning or content.
    """

    def __init__(self, thinking_mode: str) -> None:
        self._text, self._pos = "", 0  # the text after what the last feed read; where the next step reads in it
        self._parts: list[tuple[str, Any]] = []
        self._step = self._reasoning if _is_thinking(thinking_mode) else self._content
        self._calls_read, self._closed = 0, False

    @property
    def pending(self) -> str:
        """The text fed but not decided yet (not in any part returned so far)."""
        return self._text[self._pos :]

    def feed(self, piece: str) -> list[tuple[str, Any]]:
        if self._closed:
            raise RuntimeError("CompletionParser.feed() after close()")
        return self._advance(piece, final=False)

    def close(self) -> list[tuple[str, Any]]:
        parts = self._advance("", final=True)
        self._closed = True
        return parts

    def message(self) -> dict:
        """The assistant message (tool calls without ids), after ``close()``."""
        if not self._closed:
            raise RuntimeError("CompletionParser.message() before close()")
        text = {field: "".join(v for f, v in self._parts if f == field) for field in ("content", "reasoning_content")}
        return {"role": "assistant", **text, "tool_calls": [v for f, v in self._parts if f == "tool_calls"]}

    def _advance(self, piece: str, final: bool) -> list[tuple[str, Any]]:
        known, before = len(self._parts), (self._text, self._pos, self._step, self._calls_read)
        self._text += piece
        while True:
            pos, step = self._pos, self._step
            try:
                step(final)
            except _NeedMore:
                break
            except ChatFormatError:
                del self._parts[known:]
                self._text, self._pos, self._step, self._calls_read = before
                raise
            if (self._pos, self._step) == (pos, step):
                break
        self._text, self._pos = self._text[self._pos :], 0
        return self._parts[known:]

    def _reader(self, final: bool) -> _Reader:
        return _Reader(self._text, self._pos, final)

    def _upto(self, field: str, tokens: tuple[str, ...], final: bool) -> str | None:
        """Read ``field`` text up to its first token (returned, not read) or as far as it is decided (None)."""
        at, token = _scan(self._text, self._pos, tokens, final)
        if at > self._pos:
            self._parts.append((field, self._text[self._pos : at]))
            self._pos = at
        return token

    def _reasoning(self, final: bool) -> None:
        token = self._upto("reasoning_content", _REASONING_TOKENS, final)
        if token == THINK_END:
            self._pos += len(token)
            self._step = self._content
        elif token == EOS or (token is None and final):
            raise ChatFormatError(f"a thinking-mode completion must close its reasoning with {THINK_END!r}")
        elif token is not None:
            raise ChatFormatError(f"unexpected {token!r} inside reasoning_content")

    def _content(self, final: bool) -> None:
        token = self._upto("content", _CONTENT_TOKENS, final)
        if token == EOS:
            self._pos += len(token)
            self._step = self._done
        elif token == _CALLS_OPENER:
            self._pos += 2  # the blank line; the block starts after it
            self._step = self._open_calls
        elif token is None and final:
            raise ChatFormatError(f"a completion without tool calls must end with {EOS!r}")
        elif token is not None:
            raise ChatFormatError(f"unexpected {token!r} inside content")

    def _open_calls(self, final: bool) -> None:
        reader = self._reader(final)
        reader.expect(FUNCTION_CALLS_START + "\n", "to open the tool-call block")
        self._pos, self._step = reader.pos, self._calls

    def _calls(self, final: bool) -> None:
        reader = self._reader(final)
        call = _parse_call(reader, first=not self._calls_read)
        self._pos = reader.pos
        if call is None:
            self._step = self._eos_after_calls
        else:
            self._parts.append(("tool_calls", call))
            self._calls_read += 1

    def _eos_after_calls(self, final: bool) -> None:
        reader = self._reader(final)
        if reader.pos < len(self._text) or not final:
            reader.expect(EOS, f"after {FUNCTION_CALLS_END!r}")
        self._pos, self._step = reader.pos, self._done

    def _done(self, final: bool) -> None:
        if self._pos < len(self._text):
            raise ChatFormatError(f"unexpected text after {EOS!r}: {self._reader(final).excerpt()}")


def parse_message_from_completion_text(text: str, thinking_mode: str) -> dict:
    """Parse generated text (everything after the prompt) into an OpenAI-style assistant message.

    Thinking mode expects ``reasoning</think>``; then the answer, an optional DSML tool-call block after a blank
    line, and EOS (which may be absent only right after a tool-call block). Returns ``role``, ``content``,
    ``reasoning_content`` and ``tool_calls`` (without ids); raises ChatFormatError on anything else, at the first
    place where the text departs from the format. The same parser reads a completion while it streams
    (``CompletionParser``, ``dsv32_jax.text.stream``).
    """
    parser = CompletionParser(thinking_mode)
    parser.feed(text)
    parser.close()
    return parser.message()
