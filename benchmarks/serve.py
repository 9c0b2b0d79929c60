"""`dsv32 serve` under load, against static batching on the same requests, in one run.

    python -m benchmarks.serve [--ckpt DIR] [--clients 1 8 32] [--requests N] [--json FILE] [--pin]
                               [--part all|throughput|prefix]

1. A fixed mix of requests (raw-text prompts of 20-300 tokens, max_tokens 16-128, greedy,
   ignore_eos: every reply is max_tokens long; by default 4 per client at the most clients) goes
   through the real HTTP server (`dsv32 serve`, a subprocess on 127.0.0.1), streamed, from N
   concurrent clients, each sending its next request when its last one ended: output tokens/s,
   time to first token and time per output token (TPOT) p50/p99.
2. The same requests through `Model.generate` in static batches of N (each batch waits for its
   longest request, no stop token; tokens past a request's max_tokens are not counted): output
   tokens/s, and the ratio continuous / static. `Model.generate` runs on the same engine core
   (`engine.batch`: a batch's prompts prefilled together, then decode steps of up to 16 tokens
   per program), so the two differ in the batching policy and in the server around the engine.
   Both print the engine's busy fraction: the seconds its steps took (the server's
   engine_step_seconds_total; generate's prefill_s + decode_s) over the wall time; the continuous
   rows also the share the engine waited for requests (engine_idle_seconds_total; the rest is
   the engine thread's Python: scheduling, and waiting for the interpreter lock), the step programs
   it compiled in the timed pass (engine_compiles_total: a shape the warm-up and the untimed pass
   left; each compile stalls every request for seconds) and the CPU
   cores the server and the clients (this process's threads, on the same machine) used.
   And the same requests through the engine core alone, without the server: all submitted at once
   to an `Engine` running N at a time (as `--max-batch N`, decode steps of one token), driven from
   the benchmark's thread: what continuous batching gives before HTTP and the clients.
`--pin` (Linux): the server, static and engine-alone runs get the same CPUs, all but the last; the
client threads get the last one. Unpinned, on a 2-CPU machine the clients take 0.3-0.7 of a core
from the server's engine, while static and alone run with no clients beside them.
3. Prefix caching: chat requests that share a long system prompt, on a server with and one without
   the prefix cache: prefill tokens saved (from /metrics) and time to first token.
Every server compiles its step shapes before it serves (its warm-up; the later servers run the same
programs and find them in the compile cache) and is measured after an untimed run of the same kind
of load; the throughput server runs without the prefix cache (the mix runs more than once). Absolute times
are only meaningful for the machine printed; the ratios are the result.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dsv32_jax" / "demo_model"
CORPUS = ROOT / "dsv32_jax" / "text" / "bpe_corpus.txt"
MODEL = "dsv32"


def mix(n: int, tokenizer) -> list[dict]:
    """n requests: raw prompts cut from the demo corpus, 20-300 tokens, max_tokens 16-128."""
    words = CORPUS.read_text().split()
    out = []
    for i in range(n):
        want = (20, 60, 150, 300)[i % 4]
        start = (i * 997) % (len(words) - 400)
        text, k = "", 1
        while len(tokenizer.encode(text)) < want:
            text = " ".join(words[start:start + k])
            k += 4
        out.append({"prompt": text, "max_tokens": (16, 128, 32, 64)[(i // 4) % 4], "ignore_eos": True})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`dsv32 serve` as a subprocess on a free port, its stderr in a temporary file."""

    def __init__(self, ckpt: Path, *extra: str, warmup: bool = False, cpus: set[int] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsv32_jax.cli", "serve", "--ckpt", str(ckpt), "--port",
             str(self.port), *(() if warmup else ("--no-warmup",)), "--served-model-name", MODEL,
             *extra], cwd=ROOT, stderr=self.log, text=True,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
        deadline = time.monotonic() + 1800  # a warm-up compiles every step shape
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"dsv32 serve exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("dsv32 serve did not become healthy in 1800 s")

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if not line.startswith("#") and line.split("{")[0].split()[0].endswith(name):
                return float(line.split()[-1])
        raise KeyError(f"/metrics has no {name}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def cpu_s(pid: int) -> float | None:
    """Seconds of CPU (user + system, all threads) process `pid` has used: /proc (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def stream(url: str, path: str, body: dict) -> dict:
    """One streamed request -> its time to first token, time per output token after the first
    (a chunk may hold several tokens when the server is behind), tokens out."""
    t0 = time.perf_counter()
    stamps, usage = [], None
    with httpx.stream("POST", url + path, json={**body, "model": MODEL, "stream": True,
                                                 "stream_options": {"include_usage": True}},
                      timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(_has_text(c) for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(stamps)
    tpot = (stamps[-1] - stamps[0]) / (tokens - 1) if len(stamps) > 1 and tokens > 1 else None
    return {"ttft": stamps[0] - t0 if stamps else None, "tpot": tpot, "tokens": tokens}


def _has_text(choice: dict) -> bool:
    d = choice.get("delta") or {}
    return bool(choice.get("text") or d.get("content") or d.get("reasoning_content"))


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(the server's / static's CPUs, the clients' CPU): all but the last of this process's, and the last."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (set(cpus[:-1]), set(cpus[-1:])) if len(cpus) > 1 else None


def pin(cpus: set[int]) -> None:
    """Every thread of this process (XLA's pool among them) onto `cpus` (Linux)."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cpus)


def drive(url: str, path: str, bodies: list[dict], clients: int, cpus: set[int] | None = None) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients, initializer=None if cpus is None else os.sched_setaffinity,
                               initargs=() if cpus is None else (0, cpus)) as pool:
        results = list(pool.map(lambda b: stream(url, path, b), bodies))
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99)}


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def static(model, ids: list[list[int]], bodies: list[dict], batch: int) -> dict:
    """The requests (`ids`: their prompts encoded) through Model.generate in static batches of `batch` (greedy)."""
    stats = [{} for _ in range(0, len(ids), batch)]
    run = lambda: [model.generate(ids[i:i + batch], max(b["max_tokens"] for b in bodies[i:i + batch]),  # noqa: E731
                                  temperature=0, stop_tokens=[], stats=st)
                   for i, st in zip(range(0, len(ids), batch), stats)]
    run()  # compile
    t0 = time.perf_counter()
    outs = [o for group in run() for o in group]
    wall = time.perf_counter() - t0
    tokens = sum(min(len(o), b["max_tokens"]) for o, b in zip(outs, bodies))
    steps = sum(st["prefill_s"] + st["decode_s"] for st in stats)
    return {"batch": batch, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "busy": steps / wall}


