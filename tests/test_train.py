"""Training (dsv32_jax.train): a short warm-up + sparse run on a tiny config (the loss falls, the
indexer's recall of the dense attention mass rises), the gradient separation of the two losses
(exactly zero where required), the trained checkpoint read back by the inference engine, resume
after kill -9 reproducing the uninterrupted losses exactly, 8 simulated devices against one, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import xla_env
from dsv32_jax.checkpoint.weights import flatten, init_params
from dsv32_jax.model.config import preset
from dsv32_jax.model.transformer import variables
from dsv32_jax.train import step as S
from dsv32_jax.train.model import TrainTransformer

REPO = Path(__file__).resolve().parents[1]
CFG_KW = dict(vocab_size=512, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=2, n_dense_layers=1,
              n_heads=2, q_lora_rank=32, kv_lora_rank=128, qk_nope_head_dim=16, qk_rope_head_dim=16,
              v_head_dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4,
              n_limited_groups=2, index_n_heads=2, index_head_dim=32, index_topk=8, rope_factor=1.0,
              original_seq_len=64, max_seq_len=64, n_mtp_layers=0, weight_dtype="bf16",
              fp8_activations=False)
BATCH, SEQ = 8, 32

# Shared by the subprocesses: the tiny config, its data, one run.
SETUP = f"""
import json, os, sys
sys.path.insert(0, {str(REPO)!r})
from dsv32_jax.model.config import preset
from dsv32_jax.text.tokenizer import Tokenizer
from dsv32_jax.train import step as S
from dsv32_jax.train.data import Batches, tokenize_file
from dsv32_jax.train.loop import Run
cfg = S.train_config(preset("tiny", **{CFG_KW!r}), "float32")
def batches(data):
    tok = Tokenizer.load(os.path.join(data, "tok"))
    return Batches(tokenize_file(os.path.join(data, "corpus.txt"), tok), {BATCH}, {SEQ}, seed=0)
