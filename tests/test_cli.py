"""The `dsv32` CLI end to end on a synthetic checkpoint: demo, generate, chat."""

from __future__ import annotations

import io
import re

import pytest

from dsv32_jax import preset
from dsv32_jax.cli import main
from dsv32_jax.checkpoint.synthetic import write_checkpoint


def test_demo_runs_and_caches(tmp_path, capsys):
    args = ["demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "wrote synthetic checkpoint" in out
    assert "chat template" in out and "<｜User｜>" in out
    m = re.search(r"prefill (\d+) tokens in [0-9.]+s \(([0-9.]+) tok/s\), decode (\d+) tokens", out)
    assert m and int(m.group(1)) > 0 and float(m.group(2)) > 0 and 1 <= int(m.group(3)) <= 8
    assert re.search(r"cache: \d+ B/token/layer MLA \+ \d+ B indexer keys", out)
    m = re.search(r"attended (\d+) of the (\d+) keys available \(index_topk=16\)", out)
    assert m and int(m.group(1)) == min(16, int(m.group(2)))
    assert main(args) == 0  # the second run reuses the cached checkpoint
    assert "using cached synthetic checkpoint" in capsys.readouterr().out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(preset("tiny"), tmp_path_factory.mktemp("ckpt") / "tiny")


def test_generate(ckpt, capsys):
    args = ["generate", "--ckpt", ckpt, "--prompt", "Hello there", "--max-new-tokens", "5",
            "--temperature", "0", "--dtype", "float32"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "loaded in" in first.err and re.search(r"decode [1-5] tokens", first.err)
    assert main(args) == 0  # greedy: the same text again
    assert capsys.readouterr().out == first.out


def test_chat_clear_and_exit(ckpt, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/clear\nagain\n/exit\nnever read\n"))
    assert main(["chat", "--ckpt", ckpt, "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "conversation cleared" in err
    assert len(re.findall(r"prefill \d+ tokens", err)) == 2  # two turns, then /exit


def test_generate_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x"])  # --ckpt is required
    with pytest.raises(FileNotFoundError):
        main(["generate", "--ckpt", str(tmp_path / "missing"), "--prompt", "x"])
