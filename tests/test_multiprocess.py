"""Multi-process runs on this machine: 2 processes x 4 CPU devices (jax.distributed over
localhost, gloo collectives) give the official reference's logits and greedy tokens through the
Python API (HF and Orbax checkpoints), and print what one device prints through `dsv32 generate`
and `dsv32 chat`."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import fixture_dir, golden, xla_env

MESH = "2,2,2"

SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.stdout = open(os.environ["DSV32_TEST_OUT"], "w")  # apart from gloo's messages (see CLI)
    import numpy as np
    from sharding import distributed
    distributed.initialize()  # from DSV32_COORDINATOR / DSV32_NUM_PROCESSES / DSV32_PROCESS_ID
    import jax
    import dsv32_jax
    from sharding import make_mesh, parse_mesh
    paths, tokens = json.loads(sys.argv[1]), np.array(json.loads(sys.argv[2]))
    mesh = make_mesh(*parse_mesh(sys.argv[3]))
    p, n = json.loads(sys.argv[4])  # prompt length, greedy tokens
    prompts = [list(map(int, r[:p])) for r in tokens]
    out = {"processes": jax.process_count(), "local_devices": len(jax.local_devices())}
    for name, path in paths.items():
        model = dsv32_jax.load_model(path, dtype="float32", fp8_activations=False, mesh=mesh)
        w1 = model.params["moe_layers"]["ffn"]["experts"]["w1_weight"]
        out[name] = {
            "logits": distributed.to_host(model.logits(tokens)).tolist(),
            "greedy": model.generate(prompts, n, temperature=0, stop_tokens=[]),
            "local_shards": len(w1.addressable_shards),
            "local_experts": sorted({int(s.index[1].start) for s in w1.addressable_shards})}
    if jax.process_index() == 0:
        print(json.dumps(out))
""")

# `dsv32` with Python's stdout sent to the file $DSV32_TEST_OUT: the gloo library (CPU
# collectives) prints its own connection messages to the process's stdout from several threads,
# cut and interleaved with ours; this keeps what the program itself prints apart.
CLI = ("import os, sys; sys.stdout = open(os.environ['DSV32_TEST_OUT'], 'w'); "
       "from dsv32_jax.cli import main; sys.exit(main(sys.argv[1:]))")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(cmd: list[str], tmp, stdin: str = "", timeout: int = 600) -> list:
    """cmd as 2 processes x 4 devices, coordinated over a free localhost port through the DSV32_*
    variables -> [process 0, process 1]; each result's stdout is what Python printed (to
    $DSV32_TEST_OUT, see CLI). `stdin` goes to process 0; process 1 has none."""
    def result(proc, out_file, err):
        return subprocess.CompletedProcess(cmd, proc.returncode, out_file.read_text(), err)

    outs = [tmp / f"out{i}.txt" for i in range(2)]
    for f in outs:
        f.write_text("")
    coord = f"127.0.0.1:{_port()}"
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                              env=xla_env(4, DSV32_COORDINATOR=coord, DSV32_NUM_PROCESSES="2",
                                          DSV32_PROCESS_ID=str(i), DSV32_TEST_OUT=str(outs[i])))
             for i in range(2)]
    try:
        errs = [p.communicate(input=stdin if i == 0 else None, timeout=timeout)[1]
                for i, p in enumerate(procs)]
    finally:
        for p in procs:
            p.kill()
    return [result(p, f, e) for p, f, e in zip(procs, outs, errs)]


# what the gloo library itself prints (to stdout, from several threads, so its lines may be cut
# and interleaved) when the CPU collectives connect
GLOO = re.compile(r"\[Gloo\] Rank |\d+ is connected to \d+ peer ranks\. "
                  r"Expected number of connected peer ranks is : \d+")


def _text(stream: str) -> str:
    """A stream less gloo's messages and the blank lines they leave."""
    return "\n".join(l for l in GLOO.sub("", stream).splitlines() if l.strip())