"""


def _cfg(dtype="float32"):
    return S.train_config(preset("tiny", **CFG_KW), dtype)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dsv32_jax.text.tokenizer import build_synthetic_tokenizer
    from dsv32_jax.train import corpus

    d = tmp_path_factory.mktemp("data")
    corpus.write_corpus(str(d / "corpus.txt"), n=400, seed=0)
    paras = [p for p in (d / "corpus.txt").read_text().split("\n\n") if p.strip()]
    build_synthetic_tokenizer(512, d / "tok", texts=paras)
    return d


def _batches(data):
    from dsv32_jax.text.tokenizer import Tokenizer
    from dsv32_jax.train.data import Batches, tokenize_file

    tok = Tokenizer.load(data / "tok")
    return Batches(tokenize_file(data / "corpus.txt", tok), BATCH, SEQ, seed=0)


def _mean(metrics, key, part):
    vals = [m[key] for m in metrics]
    return float(np.mean(vals[:5] if part == "first" else vals[-5:]))


def test_warmup_then_sparse(data, tmp_path, capsys):
    """The release's two stages on a tiny model: warm-up (KL falls, recall rises, the main model
    untouched), then sparse training (LM loss falls, recall stays up); the exported checkpoint is
    read by `load_model`, and the inference engine's sparse forward gives the training forward's
    logits. One process at a time writes a run: while `warm` is open, a second writer of its
    directory (the API or the CLI) is refused, naming this process, and changes nothing."""
    import dsv32_jax
    from dsv32_jax.cli import main
    from dsv32_jax.dirlock import Busy
    from dsv32_jax.train.loop import Run

    cfg, batches = _cfg(), _batches(data)
    out = tmp_path / "warmup"
    out.mkdir()  # an empty directory is fine
    args = (str(out), cfg, "warmup", 25, batches, S.Hparams(indexer_lr=1e-2, warmup_steps=5))
    warm = Run(*args, ckpt_every=25, tokenizer_dir=str(data / "tok"))
    files = _files(out)
    busy = rf"{out} is being written by pid {os.getpid()} \(dsv32 train\)"
    with pytest.raises(Busy, match=busy):
        Run(*args, ckpt_every=40, tokenizer_dir=str(data / "tok"))
    assert main(["train", "--data", str(data / "corpus.txt"), "--steps", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(busy, err) and _files(out) == files
    before = warm.state["params"]
    before = jax.tree.map(np.asarray, before)
    mw = warm.train()
    assert _mean(mw, "kl", "last") < 0.8 * _mean(mw, "kl", "first")
    assert _mean(mw, "recall", "last") > _mean(mw, "recall", "first") + 0.03
    after = flatten(jax.tree.map(np.asarray, warm.state["params"]))
    for path, v in flatten(before).items():  # warm-up: only the indexer moves
        assert np.array_equal(v, after[path]) == ("indexer" not in path), path
    warm.finish()
    assert sorted(os.listdir(tmp_path)) == ["warmup"]  # finish() removed the lock file

    sparse = Run(str(tmp_path / "sparse"), cfg, "sparse", 25, batches,
                 S.Hparams(lr=1e-2, indexer_lr=3e-3, warmup_steps=5), init=str(tmp_path / "warmup"),
                 ckpt_every=25, tokenizer_dir=str(data / "tok"))
    ms = sparse.train()
    assert _mean(ms, "lm", "last") < _mean(ms, "lm", "first") - 0.5
    assert _mean(ms, "recall", "last") > _mean(mw, "recall", "first") + 0.03
    print(f"warmup: kl {mw[0]['kl']:.4f} -> {mw[-1]['kl']:.4f}, recall {mw[0]['recall']:.3f} -> "
          f"{mw[-1]['recall']:.3f}; sparse: lm {ms[0]['lm']:.3f} -> {ms[-1]['lm']:.3f}, recall "
          f"{ms[0]['recall']:.3f} -> {ms[-1]['recall']:.3f}")
    hf = sparse.finish()["hf"]
    assert (Path(hf) / "tokenizer.json").is_file()

    model = dsv32_jax.load_model(hf, dtype="float32", fp8_activations=False)
    tokens = batches.batch(0)[:2]
    ours = np.asarray(model.logits(tokens))  # the engine: chunked prefill into a cache, sparse
    bf16 = S.compute_params(sparse.state["params"], S.train_config(cfg, "bfloat16"))
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), bf16)  # the weights as exported (bf16)
    theirs, _ = TrainTransformer(cfg, "sparse").apply(variables(f32), jnp.asarray(tokens))
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=2e-3, rtol=2e-3)


def test_init_params_follows_the_seed():
    """`init_params(seed)`, which `dsv32 train --seed` starts from: one seed gives the same params
    twice; two seeds differ in every randomly drawn param, the routed experts' stacked weights
    included (they once came from a fixed key per tensor); only constant-init params (norms,
    zero biases) are equal across seeds."""
    a, again, b = (flatten(init_params(_cfg(), seed=s)) for s in (0, 0, 1))
    for p in a:
        x, y = np.asarray(a[p], np.float32), np.asarray(b[p], np.float32)
        assert np.array_equal(x, np.asarray(again[p], np.float32)), p
        assert not np.array_equal(x, y) or np.all(x == x.flat[0]), p
    experts = [p for p in a if p[:3] == ("moe_layers", "ffn", "experts")]
    assert len(experts) == 3
    for p in experts:
        assert not np.array_equal(np.asarray(a[p], np.float32), np.asarray(b[p], np.float32)), p


def test_gradient_separation(data):
    """Sparse stage: the LM loss's gradient on every indexer param and the KL's gradient on every
    other param are exactly zero (and neither is zero where it should act)."""
    cfg = _cfg()
    params = jax.tree.map(lambda a: a.astype(jnp.float32), init_params(cfg, seed=1))
    tokens = jnp.asarray(_batches(data).batch(0))

    def parts(p):
        logits, stats = TrainTransformer(cfg, "sparse").apply(variables(p), tokens)
        return S.lm_loss(logits, tokens), jnp.mean(stats["kl"])

    g_lm = flatten(jax.jit(jax.grad(lambda p: parts(p)[0]))(params))
    g_kl = flatten(jax.jit(jax.grad(lambda p: parts(p)[1]))(params))
    idx = [p for p in g_lm if "indexer" in p]
    main = [p for p in g_lm if "indexer" not in p and p[-1] != "gate_bias"]
    assert idx and main
    for p in idx:
        assert not np.any(np.asarray(g_lm[p])), p
    for p in g_kl:
        if "indexer" not in p:
            assert not np.any(np.asarray(g_kl[p])), p
    assert all(np.any(np.asarray(g_kl[p])) for p in idx)
    assert sum(float(jnp.sum(jnp.abs(g_lm[p]))) > 0 for p in main) == len(main)


def test_optimizer_groups_and_fp8_refused(tmp_path):
    """Per-stage frozen groups (set_to_zero), a bf16 forward from float32 masters, FP8 refused."""
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from dsv32_jax.train.loop import TrainError, load_init

    cfg = _cfg("bfloat16")
    specs = S.abstract_params(cfg)
    labels = flatten(S.param_labels(specs))
    assert {v for v in labels.values()} == {"main", "indexer", "router_bias"}
    assert all(v == "indexer" for p, v in labels.items() if "indexer" in p)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), init_params(cfg))
    assert S.tree_dtypes(S.compute_params(params, cfg)) == {"bfloat16", "float32"}  # f32: router bias
    for stage, frozen in (("dense", "indexer"), ("warmup", "main")):
        tx = S.make_optimizer(stage, S.Hparams(), 10, params)
        grads = jax.tree.map(jnp.ones_like, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        for p, u in flatten(updates).items():
            assert np.any(np.asarray(u)) == (labels[p] not in (frozen, "router_bias")), (stage, p)
    fp8 = write_checkpoint(preset("tiny"), tmp_path / "fp8", include_tokenizer=False)
    with pytest.raises(TrainError, match="FP8"):
        load_init(fp8, _cfg())


def test_mtp_stage_trains_the_mtp_layer_alone(data, tmp_path):
    """The mtp stage on a model without an MTP layer: the MTP loss falls while every param of the model stays bit-identical (the state and the exported checkpoint);
    the MTP layer's embedding and head are the model's, and stay so; the rest of it moves.
    An mtp stage without an MTP loss weight is refused."""
    import dataclasses

    from dsv32_jax.checkpoint.safetensors import ShardedCheckpoint
    from dsv32_jax.train.loop import Run, TrainError, export_hf

    cfg = _cfg()
    base = export_hf(init_params(cfg), cfg, str(tmp_path / "base"), str(data / "tok"))
    mcfg = dataclasses.replace(cfg, n_mtp_layers=1)
    with pytest.raises(TrainError, match="MTP loss weight > 0"):
        Run(str(tmp_path / "no"), mcfg, "mtp", 2, _batches(data), S.Hparams(), init=base)
    run = Run(str(tmp_path / "mtp"), mcfg, "mtp", 30, _batches(data),
              S.Hparams(lr=1e-2, indexer_lr=1e-2, warmup_steps=5, mtp_weight=1.0), init=base,
              ckpt_every=30, tokenizer_dir=str(data / "tok"), say=lambda line: None)
    before = flatten(jax.tree.map(np.asarray, run.state["params"]))
    m = run.train()
    assert _mean(m, "mtp", "last") < _mean(m, "mtp", "first") - 0.5
    assert all(np.isfinite(r["mtp_kl"]) for r in m)  # the MTP indexer's, a moving target
    after = flatten(jax.tree.map(np.asarray, run.state["params"]))
    shared = {("mtp", "embed_tokens", "weight"): ("embed", "weight"),
              ("mtp", "shared_head", "head", "weight"): ("head", "weight")}
    for p, v in before.items():
        trains = p[0] == "mtp" and p not in shared and p[-1] != "gate_bias"
        assert np.array_equal(v, after[p]) != trains, p
    for p, q in shared.items():
        assert np.array_equal(after[p][0], after[q]), p
    hf = run.finish()["hf"]
    with ShardedCheckpoint(base) as a, ShardedCheckpoint(hf) as b:
        names = set(b.keys())
        assert set(a.keys()) < names and any(k.startswith("model.layers.2.") for k in names)
        for k in a.keys():
            assert a.get(k).tobytes() == b.get(k).tobytes(), k


def _python(script: str, *args, env=None):
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


RESUME = SETUP + """
out, data, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
run = Run(out, cfg, "sparse", 10, batches(data), S.Hparams(lr=1e-2), ckpt_every=4)
print("start", run.start, flush=True)
def on_step(m):
    print(json.dumps(m), flush=True)  # what the run computed, before its log is cut
    if m["step"] == kill_at:
        os.kill(os.getpid(), 9)  # kill -9: no cleanup, no final checkpoint
