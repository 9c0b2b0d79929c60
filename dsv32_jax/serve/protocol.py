"""OpenAI's chat and text completions over token ids, without HTTP or an engine (``serve.http`` joins them):

- ``chat_request`` / ``completion_request``: a request body read and checked -> ``Request`` (the prompt's
  ids, the sampling values, stop strings, streaming); anything wrong is a ``RequestError`` naming the field.
  Chat messages go through our V3.2 encoding (``Tokenizer.encode_chat``: text from the client never becomes a
  control token); OpenAI function tools are attached to the system message, as the encoding takes them;
  ``chat_template_kwargs: {"thinking": true}`` selects thinking mode (as vLLM).
- ``Reply``: a request's generated ids as they come -> deltas (``{"text"}`` for a text completion; for chat
  ``reasoning_content`` / ``content`` / ``tool_calls`` from ``text.stream.StreamParser``), cut at the first
  stop string; ``finish`` says how the reply ended. Text that does not parse as the V3.2 reply format goes
  out as content, as generated.
- The OpenAI objects: stream chunks, whole responses, usage, errors.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
import time
import uuid

from dsv32_jax.engine import checks
from dsv32_jax.text.chat import EOS, THINK_END, ChatFormatError, encode_messages
from dsv32_jax.text.stream import StreamParser
from dsv32_jax.text.tokenizer import TokenizerError

SEED_LIMIT = 1 << 31
MAX_STOPS = 16  # stop strings per request
# Fields we read but cannot honour: refused (400) unless they hold the value that asks for nothing.
_UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
                "best_of": (None, 1), "logit_bias": (None, {}), "presence_penalty": (None, 0),
                "frequency_penalty": (None, 0)}


class RequestError(ValueError):
    """A request that cannot be served: the OpenAI error object's message, param, type and code, and the
    HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.type, self.code = param, status, type, code

    def body(self) -> dict:
        return error_body(str(self), self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool  # generate on past EOS (as vLLM's extension): replies of exactly max_tokens, for benchmarks
    mode: str | None  # the chat's thinking mode ("chat" or "thinking"); None: a text completion


# ------------------------------------------------------------------------------------------------------------
# Reading a request
# ------------------------------------------------------------------------------------------------------------


def _int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value >= high):
        span = f">= {low}" if high is None else f"in [{low}, {high})"
        raise RequestError(f"{name} must be an integer {span}, got {value!r}", name)
    return int(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r}", name)
    return value


def _checked(check, body: dict, name: str, default: float) -> float:
    value = body.get(name)
    try:
        return default if value is None else check(value)
    except ValueError as e:
        raise RequestError(str(e), name) from None


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"stop must be a non-empty string or a list of them, got {stop!r}", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"stop holds {len(stops)} strings; at most {MAX_STOPS} are taken", "stop")
    return tuple(stops)


def _common(body: dict, model: str) -> dict:
    """The fields chat and text completions share, checked -> Request's keyword arguments (no prompt yet)."""
    if body.get("model") is not None and body["model"] != model:
        raise RequestError(f"the model {body['model']!r} does not exist: this server serves {model!r}", "model",
                           code="model_not_found")
    if body.get("n") not in (None, 1):
        raise RequestError(f"only n=1 is supported, got n={body['n']!r}", "n")
    for name, nothing in _UNSUPPORTED.items():
        if body.get(name) not in nothing:
            raise RequestError(f"{name} is not supported by this server (got {body[name]!r})", name)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, got {options!r}", "stream_options")
    return dict(temperature=_checked(checks.check_temperature, body, "temperature", 1.0),
                top_p=_checked(checks.check_top_p, body, "top_p", 1.0),
                seed=random.randrange(SEED_LIMIT) if body.get("seed") is None else _int(body, "seed", 0, SEED_LIMIT),
                stop=_stops(body), stream=_flag(body, "stream"),
                include_usage=_flag(options or {}, "include_usage"), ignore_eos=_flag(body, "ignore_eos"))


def _budget(n_prompt: int, body: dict, names: tuple[str, ...], max_len: int, default: int | None,
            prompt_field: str) -> int:
    """max_tokens (the first of `names` given) checked against the room the prompt leaves in the context;
    absent: `default`, or all the room."""
    if n_prompt < 1:
        raise RequestError("the prompt is empty", prompt_field)
    room = max_len - n_prompt
    if room < 1:
        raise RequestError(f"the prompt is {n_prompt} tokens: it leaves no room for new tokens in the context of "
                           f"{max_len}", prompt_field, code="context_length_exceeded")
    name = next((n for n in names if body.get(n) is not None), names[0])
    n = _int(body, name, 1)
    if n is None:
        return room if default is None else min(default, room)
    if n > room:
        raise RequestError(f"the prompt ({n_prompt} tokens) + {name} ({n}) = {n_prompt + n} tokens exceeds the "
                           f"context of {max_len}: at most {room} new tokens fit", name, code="context_length_exceeded")
    return n


