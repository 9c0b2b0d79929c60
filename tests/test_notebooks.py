"""The notebooks run as Jupyter runs them: `notebooks/run.py` executes each in a fresh kernel of
this Python (a timeout per cell), any error fails. Each has its own check of what it computes, read
from the kernel after its last cell; each plotting notebook's outputs hold its plots. The committed
notebooks hold the outputs of the code they hold (`make notebooks` stores the hash of the code
cells it ran)."""

from __future__ import annotations

import importlib.util
import json

import nbformat
import numpy as np
import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("notebooks_run", REPO / "notebooks" / "run.py")
nbrun = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbrun)

NOTEBOOKS = [p.name for p in nbrun.notebooks()]
PLOTS = {"02_sparse_attention.ipynb": 4}  # notebook -> the images its outputs hold
MARK = "notebook-probe: "


def _execute(name: str, probe: str) -> tuple:
    """Run notebook `name`, then in the same kernel the expression `probe` (JSON-able) ->
    (the executed notebook, the probe's value)."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(f"import json\nprint({MARK!r} + json.dumps({probe}))"))
    nbrun.execute(nb)
    out = "".join(o.get("text", "") for o in nb.cells.pop().outputs if o.output_type == "stream")
    return nb, json.loads(out.split(MARK, 1)[1])


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_outputs_are_of_the_committed_code(name):
    """A committed notebook holds the outputs of a run of its own code cells, every cell run in
    order without an error, no path of the machine it ran on, and its plots."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    assert nbrun.stored_hash(nb) == nbrun.code_hash(nb), (
        f"notebooks/{name}: its code cells are not the ones that produced its outputs: run "
        "`make notebooks` and commit the result")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"notebooks/{name}: not executed top to bottom in one run: run `make notebooks`"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = json.dumps([c.outputs for c in code])
    assert "site-packages" not in text and "/tmp/" not in text, f"notebooks/{name}: a machine's path"
    assert _images(nb) >= PLOTS.get(name, 0), f"notebooks/{name}: its plots are not in its outputs"


def test_every_notebook_is_checked():
    """A new notebook needs its own test of what it computes."""
    assert NOTEBOOKS == ["01_generate.ipynb", "02_sparse_attention.ipynb", "03_sharding.ipynb"]


