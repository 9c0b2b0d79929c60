"""`dsv32 serve` over real HTTP on 127.0.0.1: the demo model served by a subprocess (one server for the module,
a second small one for the queue limit and SIGTERM), spoken to with the official `openai` client and raw
`httpx`. Greedy replies are checked against `Model.generate` of the same prompt ids in this process (both in
float32: see EXACT)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import xla_env
from dsv32_jax.serve import protocol as p
from dsv32_jax.train.demo import DEMO_DIR

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL = "demo_model"
READY = re.compile(r"dsv32 serve: \S+ on (http://\S+)/v1 ")
START_S = 180  # the server's start (JAX import, the weights; no warm-up)
# The shared server and the references run in exact numerics, as tests/test_serve_engine.py does: in bfloat16
# a row's rounding depends on the batch it is computed in (XLA:CPU picks a dot by its shape), and greedy picks
# may follow it. The small server below runs the default numerics.
EXACT = ("--dtype", "float32", "--no-fp8")


class Server:
    """`dsv32 serve` on a free port; its stderr is kept (and shown when a test fails)."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsv32_jax.cli", "serve", "--ckpt", DEMO_DIR, "--port", "0", "--no-warmup",
             *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=xla_env())
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_S) or self.url is None:
            self.kill()
            raise RuntimeError("dsv32 serve did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = READY.search(line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {k: float(v) for k, v in re.findall(r"^dsv32_(\w+) (\S+)$", text, re.M)}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "32", *EXACT)
    yield s
    s.proc.send_signal(signal.SIGTERM)
    try:
        assert s.proc.wait(30) == 0, "".join(s.lines)
    finally:
        s.kill()


@pytest.fixture(scope="module")
def tok():
    from dsv32_jax.text.tokenizer import Tokenizer

    return Tokenizer.load(DEMO_DIR)


@pytest.fixture(scope="module")
def model():
    import dsv32_jax

    return dsv32_jax.load_model(DEMO_DIR, dtype="float32", fp8_activations=False)


def _greedy(model, tok, messages: list[dict], n: int, mode: str = "chat") -> tuple[dict, str, int]:
    """The reply `Model.generate` gives these messages (greedy) -> (message, finish_reason, ids), read as the
    server reads a reply."""
    ids = model.generate([tok.encode_chat(messages, mode)], n, temperature=0)[0]
    reply = p.Reply(tok, mode, ())
    deltas = reply.push(ids)
    more, finish = reply.finish("stop" if ids[-1] == tok.eos_id else "length")
    return p.message(deltas + more, mode), finish, len(ids)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------------------------
# One server
# ------------------------------------------------------------------------------------------------------------


def test_models_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    m = server.metrics()
    for name in ("requests_running", "requests_waiting", "cache_pages_used", "cache_pages_total",
                 "generation_tokens_per_second", "prefix_cache_hit_rate"):
        assert name in m, name
    assert m["cache_pages_total"] > 0


def test_chat_whole_and_streamed_equal_generate(server, model, tok):
    msgs = _user("What color is the sky?")
    want, finish, n = _greedy(model, tok, msgs, 16)
    client = server.client()
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    assert whole.choices[0].message.content == want["content"] and whole.choices[0].finish_reason == finish
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(tok.encode_chat(msgs, "chat")), n)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["content"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_text_completion_and_stop_string(server, model, tok):
    msgs = _user("What color is the sky?")
    want, _, _ = _greedy(model, tok, msgs, 16)
    words = want["content"].split()
    assert len(words) >= 3, want  # the demo model answers in a sentence
    stop = " " + words[2]
    reply = server.client().chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                    stop=[stop])
    assert reply.choices[0].message.content == want["content"][:want["content"].index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    prompt = tok.encode_chat(msgs, "chat")
    ids = model.generate([prompt], 8, temperature=0)[0]
    text = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert text.choices[0].text == tok.decode(ids, skip_special_tokens=True)


def test_tools_are_encoded_and_a_tool_round_trip_parses(server, tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    msgs = _user("Weather in Paris?")
    call = {"id": "call_0", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    history = [*msgs, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 21 C"}]
    client = server.client()
    # the tools block alone is ~460 of the demo's 512 positions: the round trip's second turn goes without it
    for convo, with_tools in ((msgs, True), (history, False)):
        reply = client.chat.completions.create(model=MODEL, messages=convo, max_tokens=8, temperature=0,
                                               **({"tools": tools} if with_tools else {}))
        encoded = tok.encode_chat([{"role": "system", "content": "", "tools": tools}] * with_tools + convo, "chat")
        assert reply.usage.prompt_tokens == len(encoded)
        msg = reply.choices[0].message
        assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert isinstance(msg.content, str) or msg.tool_calls
    assert len(encoded) > len(tok.encode_chat(history[:1], "chat")) + 20  # the call and its result are in it


def test_thinking_mode_gives_reasoning_content(server, model, tok):
    msgs = _user("What is 2 + 2?")
    want, finish, _ = _greedy(model, tok, msgs, 16, "thinking")
    body = {"model": MODEL, "messages": msgs, "max_tokens": 16, "temperature": 0,
            "chat_template_kwargs": {"thinking": True}}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    msg = whole["choices"][0]["message"]
    assert whole["usage"]["prompt_tokens"] == len(tok.encode_chat(msgs, "thinking"))
    assert (msg["reasoning_content"], msg["content"], whole["choices"][0]["finish_reason"]) == (
        want["reasoning_content"], want["content"], finish)
    deltas = _sse(server, {**body, "stream": True})
    assert "".join(d.get("reasoning_content", "") for d in deltas) == want["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == (want["content"] or "")


def _sse(server, body: dict) -> list[dict]:
    """The deltas of a raw streamed chat completion (the stream must end with data: [DONE])."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e)["choices"][0]["delta"] for e in events[:-1] if json.loads(e)["choices"]]


def test_32_concurrent_requests_of_mixed_lengths_equal_generate(server, model, tok):
    topics = ["the sky", "the sea", "a cat", "my name", "sparse attention", "the sun", "a tree", "rain"]
    jobs = []
    for i in range(32):  # prompts of 10, 19 and 28 tokens, 3-16 new ones: generate's buckets (16|32, 16)
        text = f"Tell me about {topics[i % 8]}." + " Please answer." * (i % 3)
        jobs.append((_user(text), 3 + (i * 5) % 14))
    want = [_greedy(model, tok, msgs, n) for msgs, n in jobs]
    assert len({len(tok.encode_chat(msgs, "chat")) for msgs, _ in jobs}) == 3

    async def ask(client, msgs, n):
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": n,
                                                             "temperature": 0}, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(ask(client, msgs, n) for msgs, n in jobs))

    for got, (msg, finish, n) in zip(asyncio.run(all_at_once()), want):
        assert got["choices"][0]["message"]["content"] == msg["content"]
        assert (got["choices"][0]["finish_reason"], got["usage"]["completion_tokens"]) == (finish, n)


def _idle(server, deadline_s: float = 20) -> dict:
    end = time.monotonic() + deadline_s
    while True:
        m = server.metrics()
        if m["requests_running"] == 0 and m["requests_waiting"] == 0 or time.monotonic() > end:
            return m
        time.sleep(0.1)


def test_a_client_that_goes_away_cancels_its_request(server):
    idle = _idle(server)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert server.metrics()["requests_running"] == 1
    after = _idle(server)
    assert after["requests_running"] == 0 and after["cache_pages_used"] == idle["cache_pages_used"]
    assert after["generation_tokens_total"] < idle["generation_tokens_total"] + 400
    with pytest.raises(httpx.TimeoutException):  # a whole reply: the client gives up waiting
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    last = _idle(server)
    assert last["requests_running"] == 0 and last["cache_pages_used"] == idle["cache_pages_used"]
    assert last["generation_tokens_total"] < after["generation_tokens_total"] + 400


BAD = [  # (path, body, status, param)
    ("/v1/chat/completions", {"model": "gpt-4", "messages": _user("hi")}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("hi"), "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("hi"), "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("hi"), "top_p": 2}, 400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("hi"), "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("hi"), "n": 3}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi " * 3000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 99999]}, 400, "prompt"),
]


def test_bad_requests_get_openai_errors(server):
    for path, body, status, param in BAD:
        r = httpx.post(server.url + path, json=body, timeout=30)
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["type"]) == (status, param, "invalid_request_error"), (body, err)
        assert err["message"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        server.client().chat.completions.create(model="gpt-4", messages=_user("hi"))


def test_prometheus_text():
    from dsv32_jax.serve.http import prometheus

    m = dict(running=2, waiting=1, pages_used=5, pages_cached=2, pages_total=20, prompt_tokens=100,
             generation_tokens=40, prefix_hit_tokens=30, prefix_query_tokens=120, preemptions=0, steps=9,
             multi_steps=3, riding_decodes=4, draft_tokens=8, accepted_draft_tokens=6,
             generation_tokens_per_s=12.5, step_s=3.5, idle_s=0.25, compiles=7, compile_s=40.5)
    text = prometheus(m)
    values = dict(re.findall(r"^dsv32_(\w+) (\S+)$", text, re.M))
    assert values["requests_running"] == "2" and values["cache_usage_ratio"] == "0.25"
    assert values["prefix_cache_hit_rate"] == "0.25" and values["generation_tokens_per_second"] == "12.5"
    assert values["spec_decode_accepted_tokens_total"] == "6" and values["engine_multi_steps_total"] == "3"
    assert values["engine_riding_decodes_total"] == "4" and values["engine_step_seconds_total"] == "3.5"
    assert values["engine_idle_seconds_total"] == "0.25" and values["engine_compiles_total"] == "7"
    assert values["engine_compile_seconds_total"] == "40.5"
    assert "# TYPE dsv32_generation_tokens_total counter" in text and text.endswith("\n")


def test_a_port_in_use_is_one_line_before_the_weights(capsys):
    from dsv32_jax.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--ckpt", DEMO_DIR, "--port", str(port)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"dsv32 serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    with pytest.raises(SystemExit) as e:
        main(["serve", "--ckpt", DEMO_DIR, "--port", "65536"])
    assert e.value.code == 2 and "expected a port in 0..65535" in capsys.readouterr().err


def test_speculative_server_streams_the_same_reply(model, tok):
    """`dsv32 serve --speculative 2`: a streamed and a whole greedy chat reply equal `Model.generate`'s, and
    /metrics counts the drafts (most accepted: the demo model's MTP layer is trained)."""
    msgs = [_user("My name is Alice."), _user("Tell me about the sea. Please answer.")]
    want = [_greedy(model, tok, m, 24) for m in msgs]
    s = Server("--speculative", "2", "--max-batch", "4", *EXACT)
    try:
        client = s.client()
        chunks = list(client.chat.completions.create(model=MODEL, messages=msgs[0], max_tokens=24, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want[0][0]["content"]
        whole = client.chat.completions.create(model=MODEL, messages=msgs[1], max_tokens=24, temperature=0)
        assert whole.choices[0].message.content == want[1][0]["content"]
        assert whole.usage.completion_tokens == want[1][2]
        m = s.metrics()
        assert m["spec_decode_draft_tokens_total"] > 0
        assert m["spec_decode_accepted_tokens_total"] > 0.5 * m["spec_decode_draft_tokens_total"], m
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- dsv32 serve's stderr:\n{''.join(s.lines)}") from None
    finally:
        s.kill()


# ------------------------------------------------------------------------------------------------------------
# A small server: the queue limit, then SIGTERM with a request in flight
# ------------------------------------------------------------------------------------------------------------


DRAIN_S = 1  # far less than the in-flight request's 480 tokens take


def test_queue_limit_then_sigterm_with_a_request_in_flight():
    s = Server("--max-batch", "1", "--max-waiting", "1", "--drain-timeout", str(DRAIN_S))
    try:
        _queue_limit_then_sigterm(s)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- dsv32 serve's stderr:\n{''.join(s.lines)}") from None
    finally:
        s.kill()


def _until(check, deadline_s: float = 30) -> None:
    end = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < end, f"not within {deadline_s} s: {check}"
        time.sleep(0.05)


def _queue_limit_then_sigterm(s: Server) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}
    first: list[str] = []
    with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        while not first:
            line = next(lines)
            if line.startswith("data: "):
                first.append(line)
        waiting = threading.Thread(target=lambda: first.append(
            httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code), daemon=True)
        waiting.start()
        _until(lambda: s.metrics()["requests_waiting"] == 1)
        full = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["type"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            s.client().completions.create(model=MODEL, prompt="Hi", max_tokens=8)
        t = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        # the stream ends, with an error event at the drain timeout (or finished before); the engine's step
        # in progress finishes first (without --warmup it may be compiling a new shape: seconds)
        rest = list(lines)
        assert time.monotonic() - t < DRAIN_S + 20, f"the stream took {time.monotonic() - t:.1f} s to end"
        assert [line for line in rest if line][-1] == "data: [DONE]", rest[-3:]
        events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert events[-1].get("error") or events[-1]["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(30) == 0
    assert time.monotonic() - t < DRAIN_S + 25, f"the server took {time.monotonic() - t:.1f} s to exit"
    waiting.join(30)
    assert not waiting.is_alive() and first[-1] in (200, 503)
