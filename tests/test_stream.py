"""Tests for dsv32_jax.text.stream: a completion fed in pieces, cut anywhere, streams deltas that join to the
non-streamed parse, never carry markup, come as soon as the text decides them, and fail as the parse fails."""

from __future__ import annotations

import json
import random

import pytest

from dsv32_jax.text.chat import (
    DSML,
    EOS,
    FUNCTION_CALLS_END,
    FUNCTION_CALLS_START,
    INVOKE_END,
    SPECIAL_TOKENS,
    THINK_END,
    ChatFormatError,
    encode_messages,
    parse_message_from_completion_text,
)
from dsv32_jax.text.stream import StreamParser

MARKUP = (*SPECIAL_TOKENS, DSML)
HOLD = len("\n\n" + FUNCTION_CALLS_START)  # the longest markup a tail of text may be the start of


def _call(name: str, args: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _reply(mode: str, content: str, reasoning: str = "", calls: tuple = ()) -> str:
    """The completion text the model writes for this assistant message (the chat encoder's rendering)."""
    msg = {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": list(calls)}
    return encode_messages([msg], mode, context=[{"role": "user", "content": "q"}])


WEATHER = _call("get_weather", {"city": "Zürich", "days": 3})
SEARCH = _call("search", {"query": "a <b> & \"c\"\n</think", "filters": {"year": [2024, 2025], "exact": True},
                          "limit": 0.5})
CASES = {
    "plain": ("chat", _reply("chat", "Hello, world! 1 < 2 and 3 > 2.")),
    "thinking": ("thinking", _reply("thinking", "The answer is 4.", "2 + 2: count up.\n\nSo 4.")),
    "one-call": ("chat", _reply("chat", "Let me check.", calls=(WEATHER,))),
    "two-calls": ("thinking", _reply("thinking", "Two lookups:", "need both", calls=(WEATHER, SEARCH))),
    "two-calls-no-eos": ("chat", _reply("chat", "", calls=(SEARCH, WEATHER)).removesuffix(EOS)),
    "thinking-call": ("thinking", _reply("thinking", "", "call it", calls=(_call("now", {}),))),
    "near-misses": ("thinking", _reply(
        "thinking",
        f"x <｜DSM y\n\n<｜DSM z \n\n<｜ {THINK_END[:-1]} <｜end▁of <｜User w ｜DSM\n\n<",
        "r </thi <｜Assist <｜DSML \n\n <",
    )),
    "near-miss-call": ("chat", _reply("chat", "see:\n\n<｜DS\n\n", calls=(WEATHER,))),
}


def _splits(text: str, seed: int):
    """Every cut into two pieces, one character at a time, and seeded random cuts into 3-12 pieces."""
    for k in range(len(text) + 1):
        yield [text[:k], text[k:]]
    yield list(text)
    rng = random.Random(seed)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(2, min(11, len(text) - 1))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def _stream(mode: str, pieces: list[str]) -> tuple[list[list[dict]], StreamParser]:
    """The deltas of each feed, then of finish, as lists."""
    parser = StreamParser(mode)
    return [*(parser.feed(p) for p in pieces), parser.finish()], parser


def _join(deltas: list[dict]) -> dict:
    """A client's accumulation of the deltas into a message (tool calls by index, without ids)."""
    out = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}
    for delta in deltas:
        (field, value), = delta.items()
        if field == "tool_calls":
            (call,) = value
            assert call["index"] == len(out["tool_calls"])
            out["tool_calls"].append({"type": call["type"], "function": call["function"]})
        else:
            assert isinstance(value, str) and value
            assert not any(token in value for token in MARKUP), delta
            out[field] += value
    return out


def _decided(text: str, mode: str, msg: dict) -> list[int]:
    """For each prefix length k: the reasoning + content characters that lie in text[:k] (their places are
    fixed by the format: reasoning first, then </think> in thinking mode, then the content)."""
    spans = [(0, len(msg["reasoning_content"]))] if mode == "thinking" else []
    start = len(msg["reasoning_content"]) + len(THINK_END) if mode == "thinking" else 0
    spans.append((start, start + len(msg["content"])))
    return [sum(min(max(k - a, 0), b - a) for a, b in spans) for k in range(len(text) + 1)]


@pytest.mark.parametrize("name", list(CASES))
def test_deltas_join_to_the_non_streamed_parse_wherever_the_text_is_cut(name):
    mode, text = CASES[name]
    expected = parse_message_from_completion_text(text, mode)
    assert len(expected["tool_calls"]) == text.count(INVOKE_END)
    for pieces in _splits(text, seed=len(text)):
        per_feed, parser = _stream(mode, pieces)
        deltas = [d for feed in per_feed for d in feed]
        assert _join(deltas) == expected, pieces
        ids = [d["tool_calls"][0]["id"] for d in deltas if "tool_calls" in d]
        assert [c["id"] for c in parser.message["tool_calls"]] == ids and len(set(ids)) == len(ids)
        assert {k: v for k, v in parser.message.items() if k != "tool_calls"} == {
            k: v for k, v in expected.items() if k != "tool_calls"}


@pytest.mark.parametrize("name", list(CASES))
def test_text_goes_out_as_soon_as_it_cannot_be_markup(name):
    """Fed text[:k], the stream has given all reasoning/content in it but a tail shorter than the longest
    markup, and every tool call whose invoke has closed: nothing waits for finish()."""
    mode, text = CASES[name]
    expected = parse_message_from_completion_text(text, mode)
    decided = _decided(text, mode, expected)
    ends = [i + len(INVOKE_END) + 1 for i in range(len(text)) if text.startswith(INVOKE_END, i)]
    parser, sent, calls = StreamParser(mode), 0, 0
    for k, ch in enumerate(text, 1):
        for delta in parser.feed(ch):
            calls += "tool_calls" in delta
            sent += len(delta.get("content", "") + delta.get("reasoning_content", ""))
        assert sent >= decided[k] - (HOLD - 1), (k, text[:k])
        assert calls == sum(e <= k for e in ends), (k, text[:k])


def test_markup_cut_anywhere_is_held_back_then_released_when_it_is_not_markup():
    """The feed that ends in a maybe-markup tail gives nothing of it; the next character decides."""
    for tail in ("<", "\n", "\n\n<｜DSM", "</thi", "<｜end▁of▁sent", "｜DSM"):
        parser = StreamParser("chat")
        assert parser.feed("ok " + tail) == [{"content": "ok "}]
        assert parser.feed("!") == [{"content": tail + "!"}]
    parser = StreamParser("thinking")
    assert parser.feed("r</thi") == [{"reasoning_content": "r"}]
    assert parser.feed("nk>") == []
    assert parser.feed("a\n\n<｜DSML") == [{"content": "a"}]
    assert parser.feed(FUNCTION_CALLS_START[len("<｜DSML"):] + "\n") == []


BLOCK = f"\n\n{FUNCTION_CALLS_START}\n"
INVOKE = f'<{DSML}invoke name="f">\n<{DSML}parameter name="a" string="true">x</{DSML}parameter>\n{INVOKE_END}\n'
MALFORMED = {
    "unterminated-parameter": ("thinking", f"r{THINK_END}{BLOCK}{INVOKE[:60]}"),
    "unterminated-block": ("chat", f"{BLOCK}{INVOKE}"),
    "missing-eos": ("chat", "an answer that never ends"),
    "missing-think-end": ("thinking", "reasoning that never ends"),
    "eos-inside-reasoning": ("thinking", f"reasoning{EOS}"),
    "garbage-in-invoke": ("chat", f'{BLOCK}<{DSML}invoke name="f">\nhello there\n{INVOKE_END}\n{FUNCTION_CALLS_END}'),
    "bad-string-flag": ("chat", f"{BLOCK}{INVOKE.replace('true', 'maybe')}{FUNCTION_CALLS_END}{EOS}"),
    "non-json-value": ("chat", f"{BLOCK}{INVOKE.replace('true', 'false')}{FUNCTION_CALLS_END}{EOS}"),
    "empty-block": ("chat", f"{BLOCK}{FUNCTION_CALLS_END}{EOS}"),
    "text-after-block": ("chat", f"{BLOCK}{INVOKE}{FUNCTION_CALLS_END} and then some more words{EOS}"),
    "text-after-eos": ("chat", f"done{EOS}more text after the end of the sentence, long enough to be cut"),
    "block-without-blank-line": ("chat", f"a\n{FUNCTION_CALLS_START}\n{INVOKE}{FUNCTION_CALLS_END}{EOS}"),
    "think-end-in-content": ("chat", f"a{THINK_END}b{EOS}"),
    "dsml-in-reasoning": ("thinking", f"r <{DSML}invoke{THINK_END}a{EOS}"),
    "two-errors": ("chat", f"a{THINK_END}b{BLOCK}{INVOKE.replace('true', 'maybe')}{FUNCTION_CALLS_END}"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_text_raises_the_non_streamed_error_wherever_it_is_cut(name):
    """The same ChatFormatError (message too) as the non-streamed parse, from the feed where it is certain or
    from finish(); the deltas before it carry no markup."""
    mode, text = MALFORMED[name]
    with pytest.raises(ChatFormatError) as whole:
        parse_message_from_completion_text(text, mode)
    for pieces in _splits(text, seed=len(text)):
        parser, deltas = StreamParser(mode), []
        with pytest.raises(ChatFormatError) as streamed:
            for piece in pieces:
                deltas += parser.feed(piece)
            deltas += parser.finish()
        assert str(streamed.value) == str(whole.value), pieces
        shown = "".join(d.get("content", "") + d.get("reasoning_content", "") for d in deltas)
        assert "｜" not in shown and THINK_END not in shown, pieces  # no markup, nor the start of one


def test_an_error_is_raised_by_the_feed_that_makes_it_certain():
    parser = StreamParser("chat")
    assert parser.feed("a") == [{"content": "a"}]
    with pytest.raises(ChatFormatError, match="inside content"):
        parser.feed(f"b{THINK_END}")
    parser = StreamParser("chat")
    parser.feed(f"{BLOCK}{INVOKE}")
    with pytest.raises(ChatFormatError, match="string=\"maybe\""):
        parser.feed(INVOKE.replace("true", "maybe"))


@pytest.mark.parametrize("name", list(MALFORMED))
def test_the_feed_that_raises_changes_nothing(name):
    """Wherever the text is cut, the call that raises leaves the parser as before it: the same text
    pending (held back, not sent), and it goes on reading what is fed next."""
    mode, text = MALFORMED[name]
    for pieces in _splits(text, seed=len(text)):
        parser = StreamParser(mode)
        try:
            for piece in pieces:
                before = parser.pending
                parser.feed(piece)
            before = parser.pending
            parser.finish()
        except ChatFormatError:
            assert parser.pending == before, pieces
        else:
            raise AssertionError(f"no error for {pieces}")


def test_after_an_error_the_parser_reads_on():
    """A cut reply closes as the caller chooses: a chat reply after the error, a reasoning cut short."""
    parser = StreamParser("chat")
    assert parser.feed("a") == [{"content": "a"}]
    with pytest.raises(ChatFormatError, match="inside content"):
        parser.feed(f"b{THINK_END}")
    assert parser.feed(f"b{EOS}") == [{"content": "b"}]
    assert parser.finish() == [] and parser.message["content"] == "ab"
    parser = StreamParser("thinking")
    assert parser.feed("r </thi") == [{"reasoning_content": "r "}] and parser.pending == "</thi"
    with pytest.raises(ChatFormatError, match="must close its reasoning"):
        parser.feed(EOS)
    assert parser.pending == "</thi"
    assert parser.feed(THINK_END + EOS) + parser.finish() == [{"reasoning_content": "</thi"}]
    assert parser.message["reasoning_content"] == "r </thi" and parser.message["content"] == ""
