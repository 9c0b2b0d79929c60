"""benchmarks/kernels.py runs: the --quick table on CPU, and the GPU session's --gpu-all script
on tiny shapes (checks pass, files written)."""

from __future__ import annotations

import json

from benchmarks import kernels


def test_quick_table_prints(capsys):
    assert kernels.main(["--quick", "--repeats", "1", "--only", "topk", "sparse_mla"]) == 0
    out = capsys.readouterr().out
    assert "INTERPRETED" in out and "| sparse_mla | decode |" in out and "xla lax.top_k" in out


def test_gpu_all_script_on_tiny_shapes(tmp_path):
    assert kernels.main(["--quick", "--gpu-all", "--repeats", "1", "--only", "topk",
                         "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "kernels.json").read_text())
    assert len(res["checks"]) == 7 and all(c["ok"] for c in res["checks"])
    assert res["table"] and all(r["kernel"] == "topk" for r in res["table"])
    assert "Block sweep" in (tmp_path / "kernels.md").read_text()
