"""The notebooks run as Jupyter runs them: `notebooks/run.py` executes each in a fresh kernel of
this Python (a timeout per cell), any error fails. Each has its own check of what it computes, read
from the kernel after its last cell; each plotting notebook's outputs hold its plots. The committed
notebooks hold the outputs of the code they hold (`make notebooks` stores the hash of the code
cells it ran)."""

from __future__ import annotations

import importlib.util
import json
import os

import nbformat
import numpy as np
import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("notebooks_run", REPO / "notebooks" / "run.py")
nbrun = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbrun)

NOTEBOOKS = [p.name for p in nbrun.notebooks()]
PLOTS = {"02_sparse_attention.ipynb": 4, "04_train_dsa.ipynb": 2, "05_h100_program.ipynb": 1}  # notebook -> the images its outputs hold
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
    assert NOTEBOOKS == ["01_generate.ipynb", "02_sparse_attention.ipynb", "03_sharding.ipynb",
                         "04_train_dsa.ipynb", "05_h100_program.ipynb"]


def test_01_generate():
    """01_generate: the demo model, loaded with the deployment numerics, chats in the first cell
    after the imports and remembers the name from turn one; each turn prefills only its new
    tokens (its session's sequence parked in the engine between turns); shapes compile once (turn 1) and later turns reuse them; the tool call parses back to
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
        # + BOS on turn 1; later turns also run the last reply's final token (its keys not written)
        assert s["prefill_tokens"] + s["decode_steps"] == len(ids) + 1
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


def test_04_train_dsa():
    """04_train_dsa: the three stages ran with the project's Run loop; the warm-up trained the
    indexer alone (every other param bit for bit those it started from) and brought its KL down
    and its recall up, above k keys at random; sparse training kept the LM loss below its start; on the
    text, the picks are distinct visible keys (all of them while a query sees at most k), the dense
    attention is the same before and after the warm-up (the model frozen), and the warmed-up picks
    recall more of it than the fresh indexer's; its two plots are drawn."""
    nb, v = _execute("04_train_dsa.ipynb", """{
        'steps': {s: [len(metrics[s]), n] for s, n, _ in STAGES},
        'curves': {s: {k: [m[k] for m in metrics[s]] for k in ('lm', 'kl', 'recall')} for s in metrics},
        'changed': [['indexer' in jax.tree_util.keystr(p), bool(np.any(np.asarray(a) != np.asarray(b)))]
                    for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(start['warmup'])[0],
                                         jax.tree.leaves(params['warmup']), strict=True)],
        'uniform': float(uniform), 'k': cfg.index_topk, 'n': int(n),
        'picks': {name: topk.tolist() for name, (_, topk, _) in seen.items()},
        'text_recall': {name: rec.tolist() for name, (_, _, rec) in seen.items()},
        'same_dense': float(np.abs(seen['before warm-up'][0] - seen['after warm-up'][0]).max())}""")
    assert all(got == want for got, want in v["steps"].values()), v["steps"]
    c = v["curves"]
    first, last = (lambda x: float(np.mean(x[:5]))), (lambda x: float(np.mean(x[-5:])))
    assert last(c["dense"]["lm"]) < 0.5 * first(c["dense"]["lm"])
    assert all(changed == indexer for indexer, changed in v["changed"])  # the indexer alone
    assert sum(indexer for indexer, _ in v["changed"]) >= 5
    assert last(c["warmup"]["kl"]) < 0.8 * first(c["warmup"]["kl"])
    assert last(c["warmup"]["recall"]) > first(c["warmup"]["recall"]) + 0.05
    assert last(c["warmup"]["recall"]) > v["uniform"] + 0.05
    assert last(c["sparse"]["lm"]) < first(c["sparse"]["lm"]) and np.isfinite(c["sparse"]["lm"]).all()
    assert last(c["sparse"]["recall"]) > v["uniform"] + 0.05
    for picks in v["picks"].values():
        for layer in picks:
            assert len(layer) == v["n"]
            for q, p in enumerate(layer):
                p = [i for i in p if i >= 0]
                assert len(set(p)) == len(p) == min(v["k"], q + 1) and max(p) <= q
    assert v["same_dense"] == 0
    rec = v["text_recall"]
    assert np.mean(rec["after warm-up"]) > np.mean(rec["before warm-up"]) + 0.05
    assert _images(nb) == PLOTS["04_train_dsa.ipynb"]


def test_05_h100_program():
    """05_h100_program: the GPU venv compiled, for an H100 with no GPU, every Pallas kernel (its
    decode cases and the attention kernels' prefill chunk) and the released-width 3-layer decode step: each kernel within sm_90's registers and
    shared memory, no spills, its FP8 dots of 64-row tiles on wgmma (QGMMA), its roofline floor the
    larger of its FLOPs and HBM bytes over the H100's peaks; the step's arguments are the plan's
    weights + cache (+ its token, position and last index) and its temporaries stay under 64 MiB;
    the tables are shown and the plot drawn. Without .venv-gpu: skipped (CI=true: a failure)."""
    if not (REPO / ".venv-gpu" / ".installed").exists():
        msg = "no GPU venv at .venv-gpu (`make gpu-venv`): 05_h100_program.ipynb needs it"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + "; CI=true makes this a failure")
        pytest.skip(msg)
    nb, v = _execute("05_h100_program.ipynb", "{'kernels': kernels, 'programs': programs}")
    assert v["kernels"]["device"].startswith("NVIDIA H100") and v["kernels"]["jax"] == "0.11.2"
    cases = v["kernels"]["kernels"]
    assert {c["kernel"] for c in cases.values()} == {
        "index_logits", "radix_topk", "sparse_mla", "fp8_linear", "grouped_fp8_matmul"}, list(cases)
    for name, c in cases.items():
        assert "error" not in c and 0 < c["registers"] <= 255 and c["spill_bytes"] == 0, (name, c)
        assert 0 <= c["smem_bytes"] <= 227 * 1024 and c["blocks_per_sm"] >= 1, (name, c)
        assert c["mma"] == "QGMMA" or c["fp8_rows"] < 64, (name, c)
        r = c["roofline"]
        peak = {"fp8": 1979e12, "bf16": 989e12}[r["peak"]]
        floor = max(r["flops"] / peak, r["hbm_bytes"] / 3.35e12) * 1e6
        assert abs(r["floor_us"] - floor) < 1e-6 * floor and r["bound"] == (
            "memory" if r["hbm_bytes"] / 3.35e12 >= r["flops"] / peak else "compute"), (name, r)
    p = v["programs"]["programs"]["3L/decode/1,1,1@128K"]
    assert p["argument_bytes"] == p["plan"]["weights_cache"] + 3 * 4 * p["batch"], p
    assert p["temp_bytes"] <= 64 << 20 and p["launches"]["kernels"] > 0
    shown = json.dumps([c.outputs for c in nb.cells if c.cell_type == "code"])
    assert all(name in shown for name in cases) and "arguments (weights + cache)" in shown
    assert _images(nb) == PLOTS["05_h100_program.ipynb"]