def _ok(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode:
        pytest.fail(f"rc {proc.returncode}: {proc.stderr[-3000:]}")
    return _text(proc.stdout)


def test_two_processes_equal_the_reference(tmp_path):
    """Exact numerics on 2 processes x 4 devices (mesh 2,2,2), from the HF checkpoint and from its
    Orbax conversion: the official reference's logits (the parity tests' 1e-4 * std) and its
    greedy tokens; each process holds its own 4 devices' shards (4 of the 8 experts)."""
    from convert import convert_checkpoint

    case = fixture_dir("tiny-fp8")
    z = golden("tiny-fp8", "exact")
    p, n = int(z["prompt_len"]), z["greedy_tokens"].shape[1]
    orbax = tmp_path / "orbax"
    convert_checkpoint(case / "hf", orbax, progress=False)
    paths = {"hf": str(case / "hf"), "orbax": str(orbax)}
    multi = _run_two([sys.executable, "-c", SCRIPT, json.dumps(paths), json.dumps(z["tokens"].tolist()),
                      MESH, json.dumps([p, n])], tmp_path)
    two = json.loads(_ok(multi[0]).strip().splitlines()[-1])
    assert _ok(multi[1]).strip() == ""  # only process 0 prints
    assert (two["processes"], two["local_devices"]) == (2, 4)
    g = z["prefill_logits"]
    for name in ("hf", "orbax"):
        np.testing.assert_allclose(np.array(two[name]["logits"]), g, atol=1e-4 * g.std(), rtol=0,
                                   err_msg=name)
        assert two[name]["greedy"] == z["greedy_tokens"].tolist(), name
        assert two[name]["local_shards"] == 4  # process 0 holds its 4 devices' shards only
        assert two[name]["local_experts"] == [0, 1, 2, 3]  # 4 of the 8 experts, not all


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_two_processes(tmp_path, command, monkeypatch, capsys):
    """`dsv32 generate` and `dsv32 chat` on 2 processes x 4 devices (process 0 reads stdin and
    sends each line to process 1, which has no stdin) print what one device prints (the same
    command run here, without --mesh: exact numerics, so the same greedy replies); process 1
    prints nothing."""
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from dsv32_jax.cli import main
    from dsv32_jax.model.config import preset

    ckpt = tmp_path / "ck"
    write_checkpoint(preset("tiny"), ckpt)
    args = ["--prompt", "Hello there"] if command == "generate" else []
    argv = [command, "--ckpt", str(ckpt), *args, "--temperature", "0", "--max-new-tokens", "6",
            "--dtype", "float32", "--no-fp8"]
    stdin = "Hello there\n/clear\nand again\n/exit\n" if command == "chat" else ""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    assert main(argv) == 0
    text, err = capsys.readouterr()
    assert text.strip()
    if command == "chat":
        assert "conversation cleared" in err  # two turns read from stdin, then /exit
        assert len(re.findall(r"prefill \d+ tokens", err)) == 2
    multi = _run_two([sys.executable, "-c", CLI, *argv, "--mesh", MESH], tmp_path, stdin)
    assert _ok(multi[0]) == _text(text)  # the same greedy replies
    assert _ok(multi[1]) == ""  # process 1 computes with it but prints nothing
    assert _text(multi[1].stderr) == ""


def test_partial_multiprocess_settings_are_one_line_errors(tmp_path):
    env = xla_env(1, DSV32_COORDINATOR="127.0.0.1:1")
    env.pop("DSV32_NUM_PROCESSES", None)
    env.pop("DSV32_PROCESS_ID", None)
    proc = subprocess.run([sys.executable, "-m", "dsv32_jax.cli", "generate", "--ckpt",
                           str(tmp_path), "--prompt", "x"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "--num-processes" in proc.stderr, proc.stderr


def _start(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=xla_env(1, **env))


def test_join_failures_are_one_line(tmp_path):
    """A run that cannot start says why in one line within --init-timeout, exit 1, on every
    process: nobody at the coordinator, a process missing, the port in use, two processes with one
    id, another process count (JAX alone: a C++ abort after 300 s, or a segfault). All cases at
    once: each waits ~2 s past its start."""
    def gen(port, n, i):
        return _start(["-m", "dsv32_jax.cli", "generate", "--ckpt", str(tmp_path), "--prompt", "x",
                       "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                       "--process-id", str(i), "--init-timeout", "2"])

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    ports = [_port() for _ in range(4)]
    cases = {"unreachable": [gen(ports[0], 2, 1)],
             "missing": [gen(ports[1], 3, 0)],
             "port in use": [gen(held.getsockname()[1], 2, 0)],
             "duplicate": [gen(ports[2], 3, i) for i in (0, 1, 1)],
             "count": [gen(ports[3], 2, 0), gen(ports[3], 3, 1)]}
    want = {"unreachable": "process 1: cannot reach the coordinator 127.0.0.1:",
            "missing": "processes 1, 2 of 3 did not join within 2s",
            "port in use": "cannot listen on the coordinator port",
            "duplicate": "two processes use --process-id 1",
            "count": "was started with --num-processes 3, process 0 with 2"}
    try:
        for name, procs in cases.items():
            for p in procs:
                _, err = p.communicate(timeout=120)
                assert p.returncode == 1 and err.count("\n") == 1 and want[name] in err, (name, err)
    finally:
        held.close()
        for procs in cases.values():
            for p in procs:
                p.kill()


WATCHED = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    from sharding import distributed
    distributed.initialize()
    import jax
    from jax.experimental import multihost_utils
    victim, how = int(sys.argv[1]), sys.argv[2]
    multihost_utils.sync_global_devices("up")
    if jax.process_index() == victim and how == "error":
        distributed.leave("process 0 broke")  # what the CLI does on an error
        os._exit(1)
    if jax.process_index() == victim:
        os.kill(os.getpid(), getattr(signal, how))
    for k in range(600):  # the survivor waits in collectives until the watch ends it
        multihost_utils.broadcast_one_to_all(np.int32(k))
        time.sleep(0.1)
""")


LOST = {(1, "SIGKILL"): "process 0: process 1 ended without a word (killed or crashed)",
        (1, "SIGSTOP"): "process 0: no word from process 1 for 3s (its host is down or the "
                        "network is cut)",
        (0, "error"): "process 0 broke"}


def test_lost_process_ends_the_run():
    """A process killed (or frozen: its host lost) or failing after the run started ends the
    others within seconds with one line naming it, exit 1 and no abort (JAX alone: SIGABRT and a
    C++ stack dump after 100 s). Three runs of 2 processes at once."""
    runs = {}
    for victim, how in LOST:
        coord = f"127.0.0.1:{_port()}"
        runs[victim, how] = [_start(["-c", WATCHED, str(victim), how], DSV32_COORDINATOR=coord,
                                    DSV32_NUM_PROCESSES="2", DSV32_PROCESS_ID=str(i),
                                    DSV32_HEARTBEAT_TIMEOUT="3") for i in range(2)]
    try:
        for (victim, how), procs in runs.items():
            survivor = procs[1 - victim]
            _, err = survivor.communicate(timeout=120)
            assert survivor.returncode == 1, (how, survivor.returncode, err[-3000:])
            assert _text(err).strip() == f"error: multi-process run: {LOST[victim, how]}", err[-3000:]
    finally:
        for procs in runs.values():
            for p in procs:
                p.kill()


JOINED = textwrap.dedent("""
    import time
    from sharding import distributed
    distributed.initialize()
    print("up", flush=True)
    time.sleep(120)
""")


def test_process_0_killed_ends_the_others_in_one_line(tmp_path):
    """Process 0 hosts JAX's coordination service: when it dies, JAX's client in each other
    process ends it at once (its C++ log, a LOG(FATAL) stack trace, SIGABRT), racing the watch's
    line (about half the runs printed the C++ lines first). Through `distributed._relay` only the
    watch speaks: exit 1, one line, no core. Three runs of 2 processes at once."""
    runs = []
    for _ in range(3):
        coord = f"127.0.0.1:{_port()}"
        runs.append([subprocess.Popen([sys.executable, "-c", JOINED], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                      env=xla_env(1, DSV32_COORDINATOR=coord, DSV32_NUM_PROCESSES="2",
                                                  DSV32_PROCESS_ID=str(i)))
                     for i in range(2)])
    try:
        for procs in runs:
            for p in procs:
                assert p.stdout.readline() == "up\n", p.communicate(timeout=60)[1][-3000:]
        for first, _ in runs:
            first.kill()
        for _, survivor in runs:
            _, err = survivor.communicate(timeout=60)
            assert survivor.returncode == 1, (survivor.returncode, err[-3000:])
            assert err == ("error: multi-process run: process 1: process 0 ended without a word "
                           "(killed or crashed)\n"), err[-3000:]
        assert not list(tmp_path.glob("core*"))
    finally:
        for procs in runs:
            for p in procs:
                p.kill()
                p.wait(60)


@pytest.mark.parametrize("flag", ["--init-timeout", "--heartbeat-timeout"])
def test_timeouts_are_usage_errors(flag, capsys):
    from dsv32_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--ckpt", "x", "--prompt", "x", flag, "0"])
    assert e.value.code == 2 and "expected seconds > 0" in capsys.readouterr().err
