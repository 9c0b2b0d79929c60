"""Tests for dsv32_jax.serve.protocol (no server, no model): OpenAI request bodies read into prompt ids through
our chat encoding, and refused with the field named; a reply's ids turned into OpenAI deltas as they come (the
demo tokenizer, one id at a time), cut at stop strings, closed when cut short; the Prometheus text."""

from __future__ import annotations

import json
import random

import pytest

from dsv32_jax.serve import protocol as p
from dsv32_jax.text.chat import (ASSISTANT, EOS, FUNCTION_CALLS_START, INVOKE_START, THINK_END, THINK_START, USER,
                                 encode_messages, parse_message_from_completion_text)
from dsv32_jax.text.tokenizer import Tokenizer
from dsv32_jax.train.demo import DEMO_DIR

MAX_LEN = 4096
MODEL = "m"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(DEMO_DIR)


def _chat(tok, **body):
    return p.chat_request({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}, tok, MAX_LEN,
                          MODEL)


# ------------------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------------------


def test_chat_prompt_is_our_encoding_and_user_text_stays_text(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"a {USER} b {EOS}"}]
    req = _chat(tok, messages=msgs, max_tokens=5, temperature=0, top_p=0.5, seed=7, stop="x")
    assert req.prompt == tok.encode_chat(msgs, "chat")
    assert req.prompt.count(tok.token_id(USER)) == 1 and req.prompt.count(tok.eos_id) == 0
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, req.mode) == (5, 0.0, 0.5, 7, ("x",),
                                                                                           "chat")
    assert _chat(tok).max_tokens == MAX_LEN - len(_chat(tok).prompt)  # absent: all the room left


def test_thinking_tools_and_content_parts(tok):
    req = _chat(tok, chat_template_kwargs={"thinking": True})
    assert req.mode == "thinking" and req.prompt[-1] == tok.token_id(THINK_START)
    assert _chat(tok).prompt[-2:] == [tok.token_id(ASSISTANT), tok.token_id(THINK_END)]
    user = {"role": "user", "content": "weather?"}
    with_tools = _chat(tok, messages=[user], tools=TOOLS)
    assert with_tools.prompt == tok.encode_chat([{"role": "system", "content": "", "tools": TOOLS}, user], "chat")
    system = {"role": "system", "content": "S"}
    assert _chat(tok, messages=[system, user], tools=TOOLS).prompt == tok.encode_chat(
        [{**system, "tools": TOOLS}, user], "chat")
    assert _chat(tok, messages=[user], tools=TOOLS, tool_choice="none").prompt == tok.encode_chat([user], "chat")
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert _chat(tok, messages=[{"role": "user", "content": parts}]).prompt == tok.encode_chat(
        [{"role": "user", "content": "one\ntwo"}], "chat")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [user, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert _chat(tok, messages=history, tools=TOOLS).prompt == tok.encode_chat(
        [{"role": "system", "content": "", "tools": TOOLS}, *history], "chat")


BAD_CHAT = [  # (fields, the param the error names, a piece of its message)
    ({"model": "other"}, "model", "does not exist"),
    ({"n": 2}, "n", "n=1"),
    ({"temperature": -0.5}, "temperature", ">= 0"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": MAX_LEN}, "max_tokens", "exceeds the context"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens", "integer"),
    ({"seed": -1}, "seed", "seed"),
    ({"stop": ["ok", ""]}, "stop", "stop"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"stream_options": {"include_usage": 1}}, "include_usage", "true or false"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"tool_choice": "required", "tools": TOOLS}, "tool_choice", "not supported"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "tools[0]"),
    ({"tools": {"a": 1}}, "tools", "list"),
    ({"chat_template_kwargs": {"thinking": "yes"}}, "chat_template_kwargs", "true or false"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": ["hi"]}, "messages", "messages[0]"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "unknown role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages", "image_url"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "tool message"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages", "surrogate"),
    ({"messages": [{"role": "user", "content": "x" * (17 * MAX_LEN)}]}, "messages", "bytes"),
]