def test_01_generate():
    """01_generate: the demo model, loaded with the deployment numerics, chats in the first cell
    after the imports and remembers the name from turn one; each turn prefills only its new
    tokens; shapes compile once (turn 1) and later turns reuse them; the tool call parses back to
    the call written; batched generation stops at EOS or the length asked, its greedy rows are the
    tokens a session streams (checked here again on the other prompt); the converted Orbax
    checkpoint holds the same params and gives the same reply."""
    nb, v = _execute("01_generate.ipynb", """{
        'numerics': [model.config.dtype, model.config.fp8_activations],
        'turns': [[ids, tok.decode(ids)] for _, ids in convo.turns],
        'stats': [first, second, third],
        'tool_calls': parsed['tool_calls'], 'eos': tok.eos_id,
        'greedy': greedy, 'sampled': sampled,
        'session_greedy_1': list(model.chat_session().stream(prompts[1], 24, temperature=0)),
        'orbax': [all(jax.tree.leaves(same)), orbax_convo.turns[0][1], orbax_first['compiled']],
        'vocab': model.config.vocab_size}""")
    assert v["numerics"] == ["bfloat16", True]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "Assistant: Nice to meet you, Alice!" in _text(code[1])  # the first cell after imports
    (ids1, _), (ids2, text2), (ids3, text3) = v["turns"]
    assert text3.endswith("What is my name?<｜Assistant｜></think>Your name is Alice.<｜end▁of▁sentence｜>")
    assert "Tokyo" in text2
    for k, (ids, s) in enumerate(zip((ids1, ids2, ids3), v["stats"])):
        assert ids[-1] == v["eos"] and s["decode_steps"] >= 2  # each reply ended by itself
        assert s["prefill_tokens"] + s["decode_steps"] == len(ids) + (k == 0)  # + BOS on turn 1
        assert bool(s["compiled"]) == (k == 0) and (s["compile_s"] > 0) == (k == 0)
    assert v["tool_calls"] == [{"type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}]
    for out in (v["greedy"], v["sampled"]):
        assert len(out) == 2
        for row in out:
            assert 0 < len(row) <= 24 and all(0 <= t < v["vocab"] for t in row)
            assert len(row) == 24 or row[-1] == v["eos"]
    assert v["session_greedy_1"] == v["greedy"][1]
    assert v["orbax"] == [True, ids1, []]


def test_02_sparse_attention():
    """02_sparse_attention on the demo model's conversation: finite logits of the text's shape;
    each query's top-k picks are distinct visible positions, every key while it sees at most
    index_topk; the dense attention is causal and sums to 1 per query; the recall of its mass by
    the inference picks matches the training forward's own recall and beats 16 keys at random in
    every layer; the name's query picks a token of "Alice" in some layer and predicts it; the
    logits move away from all-keys attention as index_topk shrinks (none at k >= S); the cost of
    every (impl, context) was measured; its four plots are drawn."""
    nb, v = _execute("02_sparse_attention.ipynb", """{
        'S': S, 'vocab': cfg.vocab_size, 'topk': cfg.index_topk, 'logits': list(logits.shape),
        'finite': bool(np.isfinite(np.asarray(logits)).all()), 'picks': picks.tolist(),
        'dense_sums': dense.sum(-1).tolist(), 'above': float(np.triu(dense, 1).max()),
        'recall': rec, 'train_recall': np.asarray(stats['recall']).tolist(), 'uniform': uniform,
        'alice': alice, 'q': q, 'q_picks': picks[:, q].tolist(),
        'predicted': tok.decode([int(np.argmax(logits[0, q]))]), 'ks': ks, 'kl': kl, 'loss': loss,
        'cost': [[impl, T, *c] for (impl, T), c in cost.items()]}""")
    s, k = v["S"], v["topk"]
    assert v["logits"] == [1, s, v["vocab"]] and v["finite"]
    for layer in v["picks"]:
        for q, p in enumerate(layer):
            p = [i for i in p if i >= 0]
            assert len(set(p)) == len(p) == min(k, q + 1) and max(p) <= q
    assert all(abs(x - 1) < 1e-3 for row in v["dense_sums"] for x in row) and v["above"] == 0
    for r, t in zip(v["recall"], v["train_recall"], strict=True):
        assert abs(r - t) < 0.02 and v["uniform"] < r <= 1
    assert any(set(v["alice"]) & set(p) for p in v["q_picks"]) and v["predicted"] == " Alice"
    assert v["ks"][0] >= s and v["kl"][0] == 0 and v["kl"][-1] > v["kl"][1] > 0
    assert v["loss"][-1] > v["loss"][0]
    assert sorted((impl, t) for impl, t, *_ in v["cost"]) == [
        (impl, t) for impl in ("xla", "xla_dense") for t in (256, 512, 1024)]
    assert all(0 < x < 60 for *_, pre, dec in v["cost"] for x in (pre, dec))
    assert _images(nb) == PLOTS["02_sparse_attention.ipynb"]


def test_03_sharding():
    """03_sharding: 8 simulated devices (XLA_FLAGS set in its first cell, before JAX starts) on a
    1x4x2 mesh; the routed experts split over the devices, each device holding less than all the
    params; the compiled prefill step holds the expert-parallel all-to-all; the logits on the mesh
    are those of one device (argmax everywhere); the planner's best mesh of the released model
    fits 8 x H200 and 16 x H100 at the full context."""
    _, v = _execute("03_sharding.ipynb", """{
        'devices': len(jax.devices()), 'mesh': list(mesh.devices.shape), 'ops': dict(ops),
        'experts': str(model8.params['moe_layers']['ffn']['experts']['w1_weight'].sharding.spec),
        'held': list(held.values()), 'total': total,
        'diff': float(np.abs(on8 - on1).max()), 'argmax': bool((on8.argmax(-1) == on1.argmax(-1)).all()),
        'plans': [[list(p.mesh), p.fits] for p in (
            planner.search(released, n, released.max_seq_len, 1, int(m))[0]
            for n, m in ((8, 141e9), (16, 80e9)))]}""")
    assert v["devices"] == 8 and v["mesh"] == [1, 4, 2]
    assert v["ops"].get("all-to-all", 0) >= 1, v["ops"]
    assert "expert" in v["experts"]
    assert len(v["held"]) == 8 and sum(v["held"]) >= v["total"] and max(v["held"]) < v["total"]
    assert v["argmax"] and v["diff"] < 0.05
    assert [(np.prod(m), fits) for m, fits in v["plans"]] == [(8, True), (16, True)]
