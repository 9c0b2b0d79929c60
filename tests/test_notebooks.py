"""The notebooks' code cells run as written (no Jupyter needed); what they compute is checked."""

from __future__ import annotations

import json

import numpy as np

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _run(path, on_model) -> dict:
    """Execute the code cells in order in one scope; `on_model(model)` once `model` exists."""
    nb = json.loads(path.read_text())
    scope: dict = {}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}[cell {i}]", "exec"), scope)
            if "model" in scope and on_model is not None:
                on_model(scope["model"])
                on_model = None
    return scope


def test_quickstart_values():
    """quickstart.ipynb on its synthetic tiny checkpoint: the deployment numerics, finite logits of
    the shape it prints, greedy generation of the asked length (or up to a stop token), the stream
    giving the greedy tokens of the same prompt, its stats counting that prompt and those steps,
    and each query's top-k picks distinct visible positions."""
    seen: dict = {"generate": [], "stream": []}

    def record(model):  # the notebook's own calls, observed
        generate, stream = model.generate, model.generate_stream

        def gen(*a, **k):
            seen["generate"].append((k.get("temperature"), generate(*a, **k)))
            return seen["generate"][-1][1]

        def streamed(*a, **k):
            for step in stream(*a, **k):
                seen["stream"].append(step)
                yield step

        model.generate, model.generate_stream = gen, streamed

    s = _run(REPO / "notebooks" / "quickstart.ipynb", record)
    cfg = s["model"].config
    assert cfg.dtype == "bfloat16" and cfg.fp8_activations
    logits = np.asarray(s["logits"])
    assert logits.shape == (2, 40, cfg.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(logits).all() and logits.std() > 0
    (t0, greedy), (t1, sampled) = seen["generate"]
    assert t0 == 0 and t1 == 0.7
    for out in (greedy, sampled):
        assert len(out) == 2
        for row in out:
            assert 0 < len(row) <= 16 and all(0 <= t < cfg.vocab_size for t in row)
            assert len(row) == 16 or row[-1] == cfg.eos_token_id  # stopped: the EOS ends it
    stream = [step[0] for step in seen["stream"] if step[0] is not None]
    assert stream and stream == greedy[0][:len(stream)], (stream, greedy[0])
    assert s["stats"]["prefill_tokens"] == len(s["prompts"][0])
    assert s["stats"]["decode_steps"] == len(seen["stream"])
    picks = np.asarray(s["inter"]["topk"])  # (L, B, S, k)
    for row in picks.reshape(-1, picks.shape[2], picks.shape[3]):
        for q, p in enumerate(row):
            p = p[p >= 0]
            assert len(set(p)) == len(p) == min(cfg.index_topk, q + 1) and p.max() <= q


def test_every_notebook_is_checked():
    """A new notebook needs its own test of what it computes."""
    assert [p.name for p in NOTEBOOKS] == ["quickstart.ipynb"]