@pytest.mark.parametrize("fields,param,text", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_bad_chat_requests_name_the_field(tok, fields, param, text):
    with pytest.raises(p.RequestError) as e:
        _chat(tok, **fields)
    assert e.value.param == param and text in str(e.value) and e.value.status == 400
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_completion_prompts(tok):
    req = p.completion_request({"prompt": f"{USER}hi"}, tok, 1024, MAX_LEN, MODEL)
    assert req.prompt == tok.encode(f"{USER}hi") and req.prompt[0] == tok.token_id(USER)  # raw: markup meant
    assert req.max_tokens == 16 and req.mode is None
    assert p.completion_request({"prompt": [5, 6, 7], "max_tokens": 3}, tok, 1024, MAX_LEN, MODEL).prompt == [5, 6, 7]
    assert p.completion_request({"prompt": ["ab"]}, tok, 1024, MAX_LEN, MODEL).prompt == tok.encode("ab")
    for prompt, text in (([1, 1024], "[0, 1024)"), (["a", "b"], "one prompt"), (None, "string"), ("", "empty"),
                         (list(range(10)) * 410, "no room")):
        with pytest.raises(p.RequestError) as e:
            p.completion_request({"prompt": prompt}, tok, 1024, MAX_LEN, MODEL)
        assert e.value.param == "prompt" and text in str(e.value)


# ------------------------------------------------------------------------------------------------------------
# Replies
# ------------------------------------------------------------------------------------------------------------


def _completion(mode, content, reasoning="", calls=()):
    msg = {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": list(calls)}
    return encode_messages([msg], mode, context=[{"role": "user", "content": "q"}])


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Zürich"})}}
REPLIES = {
    "plain": ("chat", _completion("chat", "Hello, wörld! 🌍 1 < 2.")),
    "thinking": ("thinking", _completion("thinking", "It is 4.", "2 + 2\n\nis 4")),
    "call": ("chat", _completion("chat", "Checking.", calls=(CALL,))),
    "thinking-call": ("thinking", _completion("thinking", "", "need the weather", calls=(CALL, CALL))),
}


def _run(reply, ids, how, size=1):
    deltas = []
    for i in range(0, len(ids), size):
        deltas += reply.push(ids[i:i + size])
    more, finish = reply.finish(how)
    return deltas + more, finish


@pytest.mark.parametrize("name", list(REPLIES))
def test_reply_ids_one_at_a_time_give_the_parse_of_the_whole_text(tok, name):
    mode, text = REPLIES[name]
    ids = tok.encode(text)  # as the model writes them: EOS and </think> are control ids
    assert ids[-1] == tok.eos_id
    want = parse_message_from_completion_text(text, mode)
    for size in (1, 3):
        deltas, finish = _run(p.Reply(tok, mode, ()), ids, "stop", size)
        msg = p.message(deltas, mode)
        assert msg["content"] == (want["content"] or (None if want["tool_calls"] else ""))
        assert msg.get("reasoning_content", "") == want["reasoning_content"]
        calls = [{k: c[k] for k in ("type", "function")} for c in msg.get("tool_calls", [])]
        assert calls == want["tool_calls"]
        assert all(c["id"].startswith("call_") for c in msg.get("tool_calls", []))
        assert finish == ("tool_calls" if want["tool_calls"] else "stop")
        shown = "".join(d.get("content", "") + d.get("reasoning_content", "") for d in deltas)
        assert "｜" not in shown and THINK_END not in shown


def test_a_reply_cut_short_closes_where_it_stands(tok):
    mode, text = REPLIES["thinking-call"]
    ids = tok.encode(text)
    k = ids.index(tok.token_id(THINK_END)) - 1  # inside the reasoning
    deltas, finish = _run(p.Reply(tok, mode, ()), ids[:k], "length")
    assert finish == "length" and p.message(deltas, mode)["reasoning_content"] == tok.decode(ids[:k])
    # inside the first tool call: the call's text goes out as content (the block's opener was read)
    k = next(k for k in range(len(ids)) if "Zü" in tok.decode(ids[:k]))
    deltas, finish = _run(p.Reply(tok, mode, ()), ids[:k], "length")
    msg = p.message(deltas, mode)
    assert finish == "length" and "tool_calls" not in msg and msg["content"].startswith(INVOKE_START)
    opener = f"\n\n{FUNCTION_CALLS_START}\n"
    assert msg["reasoning_content"] + THINK_END + opener + msg["content"] == tok.decode(ids[:k])


def test_text_that_does_not_parse_goes_out_as_content_as_generated(tok):
    ids = tok.encode(f"Hi {ASSISTANT} there{EOS}")
    deltas, finish = _run(p.Reply(tok, "chat", ()), ids, "stop")
    assert finish == "stop" and p.message(deltas, "chat")["content"] == f"Hi {ASSISTANT} there"


def test_stop_strings_cut_at_the_first_wherever_the_text_is_cut():
    text = "abc STOP def END ghi"
    rng = random.Random(0)
    for stops, want in ((("END", "STOP"), "abc "), (("ghi",), "abc STOP def END "), (("zz",), text),
                        (("c S", "d"), "ab")):
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 6)))
            pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
            cut, out, hit = p.StopCut(stops), "", False
            for piece in pieces:
                more, hit = cut.push(piece)
                out += more
                if hit:
                    break
            out += "" if hit else cut.flush()
            assert (out, hit) == (want, want != text), pieces


