"""`dsv32 serve` as 2 processes x 1 CPU device (data, or experts, over the two processes): process 0
serves HTTP and broadcasts each step, process 1 runs it. Greedy replies equal `Model.generate` of one
device (exact numerics), SIGTERM drains and both exit 0; a process lost ends the other in one line, process
0's open request hearing why."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import xla_env

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

READY = re.compile(r"dsv32 serve: \S+ on (http://\S+)/v1 ")
START_S = 120
EXIT_S = 30


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from dsv32_jax.model.config import preset

    path = tmp_path_factory.mktemp("serve-mp") / "tiny"
    write_checkpoint(preset("tiny"), path)
    return path


class Run:
    """`dsv32 serve` as 2 processes on a free coordinator port; stderr kept per process, stdout (where the gloo
    library prints) dropped. `url` once process 0 is ready."""

    def __init__(self, ckpt, *extra: str) -> None:
        coord = f"127.0.0.1:{_port()}"
        cmd = [sys.executable, "-m", "dsv32_jax.cli", "serve", "--ckpt", str(ckpt), "--port", "0", "--no-warmup",
               "--dtype", "float32", "--no-fp8", *extra]
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True,
                                       env=xla_env(1, DSV32_COORDINATOR=coord, DSV32_NUM_PROCESSES="2",
                                                   DSV32_PROCESS_ID=str(i), DSV32_HEARTBEAT_TIMEOUT="10"))
                      for i in range(2)]
        self.err: list[list[str]] = [[], []]
        self.url: str | None = None
        self._ready = threading.Event()
        for i in range(2):
            threading.Thread(target=self._read, args=(i,), daemon=True).start()

    def _read(self, i: int) -> None:
        for line in self.procs[i].stderr:
            self.err[i].append(line)
            m = READY.search(line)
            if m and i == 0:
                self.url = m.group(1)
                self._ready.set()
        if i == 0:
            self._ready.set()  # process 0 ended

    def ready(self) -> str:
        if not self._ready.wait(START_S) or self.url is None:
            raise AssertionError(f"dsv32 serve did not start:\n{self.stderr()}")
        return self.url

    def wait(self, i: int) -> int:
        try:
            rc = self.procs[i].wait(EXIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process {i} did not exit within {EXIT_S} s") from None
        time.sleep(0.2)  # the reader thread takes the last lines
        return rc

    def stderr(self) -> str:
        return "".join(f"--- process {i}:\n{''.join(e)}" for i, e in enumerate(self.err))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _stream(url: str, body: dict):
    """The data lines of a streamed text completion, as they come."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                yield line[6:]


def test_two_process_server_equals_generate_and_drains_on_sigterm(ckpt):
    """On a (2,1,1) mesh (data over the processes), three requests of mixed lengths on two running
    slots (one per data group; the one left waiting is admitted mid-decode, its prefill beside a
    decode) give `Model.generate`'s greedy tokens; SIGTERM
    with the third streaming lets it finish, then both processes exit 0 and process 1 printed
    nothing. Speculative (k = 1, the synthetic checkpoint's MTP layer): each step's kind goes out with
    its inputs (the other test runs plain steps)."""
    import dsv32_jax
    from dsv32_jax.text.tokenizer import Tokenizer

    # each process a data group: the pool split over the processes, one running slot each
    run = Run(ckpt, "--max-batch", "2", "--chunk", "16", "--speculative", "1", "--mesh", "2,1,1")
    try:
        rng = np.random.default_rng(0)
        prompts, ns = [rng.integers(3, 2000, n).tolist() for n in (5, 12, 16)], [4, 8, 8]
        model = dsv32_jax.load_model(str(ckpt), dtype="float32", fp8_activations=False)
        tok = Tokenizer.load(str(ckpt))
        ref = model.generate(prompts, max(ns), temperature=0, stop_tokens=[])
        want = [tok.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(ref, ns)]
        assert len(set(want)) == len(want)
        client = openai.OpenAI(base_url=run.ready() + "/v1", api_key="none", max_retries=0, timeout=120)
        got: dict[int, object] = {}

        def ask(i):
            got[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=ns[i], temperature=0,
                                               extra_body={"ignore_eos": True})

        asks = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in asks:
            t.start()
        body = {"model": "tiny", "prompt": prompts[2], "max_tokens": ns[2], "temperature": 0, "ignore_eos": True}
        lines = _stream(run.url, body)
        text = json.loads(next(lines))["choices"][0]["text"]
        run.procs[0].send_signal(signal.SIGTERM)
        for t in asks:
            t.join(120)
        for line in lines:
            if line != "[DONE]":
                chunk = json.loads(line)
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
        assert [got[0].choices[0].text, got[1].choices[0].text, text] == want
        assert [got[i].usage.completion_tokens for i in range(2)] == ns[:2]
        assert (run.wait(0), run.wait(1)) == (0, 0)
        assert run.err[1] == [] and "dsv32 serve: stopped\n" in run.err[0]
    except AssertionError as e:
        raise AssertionError(f"{e}\n{run.stderr()}") from None
    finally:
        run.kill()


LOST = "error: multi-process run: process {}: process {} ended without a word (killed or crashed)\n"


def test_a_lost_process_ends_the_other_in_one_line(ckpt):
    """Two runs at once. Process 1 killed while process 0 streams a reply: the stream ends with an error
    event naming the loss, process 0 exits 1 with that one line last. Process 0 killed: process 1 (waiting
    for the next step) exits 1 with one line."""
    follower_lost, lead_lost = Run(ckpt, "--max-batch", "1"), Run(ckpt, "--max-batch", "1")
    try:
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        lines = _stream(follower_lost.ready(), body)
        next(lines)
        follower_lost.procs[1].kill()
        rest = list(lines)
        assert rest[-1] == "[DONE]", rest[-3:]
        error = json.loads(rest[-2])["error"]["message"]
        assert error == LOST.format(0, 1)[len("error: "):-1], error
        assert follower_lost.wait(0) == 1
        assert follower_lost.err[0][-1] == LOST.format(0, 1)

        lead_lost.ready()
        lead_lost.procs[0].kill()
        assert lead_lost.wait(1) == 1
        assert lead_lost.err[1] == [LOST.format(1, 0)]
    except AssertionError as e:
        raise AssertionError(f"{e}\n{follower_lost.stderr()}\n{lead_lost.stderr()}") from None
    finally:
        follower_lost.kill()
        lead_lost.kill()