run.train(on_step)
"""


def test_resume_after_kill_is_exact(data, tmp_path):
    """A run killed by SIGKILL after its step-4 checkpoint (at step 7) and run again resumes at
    step 4, logs steps 1..10, and its steps 5..7 have exactly the losses the uninterrupted run
    computed before it was killed (restored params, optimizer state and data position)."""
    from dsv32_jax.train.loop import read_metrics

    killed = _python(RESUME, tmp_path / "a", data, 7)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert len(read_metrics(tmp_path / "a")) == 4  # the log is cut at the last checkpoint
    resumed = _python(RESUME, tmp_path / "a", data, 0)
    assert resumed.returncode == 0 and "start 4" in resumed.stdout, resumed.stderr[-3000:]
    a = read_metrics(tmp_path / "a")
    assert [m["step"] for m in a] == list(range(1, 11))
    before = [json.loads(l) for l in killed.stdout.splitlines() if l.startswith("{")]
    assert [m["step"] for m in before] == list(range(1, 8))
    for key in ("loss", "lm", "kl", "recall"):
        assert [m[key] for m in a[:7]] == [m[key] for m in before], key


SHARDED = SETUP + """
import jax
from sharding import make_mesh
data, out = sys.argv[1], sys.argv[2]
assert jax.device_count() == 8
rows = {}
for name, mesh in (("one", None), ("mesh", make_mesh(data=2, expert=2, tensor=2))):
    run = Run(os.path.join(out, name), cfg, "sparse", 3, batches(data), S.Hparams(lr=1e-2),
              ckpt_every=3, mesh=mesh)
    rows[name] = [[m["lm"], m["kl"], m["recall"]] for m in run.train()]
    if mesh is not None:
        leaf = run.state["params"]["moe_layers"]["ffn"]["experts"]["w1_weight"]
        rows["expert_shards"] = len({str(s.index) for s in leaf.addressable_shards})
