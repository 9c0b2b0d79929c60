"""Several processes (hosts) as one mesh: joining the run, watching it, and bringing results home.

Each process runs the same program (multi-controller JAX): it sees every device in `jax.devices()`,
holds only its own (`jax.local_devices()`), and loads only the param shards those devices hold
(checkpoints are read through `jax.make_array_from_callback` / Orbax, shard by shard).

JAX's own runtime ends every failure of a run (a process that never comes, a duplicate process id,
a port in use, a peer that dies) in a C++ abort after minutes. So the processes first meet on the
coordinator's port themselves (process 0 listens, the others say who they are), which names each
such cause in one line within `init_timeout` seconds; then each keeps its connection to process 0
open as a watch: a process that dies closes it at once (a lost host is noticed after
`heartbeat_timeout` seconds of silence), and every process ends with one line and exit status 1.
Only then does process 0 hand the port to `jax.distributed.initialize`, whose own timeouts are set
past ours. The other processes' JAX clients reach it through a local relay (`_relay`), so that
process 0's death reaches them only after the watch has spoken.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import resource
import socket
import sys
import threading
import time

import jax
import numpy as np

ENV = {"coordinator": "DSV32_COORDINATOR", "num_processes": "DSV32_NUM_PROCESSES",
       "process_id": "DSV32_PROCESS_ID"}
TIMEOUTS = {"init_timeout": ("DSV32_INIT_TIMEOUT", 120.0),
            "heartbeat_timeout": ("DSV32_HEARTBEAT_TIMEOUT", 60.0)}
JAX_MARGIN = 30  # JAX's own timeouts are ours + this: ours always speak first


class JoinError(ConnectionError):
    """A multi-process run that cannot start: the cause, in one line."""


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, init_timeout: float | None = None,
             heartbeat_timeout: float | None = None, environ=os.environ) -> dict | None:
    """The multi-process settings from arguments, else from DSV32_COORDINATOR (HOST:PORT),
    DSV32_NUM_PROCESSES, DSV32_PROCESS_ID (and DSV32_INIT_TIMEOUT, DSV32_HEARTBEAT_TIMEOUT in
    seconds); None when none of the first three is given (one process). A partial set is an error
    naming what is missing."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for k, var in ENV.items():
        if given[k] is None and environ.get(var, "") != "":
            given[k] = environ[var]
    if all(v is None for v in given.values()):
        return None
    missing = [f"--{k.replace('_', '-')} (or {ENV[k]})" for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"multi-process run: {', '.join(missing)} not given "
                         "(--coordinator, --num-processes and --process-id go together)")
    host, _, port = str(given["coordinator"]).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator {given['coordinator']!r}: expected HOST:PORT")
    try:
        n, i = int(given["num_processes"]), int(given["process_id"])
    except ValueError:
        raise ValueError(f"num_processes {given['num_processes']!r} and process_id "
                         f"{given['process_id']!r} must be integers") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"process_id {i} must be in [0, num_processes={n})")
    s = {"coordinator_address": str(given["coordinator"]), "num_processes": n, "process_id": i}
    for k, (var, default) in TIMEOUTS.items():
        v = {"init_timeout": init_timeout, "heartbeat_timeout": heartbeat_timeout}[k]
        v = environ.get(var, "") or default if v is None else v
        try:
            s[k] = float(v)
        except ValueError:
            raise ValueError(f"{k} {v!r}: expected seconds") from None
        if not 0 < s[k] < 1e6:
            raise ValueError(f"{k} must be > 0 seconds, got {v}")
    return s


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, init_timeout: float | None = None,
               heartbeat_timeout: float | None = None) -> bool:
    """Join the multi-process run described by the arguments or the environment (see
    `settings`) before any other JAX call; False (nothing done) for a single process. A run that
    cannot start raises JoinError naming the cause; a run that breaks later ends every process
    with one line on stderr and exit status 1 (see the module doc)."""
    s = settings(coordinator, num_processes, process_id, init_timeout, heartbeat_timeout)
    if s is None:
        return False
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    i, n, t = s["process_id"], s["num_processes"], s["init_timeout"]
    deadline = time.monotonic() + t
    if n > 1:
        links = _gather(s, deadline) if i == 0 else {0: _report(s, deadline)}
        _watch(links, i, s["heartbeat_timeout"])
    timer = threading.Timer(max(deadline - time.monotonic(), 5.0), fatal, (
        f"process {i}: JAX's distributed runtime did not start within {t:g}s",))
    timer.daemon = True
    timer.start()
    address = s["coordinator_address"] if i == 0 else _relay(s["coordinator_address"])
    try:
        jax.distributed.initialize(address, n, i,
                                   initialization_timeout=int(t) + JAX_MARGIN,
                                   heartbeat_timeout_seconds=int(s["heartbeat_timeout"]) + JAX_MARGIN)
    finally:
        timer.cancel()
    return True


