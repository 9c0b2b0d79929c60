"""`dsv32 demo` end to end: synthetic checkpoint (cached), load, forward, report."""

from __future__ import annotations

import re

from dsv32_jax.cli import main


def test_demo_runs_and_caches(tmp_path, capsys):
    args = ["demo", "--cache-dir", str(tmp_path), "--batch", "2", "--seq-len", "24"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "wrote synthetic checkpoint" in out
    rows = re.findall(r"sequence (\d): top next-token candidates: (.*)", out)
    assert [r[0] for r in rows] == ["0", "1"]
    for _, cands in rows:
        probs = [float(p) for p in re.findall(r"\(([0-9.]+)\)", cands)]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    assert re.search(r"tokens/s", out)
    assert main(args) == 0  # second run reuses the cached checkpoint
    assert "using cached synthetic checkpoint" in capsys.readouterr().out