print(json.dumps(rows))
"""


def test_sharded_matches_single_device(data, tmp_path):
    """Three sparse-stage steps on 8 simulated devices (data 2 x expert 2 x tensor 2) give the
    losses of one device to float tolerance."""
    env = xla_env(8)
    proc = _python(SHARDED, data, tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows["expert_shards"] > 1  # the experts really are split over devices
    np.testing.assert_allclose(rows["mesh"], rows["one"], rtol=2e-4, atol=2e-5)


def test_cli_train_errors(tmp_path, capsys):
    """User errors of `dsv32 train` are one line (exit 2 for usage, 1 otherwise)."""
    from dsv32_jax.cli import main
    from dsv32_jax.checkpoint.synthetic import write_checkpoint

    def run(argv):
        try:
            return main(argv)
        except SystemExit as e:
            return e.code

    assert run(["train", "--data", str(tmp_path / "none.txt"), "--steps", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such data file" in err[0]
    assert run(["train", "--data", "x.txt", "--steps", "0"]) == 2
    assert "expected an integer >= 1" in capsys.readouterr().err
    assert run(["train", "--data", "x.txt", "--steps", "1", "--mesh", "1,2"]) == 2
    assert "argument --mesh: mesh '1,2': expected three integers >= 1" in capsys.readouterr().err
    assert run(["train", "--data", "x.txt", "--steps", "1", "--mtp-weight", "-0.1"]) == 2
    assert "argument --mtp-weight: expected a finite number >= 0" in capsys.readouterr().err
    (tmp_path / "d.txt").write_text("hello world\n\nmore text here\n")
    fp8 = write_checkpoint(preset("tiny"), tmp_path / "fp8")
    assert run(["train", "--data", str(tmp_path / "d.txt"), "--steps", "2", "--init", str(fp8),
                "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "FP8 weights are not trained" in err[-1]


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _largest(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def six_steps(data, tmp_path_factory):
    """A dense run of 6 steps with checkpoints kept at steps 4 and 6 -> (its directory, state)."""
    from dsv32_jax.train.loop import Run

    out = tmp_path_factory.mktemp("six") / "run"
    ref = Run(str(out), _cfg(), "dense", 6, _batches(data), ckpt_every=2)
    ref.train()
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["4", "6"]
    return out, jax.tree.map(np.asarray, ref.state)


def test_resume_falls_back_past_damaged_steps(data, six_steps, tmp_path):
    """Newer checkpoints damaged in every way (copies of step 6 as steps 7..10, step 4 as 11, step
    6 itself altered) are each said with the step and the reason, set aside untouched as
    ckpt/<step>.bad-<reason>, and the run resumes from step 4, then trains on to the state of
    the undamaged run."""
    import shutil

    from dsv32_jax.train.loop import Run

    out = tmp_path / "run"
    shutil.copytree(six_steps[0], out)
    ck = out / "ckpt"
    for step in (7, 8, 9, 10):
        shutil.copytree(ck / "6", ck / str(step))
    shutil.copytree(ck / "4", ck / "11")
    damage = {
        11: ("meta", None),  # intact, but not step 11's
        10: ("missing", lambda d: shutil.rmtree(d / "state")),
        9: ("missing", lambda d: [shutil.rmtree(d), d.mkdir()]),  # an empty directory
        8: ("unreadable", lambda d: os.truncate(_largest(d / "state"), 100)),
        7: ("unreadable", lambda d: (d / "meta" / "metadata").write_text("{not json")),
        6: ("checksum", lambda d: _flip(_largest(d / "state"))),  # restores, but altered
    }
    files = {}
    for step, (_, hurt) in damage.items():
        if hurt:
            hurt(ck / str(step))
        files[step] = sorted((str(p.relative_to(ck / str(step))), p.stat().st_size)
                             for p in (ck / str(step)).rglob("*"))
    said = []
    run = Run(str(out), _cfg(), "dense", 6, _batches(data), ckpt_every=2, say=said.append)
    assert run.start == 4, said
    assert len(said) == len(damage), said
    for line, (step, (reason, _)) in zip(said, damage.items()):
        aside = ck / f"{step}.bad-{reason}"
        assert f"checkpoint of step {step} is damaged" in line and str(aside) in line, line
        assert sorted((str(p.relative_to(aside)), p.stat().st_size)
                      for p in aside.rglob("*")) == files[step]
    assert "data changed on disk" in said[-1], said[-1]
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4]
    run.train()
    for a, b in zip(jax.tree.leaves(run.state), jax.tree.leaves(six_steps[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(p.name for p in ck.iterdir() if ".bad-" not in p.name) == ["4", "6"]


def test_fp8_release_to_training(tmp_path, capsys):
    """The released FP8 layout (the tiny-fp8 fixture) -> `dsv32 convert --weights bf16` ->
    `dsv32 train --init` (the model is the checkpoint's; the default stage with --init is the
    indexer warm-up; the compile is announced) -> a bf16 HF checkpoint `load_model` loads. The
    FP8 source itself is refused with the way round it."""
    import dsv32_jax
    from conftest import fixture_dir
    from convert.cli import main as convert
    from dsv32_jax.cli import main

    hf = fixture_dir("tiny-fp8") / "hf"
    (tmp_path / "d.txt").write_text("the sky is blue.\n\nthe grass is green, the sea is deep.\n" * 20)
    train = ["train", "--data", str(tmp_path / "d.txt"), "--steps", "2", "--batch", "2",
             "--seq-len", "16", "--no-progress", "--dtype", "float32"]
    assert main([*train, "--init", str(hf), "--out", str(tmp_path / "no")]) == 1
    assert "--weights bf16" in capsys.readouterr().err
    assert convert([str(hf), str(tmp_path / "bf16"), "--weights", "bf16", "--no-progress"]) == 0
    assert main([*train, "--init", str(tmp_path / "bf16"), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "dsv32 train: warmup stage, bf16 (3 layers, dim 256" in err, err
    assert re.search(r"compiling train step \.\.\. \d+\.\ds\n", err), err
    assert "no multi-token-prediction layer: the MTP layer starts from random weights" in err
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["kl"]) for r in rows)
    assert all(np.isfinite(r["mtp"]) for r in rows)  # --mtp-weight 0.3 by default, logged apart
    model = dsv32_jax.load_model(tmp_path / "run" / "hf", dtype="float32", fp8_activations=False)
    assert model.config.n_layers == 3 and not model.config.quantized
    from dsv32_jax.engine.runner import load_mtp

    mtp = load_mtp(tmp_path / "run" / "hf", model.config)  # the trained MTP layer is exported
    assert mtp["eh_proj"]["weight"].shape == (1, 256, 512)


def test_train_default_stage(tmp_path, monkeypatch, capsys):
    """Without --init `dsv32 train` trains the model (dense), not the indexer of a random one;
    an explicit warm-up on random weights says what it does."""
    from dsv32_jax.cli import main
    from dsv32_jax.train import loop

    seen = []

    class Stop(loop.TrainError):
        pass

    def fake_run(out, cfg, stage, *a, **k):
        seen.append((out, stage))
        raise Stop("stopped before training")

    monkeypatch.setattr(loop, "Run", fake_run)
    (tmp_path / "d.txt").write_text("hello world\n\nmore text here\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "d.txt", "--steps", "1", "--seq-len", "4", "--batch", "1"]) == 1
    assert seen[-1] == (os.path.join("runs", "tiny-dense"), "dense")
    assert "stopped before training" in capsys.readouterr().err
    assert main(["train", "--data", "d.txt", "--steps", "1", "--seq-len", "4", "--batch", "1",
                 "--stage", "warmup"]) == 1
    assert seen[-1][1] == "warmup"
    assert "warm-up on random weights trains only the indexer" in capsys.readouterr().err


# ---- the DSA objective pinned on hand-computed cases ---------------------------------------------
def test_kl_direction_and_restriction_by_hand():
    """_kl is KL(target || softmax(logits over the valid keys)): ln 2 for target (1/2, 1/2, 0) and
    softmax (1/4, 1/4, 1/2) (the reverse direction gives -ln(2)/2, or inf), the invalid key's logit
    (100) counts nowhere; uniform logits on 3 keys give sum_t t ln(3t)."""
    from dsv32_jax.train.model import _kl

    target = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0]])
    logits = jnp.array([[np.log(0.25), np.log(0.25), np.log(0.5), 100.0], [0.0, 0.0, 0.0, 100.0]])
    valid = jnp.array([True, True, True, False])
    want = [np.log(2.0), 0.2 * np.log(0.6) + 0.3 * np.log(0.9) + 0.5 * np.log(1.5)]
    np.testing.assert_allclose(np.asarray(_kl(target, logits, valid)), want, rtol=1e-6)
    logits = jnp.array([[3.0, 1.0], [0.0, 0.0]])  # a target on logits' support: lm_loss's
    tokens = jnp.array([[0, 1]])                   # cross-entropy predicts token 1 from row 0
    np.testing.assert_allclose(float(S.lm_loss(logits[None], tokens)), np.log1p(np.exp(2.0)),
                               rtol=1e-6)


def _reference_kl(cfg, q_nope, q_pe, kvb, k_pe, logits, stage):
    """The DSA indexer objective in float64 numpy from the layer's projections: per query, the
    target is the main attention's probabilities summed over heads and L1-normalized (warmup: the
    dense causal attention; sparse: the attention restricted to the indexer's top-k keys,
    renormalized), and the loss KL(target || softmax(index logits over the same keys)), averaged
    over batch and queries."""
    q_nope, q_pe, kvb, k_pe, logits = (np.asarray(a, np.float64)
                                       for a in (q_nope, q_pe, kvb, k_pe, logits))
    b, s, h, dn = q_nope.shape
    scores = (np.einsum("bshd,bthd->bsht", q_nope, kvb[..., :dn])
              + np.einsum("bshr,btr->bsht", q_pe, k_pe)) * cfg.softmax_scale
    kls = []
    for i in range(b):
        for j in range(s):
            keys = np.arange(j + 1)  # causal
            if stage == "sparse":  # the indexer's top-k of the visible keys
                keys = keys[np.argsort(-logits[i, j, :j + 1], kind="stable")[:cfg.index_topk]]
            a = scores[i, j][:, keys]  # (H, keys)
            p = np.exp(a - a.max(-1, keepdims=True))
            t = (p / p.sum(-1, keepdims=True)).sum(0)
            t = t / t.sum()
            lg = logits[i, j, keys]
            logq = lg - lg.max() - np.log(np.exp(lg - lg.max()).sum())
            kls.append(np.sum(t * (np.log(t) - logq)))
    return float(np.mean(kls))


def test_indexer_kl_equals_the_reference_objective():
    """TrainMLA's per-layer kl, warmup (dense target) and sparse (target restricted to the picked
    set), equals the objective computed independently in float64 numpy from the same layer's
    projections, on a case where the two targets differ (16 queries, index_topk 8)."""
    from dsv32_jax.model.attention import index_scores
    from dsv32_jax.model.rope import rope_tables
    from dsv32_jax.train.model import TrainMLA

    cfg = _cfg()
    b, s = 2, 16
    x = jax.random.normal(jax.random.key(0), (b, s, cfg.dim), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin = rope_tables(cfg, pos)
    variables_ = jax.jit(TrainMLA(cfg, "xla", "sparse").init)(jax.random.key(1), x, pos, cos, sin)

    def parts(m):
        qr, q_nope, q_pe, c, k_pe = m.project(x, cos, sin)
        iq, iw = m.indexer.queries(x, qr, cos, sin)
        ik, iks = m.indexer.keys(x, cos, sin)
        kvb = m.wkv_b(c).reshape(b, s, cfg.n_heads, -1)
        return q_nope, q_pe, kvb, k_pe, index_scores(iq, iw, ik, iks)

    @jax.jit
    def run(v):
        kl = {st: TrainMLA(cfg, "xla", st).apply(v, x, pos, cos, sin)[1]["kl"]
              for st in ("warmup", "sparse")}
        return TrainMLA(cfg, "xla", "sparse").apply(v, method=parts), kl

    inputs, got = run(variables_)
    want = {st: _reference_kl(cfg, *inputs, st) for st in ("warmup", "sparse")}
    assert abs(want["warmup"] - want["sparse"]) > 0.1 * want["sparse"], want  # the case tells
    for st in ("warmup", "sparse"):
        np.testing.assert_allclose(float(got[st]), want[st], rtol=1e-4, err_msg=st)


def test_optimizer_groups_effective_learning_rates():
    """Per stage and group, the step-k update of a parameter under a constant gradient (Adam's
    normalized step: |update| = the LR) is the group's LR on the documented schedule: lr/warm at
    step 0, linear to the peak at `warmup_steps`, then a cosine to lr * min_lr_ratio at
    total_steps; the indexer at indexer_lr, the main model at lr, frozen groups 0."""
    import math

    hp = S.Hparams(lr=1e-2, indexer_lr=2e-3, warmup_steps=3, min_lr_ratio=0.1, weight_decay=0.0)
    total = 8

    def sched(peak, k):
        if k < hp.warmup_steps:
            return peak / hp.warmup_steps + (peak - peak / hp.warmup_steps) * k / hp.warmup_steps
        end, span = peak * hp.min_lr_ratio, total - hp.warmup_steps
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (k - hp.warmup_steps) / span))

    params = {"moe_layers": {"attn": {"indexer": {"wk": {"weight": jnp.zeros((8, 4))}},  # tiny
                                      "wq_a": {"weight": jnp.zeros((8, 4))},         # tree: the
                                      "q_norm": {"weight": jnp.zeros(8)}},           # real paths
                             "ffn": {"gate_bias": jnp.zeros(4)}}}
    labels = flatten(S.param_labels(params))
    grads = jax.tree.map(jnp.ones_like, params)
    peaks = {"main": hp.lr, "indexer": hp.indexer_lr}
    for stage in ("dense", "warmup", "sparse"):
        tx = S.make_optimizer(stage, hp, total, params)
        state, update = tx.init(params), jax.jit(tx.update)
        for k in range(total):
            updates, state = update(grads, state, params)
            size = {g: [] for g in S.GROUPS}  # every element's |update|, by group
            for p, u in flatten(jax.device_get(updates)).items():
                size[labels[p]].append(np.abs(u).ravel())
            for g in (g for g in S.GROUPS if size[g]):  # "frozen": the mtp stage's alone
                lr = sched(peaks[g], k) if g in S.TRAINED[stage] else 0.0
                np.testing.assert_allclose(np.concatenate(size[g]), lr, rtol=1e-4, atol=1e-12,
                                           err_msg=f"{stage} step {k} group {g}")


def _files(path) -> dict[str, tuple[bytes, int]]:
    """{relative path: (bytes, mtime_ns)} of every file below `path`, and every directory's entries."""
    out = {}
    for root, dirs, files in os.walk(path):
        out[os.path.relpath(root, path) + "/"] = (repr(sorted(dirs + files)).encode(), 0)
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = (Path(p).read_bytes(), os.stat(p).st_mtime_ns)
    return out


