"""The OpenAI-compatible HTTP API over an ``Engine``: ``make_app(engine, tokenizer, model_name)`` -> a FastAPI app.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events, ``data: {...}``
chunks then ``data: [DONE]``, or whole), ``GET /v1/models``, ``/health``, ``/metrics`` (Prometheus text).
Requests are read and replies built by ``serve.protocol``; errors are OpenAI's JSON error object (400 for a
bad request, 429 with Retry-After when the engine's queue is full, 503 while the server shuts down).

The engine calls each request's ``emit`` from its own thread; a `Mailbox` hands the ids to the request's
asyncio queue, waking the event loop once for the emits of an engine step (each wake-up is a write to the
loop's self-pipe, in which the engine thread lets go of the interpreter lock and then waits for the HTTP
thread to hand it back: with 32 requests, one wake-up each was 32 such waits a step). A client that goes
away (a stream closed early, a connection dropped while a whole reply is awaited) cancels its request,
which frees its cache pages.
"""

from __future__ import annotations

import asyncio
import json
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dsv32_jax.engine.core import EngineStopped, QueueFull
from dsv32_jax.engine.scheduler import Sampling
from dsv32_jax.serve import protocol as p

DISCONNECT_POLL_S = 0.25  # how often a request awaiting a whole reply checks that its client is still there
SHUTTING_DOWN = "server shutting down"


class EngineError(RuntimeError):
    """The engine ended a request with an error ("error: <message>")."""


class Mailbox:
    """Items for asyncio queues, posted from other threads: `post` wakes the loop only when nothing is already
    waiting for delivery, so the posts made while the loop has not yet run `_deliver` share one wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list = []  # (queue, item), in the order posted

    def post(self, queue: asyncio.Queue, item) -> None:  # any thread
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:  # a wake-up is on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            with self._lock:
                self._items.clear()

    def _deliver(self) -> None:  # the loop's thread
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


class Turn:
    """One submitted request as seen from asyncio: the engine's emits on a queue, read into `Reply` deltas
    (the emits that queued up while the loop was busy are read at once: one chunk, not one each)."""

    def __init__(self, engine, req: p.Request, reply: p.Reply, mailbox: Mailbox) -> None:
        self.engine, self.req, self.reply = engine, req, reply
        self._queue: asyncio.Queue = asyncio.Queue()
        self._mailbox = mailbox
        self.open = False  # the engine holds the request: close() cancels it
        sampling = Sampling(req.max_tokens, req.temperature, req.top_p, req.seed, reply.stop_ids)
        self.rid = engine.submit(req.prompt, sampling, self._emit)
        self.open = True

    def _emit(self, tokens, finish) -> None:  # the engine's thread
        self._mailbox.post(self._queue, (list(tokens), finish))

    async def events(self):
        """-> (deltas, None) while the reply runs, then (the last deltas, finish_reason) once. Raises
        EngineError when the engine ended the request with an error."""
        while True:
            tokens, finish = await self._queue.get()
            while finish is None and not self._queue.empty():  # behind the engine: one chunk for all
                more, finish = self._queue.get_nowait()
                tokens = tokens + more
            deltas = self.reply.push(tokens)
            if finish is not None:
                self.open = False
                if finish.startswith("error"):
                    raise EngineError(finish.partition(": ")[2] or finish)
            elif self.reply.cut:  # a stop string: the rest of the generation is not wanted
                self.close()
            if finish is None and not self.reply.cut:
                yield deltas, None
                continue
            more, reason = self.reply.finish(finish or "stop")
            yield deltas + more, reason
            return

    def close(self) -> None:
        if self.open:
            self.open = False
            self.engine.cancel(self.rid)


def _error(err: p.RequestError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# name, Prometheus type, help, the engine metric (or a function of all of them)
_METRICS = (
    ("requests_running", "gauge", "requests being generated", "running"),
    ("requests_waiting", "gauge", "requests queued for admission", "waiting"),
    ("cache_pages_used", "gauge", "KV-cache pages in use", "pages_used"),
    ("cache_pages_total", "gauge", "KV-cache pages in the pool", "pages_total"),
    ("cache_pages_cached", "gauge", "free KV-cache pages that still hold a cached prefix", "pages_cached"),
    ("cache_usage_ratio", "gauge", "KV-cache pages in use / in the pool",
     lambda m: m["pages_used"] / m["pages_total"] if m["pages_total"] else 0.0),
    ("prompt_tokens_total", "counter", "prompt tokens admitted", "prompt_tokens"),
    ("generation_tokens_total", "counter", "tokens generated", "generation_tokens"),
    ("prefix_cache_hit_tokens_total", "counter", "prompt tokens found in the prefix cache", "prefix_hit_tokens"),
    ("prefix_cache_query_tokens_total", "counter", "prompt tokens looked up in the prefix cache",
     "prefix_query_tokens"),
    ("prefix_cache_hit_rate", "gauge", "prefix-cache hit tokens / query tokens since start",
     lambda m: m["prefix_hit_tokens"] / m["prefix_query_tokens"] if m["prefix_query_tokens"] else 0.0),
    ("preemptions_total", "counter", "requests preempted (recomputed later) when the cache ran out", "preemptions"),
    ("engine_steps_total", "counter", "engine steps run", "steps"),
    ("engine_step_seconds_total", "counter",
     "seconds the engine spent in its steps (prefill and decode, compiles excluded)", "step_s"),
    ("engine_idle_seconds_total", "counter", "seconds the engine waited for requests", "idle_s"),
    ("engine_compiles_total", "counter", "step programs compiled (warm-up included; steady state adds none)",
     "compiles"),
    ("engine_compile_seconds_total", "counter", "seconds spent compiling step programs (each with its first step)",
     "compile_s"),
    ("engine_multi_steps_total", "counter", "engine steps that decoded several tokens (--decode-steps)",
     "multi_steps"),
    ("engine_riding_decodes_total", "counter", "decode tokens taken in the free rows of a prefill step",
     "riding_decodes"),
    ("spec_decode_draft_tokens_total", "counter", "speculative decoding: tokens drafted", "draft_tokens"),
    ("spec_decode_accepted_tokens_total", "counter", "speculative decoding: drafted tokens accepted",
     "accepted_draft_tokens"),
    ("generation_tokens_per_second", "gauge", "tokens generated per second (over the last seconds)",
     "generation_tokens_per_s"),
)


def prometheus(m: dict) -> str:
    """The engine's metrics (``Engine.metrics()``) in Prometheus text format, names prefixed dsv32_."""
    out = []
    for name, kind, text, src in _METRICS:
        value = src(m) if callable(src) else m[src]
        out += [f"# HELP dsv32_{name} {text}", f"# TYPE dsv32_{name} {kind}", f"dsv32_{name} {float(value):g}"]
    return "\n".join(out) + "\n"


