"""`dsv32_jax.dirlock`: one writer per output directory, between real processes; a writer killed
with SIGKILL leaves a lock the next one takes over; a lock path that is not ours is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from dsv32_jax.dirlock import Busy, hold, lock_path

from conftest import REPO

HOLDER = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("dirlock", {str(REPO / "dsv32_jax" / "dirlock.py")!r})
dirlock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dirlock)  # alone: no jax import, a quick second process
lock = dirlock.hold(sys.argv[1], "test holder")
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin (or kills us)
lock.release()
"""


def holder(directory) -> subprocess.Popen:
    """A second process holding the lock of `directory` until its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_second_process_is_refused_then_takes_over(tmp_path):
    out = tmp_path / "out"
    proc = holder(out)
    try:
        with pytest.raises(Busy, match=rf"{out} is being written by pid {proc.pid} \(test holder\)"):
            hold(out, "me")
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert not os.path.exists(lock_path(out))  # a writer that ends removes its lock file
    with hold(out, "me"):
        assert open(lock_path(out)).read() == f"{os.getpid()} me\n"
    assert os.listdir(tmp_path) == []  # nothing else was created: not even `out`


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    proc = holder(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert os.path.exists(lock_path(out))  # stale, and unlocked by the kernel
    with hold(out, "me"):
        with pytest.raises(Busy, match=f"pid {os.getpid()}"):  # one writer in one process too
            hold(out, "again")
    assert not os.path.exists(lock_path(out))


def test_a_lock_path_that_is_not_ours_is_left_alone(tmp_path):
    out = tmp_path / "out"
    path = lock_path(out)
    with open(path, "w") as f:
        f.write("my notes\n")
    with pytest.raises(ValueError, match="not a lock file of dsv32"):
        hold(out, "me")
    assert open(path).read() == "my notes\n"
    os.remove(path)
    os.mkdir(path)
    with pytest.raises(ValueError, match="cannot be opened as the lock file"):
        hold(out, "me")
    os.rmdir(path)
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(ValueError, match="cannot be opened as the lock file"):
        hold(out, "me")
    assert not os.path.exists(tmp_path / "elsewhere")


def test_synthetic_checkpoint_writer_takes_the_lock(tmp_path):
    """write_checkpoint (`dsv32 demo --random`'s cache) refuses a directory another process is
    writing, before it creates or removes anything."""
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from dsv32_jax.model.config import preset

    out = tmp_path / "synthetic"
    proc = holder(out)
    try:
        with pytest.raises(Busy, match=f"pid {proc.pid}"):
            write_checkpoint(preset("tiny"), out)
        assert os.listdir(tmp_path) == ["synthetic.lock"]
    finally:
        proc.kill()
        proc.wait(60)


def test_demo_training_takes_the_lock_of_out(tmp_path, capsys, monkeypatch):
    """`python -m dsv32_jax.train.demo OUT` refuses an OUT another process is writing, in one
    line with exit status 1, before it writes anything (its stages' own locks did not cover OUT:
    two demo runs into one OUT interleaved their corpus, tokenizer and model)."""
    from dsv32_jax.train import corpus
    from dsv32_jax.train.demo import main

    def written(*_):
        raise AssertionError("the demo went on to write OUT")  # (not a training of minutes)

    monkeypatch.setattr(corpus, "write_corpus", written)
    out = tmp_path / "demo"
    proc = holder(out)
    try:
        assert main([str(out)]) == 1
        err = capsys.readouterr().err
        assert err == (f"python -m dsv32_jax.train.demo: error: {out} is being written by pid "
                       f"{proc.pid} (test holder); wait for it to finish, or stop it, or choose "
                       "another directory\n")
        assert os.listdir(tmp_path) == ["demo.lock"]
    finally:
        proc.kill()
        proc.wait(60)


def test_two_spellings_of_one_directory_share_the_lock(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    with hold(tmp_path / "real" / "out", "me"):
        with pytest.raises(Busy):
            hold(tmp_path / "alias" / "out", "me")