def test_a_stop_string_ends_the_reply_and_counts_the_ids_up_to_it(tok):
    ids = tok.encode(f"The sky is blue. The grass is green.{EOS}")
    reply = p.Reply(tok, "chat", (" is",))
    deltas = []
    for i in ids:
        deltas += reply.push([i])
    more, finish = reply.finish("cancelled")  # the server cancels the generation at the cut
    assert p.message(deltas + more, "chat")["content"] == "The sky" and finish == "stop" and reply.cut
    assert reply.tokens == len(tok.encode("The sky is"))
    deltas, finish = _run(p.Reply(tok, None, ("green",)), ids, "stop")
    assert "".join(d["text"] for d in deltas) == "The sky is blue. The grass is " and finish == "stop"
    deltas, finish = _run(p.Reply(tok, None, ()), ids[:-1], "length")
    assert "".join(d["text"] for d in deltas) == tok.decode(ids[:-1]) and finish == "length"


def test_chunks_and_responses_have_the_openai_shape():
    rid = p.new_id(chat=True)
    c = p.chunk(rid, MODEL, 1, {"content": "x"})
    assert c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"] == {"content": "x"}
    assert p.chunk(rid, MODEL, 1, None, "stop")["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                                   "finish_reason": "stop"}
    t = p.chunk(p.new_id(chat=False), MODEL, 1, {"text": "y"})
    assert t["object"] == "text_completion" and t["choices"][0]["text"] == "y"
    u = p.usage_chunk(rid, MODEL, 1, p.usage(3, 4))
    assert u["choices"] == [] and u["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    r = p.response(rid, MODEL, 1, "chat", [{"content": "a"}, {"content": "b"}], "stop", p.usage(1, 2))
    assert r["object"] == "chat.completion" and r["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert p.retry_after(0.2) == "1" and p.retry_after(2.5) == "3"


def test_ignore_eos_generates_past_eos_as_text(tok):
    assert _chat(tok).ignore_eos is False and _chat(tok, ignore_eos=True).ignore_eos is True
    ids = tok.encode(f"Hi.{EOS}More")
    reply = p.Reply(tok, None, (), ignore_eos=True)
    assert reply.stop_ids == () and p.Reply(tok, None, ()).stop_ids == (tok.eos_id,)
    deltas, finish = _run(reply, ids, "length")
    assert "".join(d["text"] for d in deltas) == "Hi.More" and finish == "length" and reply.tokens == len(ids)
    deltas, finish = _run(p.Reply(tok, "chat", (), ignore_eos=True), ids, "length")
    assert p.message(deltas, "chat")["content"] == "Hi.More"  # the text after EOS does not parse: sent as text


def test_emits_that_queued_up_go_out_as_one_chunk(tok):
    """A streaming reply behind the engine sends the tokens that queued up in one chunk; the text is
    the same."""
    import asyncio

    from dsv32_jax.serve.http import Mailbox, Turn

    ids = tok.encode("one two three four five")

    class Engine:
        def submit(self, prompt, sampling, emit):
            self.emit = emit
            return 0

        def cancel(self, rid):
            pass

    async def run():
        engine = Engine()
        req = p.Request([1], 8, 0.0, 1.0, 0, (), True, False, False, None)
        turn = Turn(engine, req, p.Reply(tok, None, ()), Mailbox(asyncio.get_running_loop()))
        for t in ids[:-1]:  # the engine's emits, all queued before the loop reads any
            engine.emit([t], None)
        engine.emit([ids[-1]], "length")
        await asyncio.sleep(0)
        return [x async for x in turn.events()]

    events = asyncio.run(run())
    assert len(events) == 1 and events[0][1] == "length"
    assert "".join(d["text"] for d in events[0][0]) == tok.decode(ids)


def test_the_mailbox_wakes_the_loop_once_for_the_posts_not_yet_delivered():
    """The engine's emits of one step (posted from its thread) share one wake-up of the event loop."""
    import asyncio
    import threading

    from dsv32_jax.serve.http import Mailbox

    async def run():
        loop = asyncio.get_running_loop()
        wakes, real = [], loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakes.append(a) or real(*a)
        box, queues = Mailbox(loop), [asyncio.Queue() for _ in range(3)]
        poster = threading.Thread(target=lambda: [box.post(queues[i % 3], i) for i in range(30)])
        poster.start()
        poster.join()  # the loop runs nothing meanwhile
        assert len(wakes) == 1
        await asyncio.sleep(0)
        assert [[q.get_nowait() for _ in range(q.qsize())] for q in queues] == [list(range(i, 30, 3))
                                                                               for i in range(3)]
        box.post(queues[0], "next")  # delivered: the next post wakes the loop again
        assert len(wakes) == 2 and await queues[0].get() == "next"

    asyncio.run(run())