def _text_parts(value, where: str) -> str:
    """Message content as OpenAI sends it: a string, or a list of text parts (joined by newlines)."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RequestError(f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are supported, got "
                               f"{kind!r}", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages must be a non-empty list of messages", "messages")
    out = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            raise RequestError(f"messages[{i}] must be an object, got {msg!r}", "messages")
        msg = dict(msg)
        for key in ("content", "reasoning_content"):
            msg[key] = _text_parts(msg.get(key), f"messages[{i}].{key}")
        out.append(msg)
    return out


def _tools(body: dict) -> list[dict] | None:
    """The request's function tools, None when there are none or tool_choice is "none"."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise RequestError(f"tool_choice {choice!r} is not supported: the model chooses (\"auto\") or gets no "
                           "tools (\"none\")", "tool_choice")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError(f"tools must be a list, got {type(tools).__name__}", "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function" or not isinstance(
                fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                               f"'parameters': ...}}}}, got {tool!r}", "tools")
    return tools if tools and choice != "none" else None


def _with_tools(msgs: list[dict], tools: list[dict] | None) -> list[dict]:
    """The tools go in the first message when it is the system message, else in a system message of their own."""
    if not tools:
        return msgs
    if msgs[0].get("role") == "system":
        return [{**msgs[0], "tools": tools}, *msgs[1:]]
    return [{"role": "system", "content": "", "tools": tools}, *msgs]


def _mode(body: dict) -> str:
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError(f"chat_template_kwargs must be an object, got {kwargs!r}", "chat_template_kwargs")
    thinking = kwargs.get("thinking", False)
    if not isinstance(thinking, bool):
        raise RequestError(f"chat_template_kwargs.thinking must be true or false, got {thinking!r}",
                           "chat_template_kwargs")
    return "thinking" if thinking else "chat"


def _fits(text: str, max_len: int, param: str) -> None:
    """Refuse text too long for the context before it is tokenized (`checks.check_text_bytes`)."""
    try:
        checks.check_text_bytes(text, max_len, "the prompt")
    except ValueError as e:
        raise RequestError(str(e), param, code="context_length_exceeded") from None


def _encoded(encode, *args, param: str) -> list[int]:
    try:
        return encode(*args)
    except TokenizerError as e:  # e.g. a lone surrogate (JSON can carry "\ud800")
        raise RequestError(str(e), param) from None


def chat_request(body: dict, tok, max_len: int, model: str) -> Request:
    """A /v1/chat/completions body -> Request; the prompt is our V3.2 encoding of the messages (and tools)."""
    common = _common(body, model)
    mode = _mode(body)
    msgs = _with_tools(_messages(body), _tools(body))
    try:
        text = encode_messages(msgs, mode)
    except ChatFormatError as e:
        raise RequestError(str(e), "messages") from None
    _fits(text, max_len, "messages")
    ids = _encoded(tok.encode_chat, msgs, mode, param="messages")
    n = _budget(len(ids), body, ("max_completion_tokens", "max_tokens"), max_len, None, "messages")
    return Request(ids, n, mode=mode, **common)


def _prompt_ids(prompt, tok, vocab: int, max_len: int) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        _fits(prompt, max_len, "prompt")
        return _encoded(tok.encode, prompt, param="prompt")
    if isinstance(prompt, list) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        return [int(t) for t in prompt]
    raise RequestError("prompt must be a string or a list of token ids (one prompt: n=1)", "prompt")


def completion_request(body: dict, tok, vocab: int, max_len: int, model: str) -> Request:
    """A /v1/completions body -> Request. A text prompt is read as `dsv32 generate --raw` reads it (control-token
    strings in it are control tokens, no BOS added); max_tokens defaults to 16, as OpenAI's."""
    common = _common(body, model)
    ids = _prompt_ids(body.get("prompt"), tok, vocab, max_len)
    n = _budget(len(ids), body, ("max_tokens",), max_len, 16, "prompt")
    return Request(ids, n, mode=None, **common)


# ------------------------------------------------------------------------------------------------------------
# The reply
# ------------------------------------------------------------------------------------------------------------


class StopCut:
    """Text in pieces -> the same text, cut before the first of the stop strings. A tail that may be the start
    of one is held back until it is decided."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self._keep, self._held = stops, max(map(len, stops), default=1) - 1, ""

    def push(self, text: str) -> tuple[str, bool]:
        """-> (the text that can go out, whether a stop string was met: then nothing may follow)."""
        self._held += text
        at = min((i for i in (self._held.find(s) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            out, self._held = self._held[:at], ""
            return out, True
        n = max(len(self._held) - self._keep, 0)
        out, self._held = self._held[:n], self._held[n:]
        return out, False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class Reply:
    """One request's generated ids -> what to send, as they come. ``push(ids)`` and ``finish(how)`` return
    deltas: ``{"text": ...}`` for a text completion; for chat those of ``StreamParser`` (reasoning_content,
    content, tool_calls). ``cut`` turns true when a stop string was met: the ids after it are ignored (the
    caller cancels the generation). ``tokens``: the ids the reply used (up to the cut). ``stop_ids``: the ids
    that end the generation: EOS, or none with ``ignore_eos`` (then EOS is text like any other id).

    Chat replies are detokenized with the control tokens as text, for the parser; EOS (the engine's stop id)
    is taken from the ids and given to the parser when the reply ends. Text that does not parse (malformed
    markup, a control token in the content) is sent as content, as generated, from where it stopped parsing."""

    def __init__(self, tok, mode: str | None, stops: tuple[str, ...], ignore_eos: bool = False) -> None:
        self._dec = tok.stream(skip_special_tokens=mode is None)
        self.stop_ids = () if ignore_eos else (tok.eos_id,)
        self._eos = None if ignore_eos else tok.eos_id
        self._stop = StopCut(stops)
        self._parser = StreamParser(mode) if mode else None
        self._raw = False  # the text stopped parsing: the rest goes out as content
        self.cut, self.tokens, self.calls = False, 0, 0

    def push(self, ids: list[int]) -> list[dict]:
        text = ""
        for t in ids:
            if self.cut:
                break
            self.tokens += 1
            if self._parser is not None and t == self._eos:
                continue
            out, self.cut = self._stop.push(self._dec.push(t))
            text += out
        return self._deltas(text)

    def finish(self, how: str) -> tuple[list[dict], str]:
        """The reply ended -- how: "stop" (the model's stop id), "length" or "cancelled" -- -> (the last deltas,
        OpenAI's finish_reason: "stop", "length" or, for a chat reply that ended with tool calls, "tool_calls")."""
        deltas = []
        if not self.cut:
            out, self.cut = self._stop.push(self._dec.flush())
            deltas = self._deltas(out if self.cut else out + self._stop.flush())
        ended = how == "stop" and not self.cut  # the model closed its reply
        if self._parser is not None and not self._raw:
            deltas += self._close(ended)
        reason = "stop" if self.cut or how == "stop" else "length"
        return deltas, "tool_calls" if ended and self.calls and not self._raw else reason

    def _deltas(self, text: str) -> list[dict]:
        if not text:
            return []
        if self._parser is None:
            return [{"text": text}]
        if self._raw:
            return [{"content": text}]
        try:
            deltas = self._parser.feed(text)
        except ChatFormatError:
            self._raw = True
            return [{"content": self._parser.pending + text}]
        self.calls += sum("tool_calls" in d for d in deltas)
        return deltas

    def _close(self, ended: bool) -> list[dict]:
        """End the parse: EOS after a whole reply; a reply cut short closes where it stands (the reasoning too).
        What does not close (a tool call cut in the middle) goes out as content."""
        deltas, rest = [], self._parser.pending
        for tail in (EOS,) if ended else (EOS, THINK_END + EOS):
            try:
                deltas = self._parser.feed(tail)
            except ChatFormatError:
                continue
            try:
                deltas += self._parser.finish()
            except ChatFormatError:  # e.g. EOS inside a tool call: read as more of its text, then unterminated
                rest = self._parser.pending.removesuffix(tail)
                break
            self.calls += sum("tool_calls" in d for d in deltas)
            return deltas
        self._raw = True
        self.calls += sum("tool_calls" in d for d in deltas)
        return deltas + ([{"content": rest}] if rest else [])


# ------------------------------------------------------------------------------------------------------------
# OpenAI objects
# ------------------------------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _head(rid: str, model: str, obj: str, created: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model}


def chunk(rid: str, model: str, created: int, delta: dict | None, finish: str | None = None) -> dict:
    """A stream chunk: a chat delta (or {} with the finish_reason), or a text completion's {"text"}."""
    if rid.startswith("chatcmpl-"):
        choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        return {**_head(rid, model, "chat.completion.chunk", created), "choices": [choice]}
    choice = {"index": 0, "text": (delta or {}).get("text", ""), "logprobs": None, "finish_reason": finish}
    return {**_head(rid, model, "text_completion", created), "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, use: dict) -> dict:
    obj = "chat.completion.chunk" if rid.startswith("chatcmpl-") else "text_completion"
    return {**_head(rid, model, obj, created), "choices": [], "usage": use}


def message(deltas: list[dict], mode: str) -> dict:
    """The assistant message that chat deltas add up to (tool calls without their stream index)."""
    calls = [{k: v for k, v in d["tool_calls"][0].items() if k != "index"} for d in deltas if "tool_calls" in d]
    content = "".join(d.get("content", "") for d in deltas)
    msg = {"role": "assistant", "content": content or (None if calls else "")}
    if mode == "thinking":
        msg["reasoning_content"] = "".join(d.get("reasoning_content", "") for d in deltas)
    if calls:
        msg["tool_calls"] = calls
    return msg


def response(rid: str, model: str, created: int, mode: str | None, deltas: list[dict], finish: str,
             use: dict) -> dict:
    """A whole (non-streamed) chat.completion or text_completion."""
    if mode is None:
        choice = {"index": 0, "text": "".join(d["text"] for d in deltas), "logprobs": None, "finish_reason": finish}
        return {**_head(rid, model, "text_completion", created), "choices": [choice], "usage": use}
    choice = {"index": 0, "message": message(deltas, mode), "logprobs": None, "finish_reason": finish}
    return {**_head(rid, model, "chat.completion", created), "choices": [choice], "usage": use}


def now() -> int:
    return int(time.time())


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