def alone(model, ids: list[list[int]], bodies: list[dict], batch: int, chunk: int) -> dict:
    """The requests through the engine core without the server: all submitted at once to an
    `Engine` of `batch` running sequences (as the server's --max-batch, no prefix cache), driven
    from this thread (`Engine.run`), greedy, each to its max_tokens."""
    from dsv32_jax.engine.core import Engine
    from dsv32_jax.engine.scheduler import Sampling

    def run():
        eng = Engine(model, max_batch=batch, chunk=chunk, prefix_cache=False)
        for i, b in zip(ids, bodies):
            eng.submit(i, Sampling(b["max_tokens"], temperature=0.0), lambda *a: None)
        t0 = time.perf_counter()
        for _ in eng.run():
            pass
        return time.perf_counter() - t0, eng

    run()  # compile
    wall, eng = run()
    tokens = sum(b["max_tokens"] for b in bodies)
    return {"batch": batch, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "busy": eng.metrics()["step_s"] / wall}


def prefix_mix(n: int, other: bool = False) -> list[dict]:
    """n chats sharing one ~180-word system prompt; `other`: other user turns (a warm-up set)."""
    words = CORPUS.read_text().split()
    system = " ".join(words[:180])
    first = 600 if other else 200
    return [{"messages": [{"role": "system", "content": system},
                          {"role": "user", "content": " ".join(words[first + 7 * i:first + 5 + 7 * i])}],
             "max_tokens": 16, "temperature": 0} for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, default=DEMO)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=None, help="default: 4 x the most clients")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, nargs="+", default=[1],
                    help="the servers' --decode-steps: one continuous run per value (default 1)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--pin", action="store_true",
                    help="the clients on the last CPU, the server, static and alone on the others")
    ap.add_argument("--part", choices=("all", "throughput", "prefix"), default="all",
                    help="run parts 1-2 (throughput), part 3 (prefix) or both")
    args = ap.parse_args(argv)
    import dsv32_jax
    from dsv32_jax.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.ckpt)
    n_requests = args.requests or 4 * max(args.clients)
    bodies = [{**b, "temperature": 0} for b in mix(n_requests, tokenizer)]
    split = split_cpus() if args.pin else None
    if args.pin and split is None:
        ap.error("--pin needs Linux and at least 2 CPUs for this process")
    engine_cpus, client_cpus = split or (None, None)
    where = f"; server, static and alone on CPUs {sorted(engine_cpus)}, clients on {sorted(client_cpus)}" \
        if split else "; no CPUs pinned"
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs{where}", "requests": len(bodies),
              "continuous": [], "static": [], "alone": [], "prefix": {}}
    if args.part != "prefix":
        for steps in args.decode_steps:
            server = Server(args.ckpt, "--max-batch", str(max(args.clients)), "--chunk", str(args.chunk),
                            "--decode-steps", str(steps), "--no-prefix-cache",
                            warmup=True, cpus=engine_cpus)  # every step shape compiled before it serves
            try:
                drive(server.url, "/v1/completions", bodies, max(args.clients), client_cpus)  # untimed: warm
                for n in args.clients:
                    busy, cpu = server.metric("engine_step_seconds_total"), cpu_s(server.proc.pid)
                    idle, mine = server.metric("engine_idle_seconds_total"), time.process_time()
                    compiles = server.metric("engine_compiles_total")
                    r = drive(server.url, "/v1/completions", bodies, n, client_cpus) | {"decode_steps": steps}
                    r["busy"] = (server.metric("engine_step_seconds_total") - busy) / r["wall_s"]
                    r["idle"] = (server.metric("engine_idle_seconds_total") - idle) / r["wall_s"]
                    r["client_cores"] = (time.process_time() - mine) / r["wall_s"]
                    r["compiles"] = server.metric("engine_compiles_total") - compiles  # in the timed pass
                    if cpu is not None:
                        r["server_cores"] = (cpu_s(server.proc.pid) - cpu) / r["wall_s"]
                    report["continuous"].append(r)
                    print(json.dumps(report["continuous"][-1]), flush=True)
            finally:
                server.close()
        if split:
            pin(engine_cpus)  # static and alone on the server's CPUs
        model = dsv32_jax.load_model(args.ckpt)
        ids = [tokenizer.encode(b["prompt"]) for b in bodies]
        for n in args.clients:
            report["static"].append(static(model, ids, bodies, n))
            print(json.dumps(report["static"][-1]), flush=True)
            report["alone"].append(alone(model, ids, bodies, n, args.chunk))
            print(json.dumps(report["alone"][-1]), flush=True)
        del model
    if args.part != "throughput":
        for name, extra in (("on", ()), ("off", ("--no-prefix-cache",))):
            server = Server(args.ckpt, "--max-batch", str(max(args.clients)), "--chunk", str(args.chunk),
                            *extra, warmup=True, cpus=engine_cpus)  # its programs: from the compile cache
            try:
                drive(server.url, "/v1/chat/completions", prefix_mix(16, other=True), 8, client_cpus)  # untimed
                hit0 = server.metric("prefix_cache_hit_tokens_total")
                r = drive(server.url, "/v1/chat/completions", prefix_mix(16), 8, client_cpus)
                r["prefill_tokens_saved"] = server.metric("prefix_cache_hit_tokens_total") - hit0
                report["prefix"][name] = r
                print(name, json.dumps(r), flush=True)
            finally:
                server.close()
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def print_table(r: dict) -> None:
    print(f"\n{r['requests']} requests, {r['machine']}\n")
    print("| clients | decode steps | continuous tok/s | static tok/s | ratio | engine busy (cont. / static) "
          "| engine idle | compiles | cores: server / clients | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    static = {s["batch"]: s for s in r["static"]}  # empty with --part prefix
    alone = {s["batch"]: s for s in r.get("alone", [])}
    for c in r["continuous"] if static else ():
        s = static[c["clients"]]
        print(f"| {c['clients']} | {c['decode_steps']} | {c['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | "
              f"{c['tokens_per_s'] / s['tokens_per_s']:.2f}x | {100 * c['busy']:.0f}% / {100 * s['busy']:.0f}% | "
              f"{100 * c['idle']:.0f}% | {c.get('compiles', 0):.0f} | "
              f"{c.get('server_cores', float('nan')):.2f} / {c['client_cores']:.2f} | "
              f"{c['ttft_p50_s']:.2f} / {c['ttft_p99_s']:.2f} | "
              f"{1e3 * c['tpot_p50_s']:.0f} / {1e3 * c['tpot_p99_s']:.0f} |")
    if alone:
        print("\nThe engine core alone (no server; every request submitted at once, `clients` running):\n")
        print("| running | engine alone tok/s | static tok/s | ratio | engine busy |")
        print("|---|---|---|---|---|")
        for n, a in alone.items():
            print(f"| {n} | {a['tokens_per_s']:.1f} | {static[n]['tokens_per_s']:.1f} | "
                  f"{a['tokens_per_s'] / static[n]['tokens_per_s']:.2f}x | {100 * a['busy']:.0f}% |")
    on, off = r["prefix"].get("on"), r["prefix"].get("off")
    if on and off:
        print(f"\nshared system prompt (after other chats with it), 16 chats, 8 clients: prefill tokens "
              f"saved {on['prefill_tokens_saved']:.0f} (off: {off['prefill_tokens_saved']:.0f}); TTFT p50 {on['ttft_p50_s']:.3f} s with the prefix "
              f"cache, {off['ttft_p50_s']:.3f} s without ({off['ttft_p50_s'] / on['ttft_p50_s']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