def leave(error: str | None = None) -> None:
    """Tell the other processes this one ends: normally (they stop watching it), or with `error`
    (they end too, naming it). Called at exit; the CLI calls it with its error line."""
    global _links
    links, _links = _links, {}
    for sock in links.values():
        _send(sock, {"bye": True} if error is None else {"fail": error})
    if error is not None and links and 0 not in links:
        time.sleep(1.0)  # process 0 hosts JAX's service: the others end on our word, not its loss
    for sock in links.values():
        sock.close()


# ---------------------------------------------------------------------------------------------
# Meeting on the coordinator's port, then watching the others
# ---------------------------------------------------------------------------------------------

_links: dict[int, socket.socket] = {}  # process 0: every other process; the others: process 0
_lock, _ending = threading.Lock(), threading.Lock()
_last_words: list = []  # `on_fatal`


def _send(sock: socket.socket, msg: dict) -> None:
    with _lock:
        try:
            sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError:
            pass  # a closed peer is reported by its watch


def _lines(sock: socket.socket):
    """The JSON messages arriving on `sock`, each as it comes (socket timeouts propagate)."""
    buf = b""
    while True:
        while b"\n" not in buf:
            data = sock.recv(4096)
            if not data:
                return
            buf += data
        line, buf = buf.split(b"\n", 1)
        yield json.loads(line)


def _port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _listen(port: int) -> socket.socket:
    """Process 0: listen on `port` of every address, as JAX's coordinator will."""
    try:
        srv = socket.socket(socket.AF_INET6)
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr: tuple = ("::", port)
    except OSError:
        srv, addr = socket.socket(socket.AF_INET), ("", port)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind(addr)
    except OSError as e:
        srv.close()
        raise JoinError(f"process 0: cannot listen on the coordinator port {port} ({e.strerror}): "
                        "another program (or another run's process 0) holds it; pick a free port "
                        "with --coordinator") from None
    srv.listen(64)
    return srv


def _gather(s: dict, deadline: float) -> dict[int, socket.socket]:
    """Process 0: wait for processes 1..N-1 to say who they are; refuse a duplicate id or another
    process count. -> {process id: its connection}."""
    n, port = s["num_processes"], _port(s["coordinator_address"])[1]
    srv, links, where = _listen(port), {}, {}

    def fail(msg: str):
        for sock in links.values():
            _send(sock, {"error": msg})
            sock.close()
        raise JoinError(msg)

    try:
        while len(links) < n - 1:
            srv.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                sock, (host, *_) = srv.accept()
            except TimeoutError:
                missing = sorted(set(range(1, n)) - set(links))
                fail(f"process 0: process{'es' if len(missing) > 1 else ''} "
                     f"{', '.join(map(str, missing))} of {n} did not join within "
                     f"{s['init_timeout']:g}s (not started, or started with another --coordinator?)")
            sock.settimeout(5.0)
            try:
                hello = next(_lines(sock))
                k, count = int(hello["id"]), int(hello["n"])
                who = f"{host.removeprefix('::ffff:')} pid {hello['pid']}"
            except (OSError, StopIteration, ValueError, KeyError, TypeError):
                sock.close()  # not one of ours (a port scanner, a stray client): ignore it
                continue
            sock.settimeout(None)
            if count != n:
                links[-1] = sock
                fail(f"process {k} ({who}) was started with --num-processes {count}, process 0 "
                     f"with {n}: every process needs the same count")
            if k in links or k == 0:
                links[-1] = sock
                first = "process 0 (this one)" if k == 0 else where[k]
                fail(f"two processes use --process-id {k}: {first} and {who}; each process "
                     f"needs its own id in 0..{n - 1}")
            links[k], where[k] = sock, who
    finally:
        srv.close()
    for sock in links.values():
        _send(sock, {"ok": True})
    return links


