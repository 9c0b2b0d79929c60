"""`dsv32 serve`: the OpenAI-compatible HTTP server (`dsv32_jax.serve.http`) over the continuous-batching
engine (`dsv32_jax.engine.core.Engine`), run by uvicorn.

The port is bound before the weights are read (a port in use fails at once); one line on stderr says when
the server is ready. SIGTERM or SIGINT: no new connection is accepted and new requests get 503; the requests
in flight finish, for at most --drain-timeout seconds, after which the engine ends each open one with an
error; then the command exits 0.

A multi-process run (`--coordinator` etc., as `dsv32 generate`): process 0 binds the port, serves and
schedules; the others run each of its steps (`Engine.follow`) and serve nothing. They all exit 0 once
process 0 has stopped; a process lost ends the others, process 0's open requests first hearing why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import time

from dsv32_jax import argtypes
from dsv32_jax.cli import common


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and text completions, streaming, "
                                     "tools, reasoning) with continuous batching over a paged cache")
    common.checkpoint_options(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=argtypes.port, default=8000, help="TCP port (default 8000; 0: any free one)")
    s.add_argument("--served-model-name", metavar="NAME", default=None,
                   help="the model name clients ask for (default: the checkpoint directory's name)")
    s.add_argument("--max-batch", type=argtypes.positive_int, default=32, metavar="N",
                   help="most requests generated together (default 32)")
    s.add_argument("--cache-gb", type=argtypes.positive_float, default=None, metavar="G",
                   help="GiB of device memory for the paged cache (default: what the device has left)")
    s.add_argument("--chunk", type=argtypes.positive_int, default=512, metavar="T",
                   help="prompt tokens prefilled per request per step (default 512)")
    s.add_argument("--max-waiting", type=argtypes.positive_int, default=256, metavar="N",
                   help="most requests queued for admission; more get 429 (default 256)")
    s.add_argument("--no-prefix-cache", action="store_true", help="do not share cache pages of equal prefixes")
    common.speculative_option(s)
    s.add_argument("--decode-steps", type=argtypes.positive_int, default=1, metavar="N",
                   help="tokens a decode step may take in one program while no request waits or "
                        "prefills (multi-step; a new request waits up to N tokens; default 1)")
    s.add_argument("--no-warmup", action="store_true",
                   help="do not compile every shape at start-up (each compiles on first use instead)")
    s.add_argument("--drain-timeout", type=argtypes.seconds, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds the requests in flight may take to finish (default 30)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    s.add_argument("--no-fp8", action="store_true", help="do not simulate FP8 activations")
    common.weights_option(s)
    common.attention_option(s)
    s.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.compile_cache_option(s)
    common.mesh_options(s)
    s.set_defaults(func=run)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound now so that a port in use fails before the weights are read."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from dsv32_jax.serve.http import make_app
    except ImportError as e:
        raise OSError(f"dsv32 serve needs FastAPI and uvicorn: pip install 'dsv32-jax[serve]' ({e})") from None
    from dsv32_jax.engine.core import Engine

    common.join(args)
    import jax

    _, tok = common.open_checkpoint(args)
    lead = jax.process_index() == 0
    sock = _listen(args.host, args.port) if lead else None
    try:
        model = common.load_weights(args.ckpt, args)
        engine = Engine(model, max_batch=args.max_batch, cache_gb=args.cache_gb, chunk=args.chunk,
                        max_waiting=args.max_waiting, prefix_cache=not args.no_prefix_cache,
                        speculative=args.speculative, decode_steps=args.decode_steps)
        if not lead:
            engine.follow()
            return 0
        if not args.no_warmup:
            engine.warmup(progress=common.say)
        name = args.served_model_name or os.path.basename(os.path.normpath(args.ckpt))
        app = make_app(engine, tok, name)
        engine.start()
        asyncio.run(_serve(uvicorn, app, engine, sock, args.drain_timeout, name))
    finally:
        if sock is not None:
            sock.close()
    return 0


FLUSH_S = 5.0  # how long the replies that a lost process ended may take to reach their clients


def _last_words(engine, server, msg: str) -> None:
    """A multi-process run that broke (any thread): every open request ends with `msg`, and the
    replies in flight have up to FLUSH_S seconds to be sent."""
    engine.fail(msg)
    end = time.monotonic() + FLUSH_S
    while server.server_state.tasks and time.monotonic() < end:
        time.sleep(0.05)


FLUSH_S = 5.0  # after the engine has ended every request: the handlers' time to send their last events


async def _serve(uvicorn, app, engine, sock: socket.socket, drain_s: float, name: str) -> None:
    import jax

    class Server(uvicorn.Server):
        def capture_signals(self):  # ours (below): uvicorn's would raise the signal again once it has stopped
            return contextlib.nullcontext()

    # no bound of uvicorn's own on the shutdown: it would start at the signal, and cut the streams of a
    # step that outlasts it (a compile); ours (below) starts once the engine has ended every request
    server = Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=None))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if jax.process_count() > 1:  # a process lost: the open requests hear why before the exit
        from sharding.distributed import on_fatal

        on_fatal(lambda msg: _last_words(engine, server, msg))
    if server.started:
        common.say(f"dsv32 serve: {name} on {_address(sock)}/v1 (OpenAI API; /health, /metrics)")
    await asyncio.wait([serving, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if serving.done():  # uvicorn stopped by itself (it says why)
        engine.stop(drain=False)
        serving.result()
        raise OSError("the HTTP server stopped")
    common.say(f"dsv32 serve: shutting down: the requests in flight may finish for {drain_s:g}s, then get an error")
    app.state.closing = True
    server.should_exit = True  # uvicorn accepts no more connections and waits for the open ones
    await asyncio.to_thread(engine.stop, drain=True, timeout=drain_s)  # each open request has ended
    await asyncio.wait([serving], timeout=FLUSH_S)  # their handlers send what is left
    server.force_exit = True  # a client that does not read its stream is not waited for any longer
    await serving
    common.say("dsv32 serve: stopped")