def test_out_that_is_not_a_run_is_refused_untouched(data, tmp_path, capsys):
    """`train --out` into a directory of someone else's files (a tokenizer.json, a metrics.jsonl)
    is refused in one line and nothing in it changes (bytes, mtimes, entries); before, the
    tokenizer was overwritten and the foreign metrics failed with a bare JSON error."""
    from dsv32_jax.cli import main
    from dsv32_jax.train.loop import Run, TrainError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text('{"my": "tokenizer"}')
    (mine / "metrics.jsonl").write_text("accuracy,0.9\n")
    (mine / "notes").mkdir()
    (mine / "notes" / "a.txt").write_text("keep")
    before = _files(tmp_path)
    argv = ["train", "--data", str(data / "corpus.txt"), "--steps", "1", "--out", str(mine)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{mine}: exists, is not empty and is not a run of dsv32 train" in err
    with pytest.raises(TrainError, match="nothing in it was touched"):
        Run(str(mine), _cfg(), "dense", 1, _batches(data))
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainError, match="exists and is not a directory"):
        Run(str(tmp_path / "file"), _cfg(), "dense", 1, _batches(data))
    os.remove(tmp_path / "file")
    assert _files(tmp_path) == before  # and no lock file was left beside it


def test_metrics_log_cut_short_or_broken(tmp_path):
    """A metrics log cut short by a kill is read without its torn line; a broken one names the file
    and the line (before: a bare JSON error)."""
    from dsv32_jax.train.loop import TrainError, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lm": 2.0}\n{"step": 2, "l')
    assert read_metrics(tmp_path) == [{"step": 1, "lm": 2.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(TrainError, match=r"metrics.jsonl: line 2 is not a metrics row"):
        read_metrics(tmp_path)