def _report(s: dict, deadline: float) -> socket.socket:
    """Process I > 0: reach process 0 at the coordinator address (retrying until the deadline),
    say who this is, and wait for the whole run to gather -> the connection to process 0."""
    i, addr, t = s["process_id"], s["coordinator_address"], s["init_timeout"]
    while True:
        try:
            sock = socket.create_connection(_port(addr), timeout=max(deadline - time.monotonic(), 0.01))
            break
        except OSError as e:
            if time.monotonic() + 0.5 >= deadline:
                raise JoinError(f"process {i}: cannot reach the coordinator {addr} within {t:g}s "
                                f"({e.strerror or e}): is process 0 running, with that address?") from None
            time.sleep(0.5)
    _send(sock, {"id": i, "n": s["num_processes"], "pid": os.getpid()})
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        reply = next(_lines(sock), None)
    except TimeoutError:
        raise JoinError(f"process {i}: the run did not gather within {t:g}s: process 0 still "
                        "waits for some of the others") from None
    except (OSError, ValueError):
        reply = None
    if reply is None or not ("ok" in reply or "error" in reply):
        raise JoinError(f"process {i}: {addr} did not take this process: a run whose "
                        f"{s['num_processes']} processes all joined already started there (is "
                        f"--process-id {i} used twice?), or another program holds that port")
    if "error" in reply:
        raise JoinError(reply["error"])
    sock.settimeout(None)
    return sock


def fatal(msg: str) -> None:
    """End this process now, from any thread: one line, exit status 1, the others told, then the
    `on_fatal` functions."""
    _ending.acquire()  # a second cause waits here for the first one's exit
    sys.stderr.write(f"error: multi-process run: {msg}\n")
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # the one line: not the echoes (a collective
    leave(msg)                                    # that failed with it, JAX's C++ log)
    for fn in _last_words:
        with contextlib.suppress(Exception):
            fn(f"multi-process run: {msg}")
    os._exit(1)


def on_fatal(fn) -> None:
    """fn(message) runs when a broken run ends this process (`fatal`, from the thread that saw it),
    before the exit: e.g. a server ends its open requests with the cause."""
    _last_words.append(fn)


def _watch(links: dict[int, socket.socket], me: int, timeout: float) -> None:
    """Threads: a beat to every link every timeout/4 seconds, and one watch per link that ends
    this process when the other side dies, goes silent for `timeout` seconds, or fails."""
    _links.update(links)
    atexit.register(leave)
    hook = sys.excepthook

    def excepthook(*exc):  # a collective that failed because a process was lost: let the
        time.sleep(1.0)    # watch name the cause first (it ends the process)
        hook(*exc)

    sys.excepthook = excepthook

    def beat():
        while _links:
            for sock in list(_links.values()):
                _send(sock, {})
            time.sleep(timeout / 4)

    def watch(k: int, sock: socket.socket):
        sock.settimeout(timeout)
        try:
            for msg in _lines(sock):
                if _links.get(k) is not sock:  # this process is leaving: nothing more to watch
                    return
                if "bye" in msg:
                    _links.pop(k, None)
                    return
                if "fail" in msg:
                    fatal(msg["fail"] if k == 0 else f"process {k} failed: {msg['fail']}")
        except TimeoutError:
            fatal(f"process {me}: no word from process {k} for {timeout:g}s (its host is down or "
                   "the network is cut)")
        except (OSError, ValueError):
            pass
        if _links.get(k) is sock:  # not closed by our own leave()
            fatal(f"process {me}: process {k} ended without a word (killed or crashed)")

    threading.Thread(target=beat, daemon=True).start()
    for k, sock in links.items():
        threading.Thread(target=watch, args=(k, sock), daemon=True).start()


def _relay(address: str) -> str:
    """Process I > 0: a local port that forwards JAX's runtime client to the coordinator -> its
    address. When process 0 dies, JAX's client sees its connection close and ends this process at
    once by a C++ LOG(FATAL) (its log lines first), racing our watch; its `missed_heartbeat_callback`
    cannot be a Python function (jaxlib has no Python type for the status it passes: std::bad_cast,
    std::terminate). Through the relay, the client's side stays open until the watch has named the
    cause and ended the process; after process 0's "bye" (or our own leave) it closes."""
    srv = socket.create_server(("127.0.0.1", 0))

    def pump(src: socket.socket, dst: socket.socket, upstream: bool, pair: list):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        while upstream and pair[1] == 2 and _links.get(0) is not None:
            time.sleep(0.05)  # process 0's side closed first: the watch decides (death or bye)
        with pair[0]:
            pair[1] -= 1
            last = pair[1] == 0
        for sock in (src, dst):  # the first pump to end wakes the other, the last one closes
            with contextlib.suppress(OSError):
                sock.close() if last else sock.shutdown(socket.SHUT_RDWR)

    def serve():
        while True:
            down, _ = srv.accept()
            try:
                up = socket.create_connection(_port(address))
            except OSError:
                down.close()  # JAX's client retries
                continue
            pair = [threading.Lock(), 2]  # the pumps still running
            for a, b, upstream in ((down, up, False), (up, down, True)):
                threading.Thread(target=pump, args=(a, b, upstream, pair), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{srv.getsockname()[1]}"


def to_host(x) -> np.ndarray:
    """A (possibly multi-process, sharded) array -> the whole value as numpy on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