def make_app(engine, tokenizer, model_name: str) -> FastAPI:
    """The API over a started `engine` (``engine.core.Engine``). ``app.state.closing = True`` (set on shutdown)
    turns new completions away with 503 and /health to 503."""
    app = FastAPI(title="dsv32 serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.closing = False
    created = p.now()
    boxes: list[Mailbox] = []  # the one of the running loop

    def mailbox() -> Mailbox:
        loop = asyncio.get_running_loop()
        if not boxes or boxes[0].loop is not loop:
            boxes[:] = [Mailbox(loop)]
        return boxes[0]

    @app.exception_handler(HTTPException)
    async def _http_error(_, exc: HTTPException):  # unknown routes, wrong methods: OpenAI's error shape too
        return JSONResponse(p.error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        if app.state.closing:
            return _error(p.RequestError(SHUTTING_DOWN, status=503, type="server_error"))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "dsv32-jax",
                "max_model_len": engine.max_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(engine.metrics()), media_type="text/plain; version=0.0.4")

    async def complete(request: Request, read) -> JSONResponse | StreamingResponse:
        if app.state.closing:
            return _error(p.RequestError(SHUTTING_DOWN, status=503, type="server_error"))
        try:
            body = await request.json()
        except ValueError:
            return _error(p.RequestError("the request body is not valid JSON"))
        if not isinstance(body, dict):
            return _error(p.RequestError(f"the request body must be a JSON object, got {type(body).__name__}"))
        try:
            req = read(body)
            reply = p.Reply(tokenizer, req.mode, req.stop, req.ignore_eos)
            turn = Turn(engine, req, reply, mailbox())
        except p.RequestError as e:
            return _error(e)
        except EngineStopped as e:
            return _error(p.RequestError(str(e), status=503, type="server_error"))
        except QueueFull as e:
            return _error(p.RequestError(f"the server is busy: {e}", status=429, type="rate_limit_exceeded"),
                          {"Retry-After": p.retry_after(e.retry_after)})
        except ValueError as e:  # the engine's own checks
            return _error(p.RequestError(str(e)))
        rid = p.new_id(req.mode is not None)
        if req.stream:
            return StreamingResponse(_stream(turn, rid), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(turn, rid, request)

    async def _stream(turn: Turn, rid: str):
        req, t = turn.req, p.now()
        try:
            if req.mode is not None:
                yield _sse(p.chunk(rid, model_name, t, {"role": "assistant", "content": ""}))
            async for deltas, finish in turn.events():
                for delta in deltas:
                    yield _sse(p.chunk(rid, model_name, t, delta))
                if finish is not None:
                    yield _sse(p.chunk(rid, model_name, t, None, finish))
            if req.include_usage:
                yield _sse(p.usage_chunk(rid, model_name, t, p.usage(len(req.prompt), turn.reply.tokens)))
        except EngineError as e:
            yield _sse(p.error_body(str(e), "server_error"))
        finally:
            turn.close()
        yield "data: [DONE]\n\n"

    async def _whole(turn: Turn, rid: str, request: Request) -> JSONResponse:
        watch = asyncio.create_task(_watch(request, turn))
        deltas, finish = [], None
        try:
            async for more, finish in turn.events():
                deltas += more
        except EngineError as e:
            status = 503 if str(e) == SHUTTING_DOWN else 500
            return _error(p.RequestError(str(e), status=status, type="server_error"))
        finally:
            watch.cancel()
            turn.close()
        use = p.usage(len(turn.req.prompt), turn.reply.tokens)
        return JSONResponse(p.response(rid, model_name, p.now(), turn.req.mode, deltas, finish, use))

    async def _watch(request: Request, turn: Turn) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        turn.close()

    vocab = engine.config.vocab_size

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, lambda body: p.chat_request(body, tokenizer, engine.max_len, model_name))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, lambda body: p.completion_request(body, tokenizer, vocab, engine.max_len,
                                                                         model_name))

    return app
