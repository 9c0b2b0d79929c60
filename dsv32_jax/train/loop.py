"""A training run: a directory holding the run's settings, Orbax checkpoints of the whole state,
the metrics of every step, the curves, and at the end the trained model as a bf16 checkpoint in the
released HF layout (`load_model` reads it like any other).

  OUT/run.json         config, stage, hyper-parameters, batch shape, seed, data file
  OUT/ckpt/<step>/     Orbax: params (float32 masters) + optimizer state + step, the data position
                       and a CRC-32 of every array (checked on resume)
  OUT/metrics.jsonl    one line per step: loss, lm, kl, recall, grad norms
  OUT/curves.png       loss and recall curves (when matplotlib is installed)
  OUT/hf/              the trained model: config.json, model.safetensors (bf16), tokenizer

Running again on the same OUT resumes from the latest checkpoint (after a crash or kill -9 too:
Orbax commits a checkpoint by renaming a finished temporary directory), with the metrics log cut back
to that step: the resumed run computes exactly the steps and losses of an uninterrupted one (same
batches by position, same state, deterministic CPU computation).

FP8 checkpoints are not trained: the e4m3 weights have no useful gradient and updating them would
need re-quantization each step; `--init` of an FP8 checkpoint is refused: `dsv32 convert --weights
bf16` makes the checkpoint a run starts from.

A checkpoint that does not restore intact (no state, unreadable, metadata or checksums that do not
match) is set aside as `ckpt/<step>.bad-<reason>` and the previous one is tried.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import zlib
from typing import Callable

import jax
import numpy as np

from dsv32_jax.checkpoint.safetensors import write_safetensors
from dsv32_jax.checkpoint.weights import (abstract_params, flatten, hf_names, init_mtp_params,
                                          init_params)
from dsv32_jax.dirlock import hold
from dsv32_jax.model.config import Config
from dsv32_jax.shardings import param_shardings
from dsv32_jax.train import step as S
from dsv32_jax.train.data import Batches

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
RUN_FORMAT = "dsv32-jax-train-run"  # run.json's marker: a directory with it is a run of ours


class TrainError(ValueError):
    """A training run that cannot start or resume as asked."""


def _json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_init(path: str) -> tuple[str, Config]:
    """The checkpoint directory to start from -> (it, its config), from its config alone: a bf16
    HF checkpoint, a directory of `dsv32 convert --weights bf16`, or a run directory (its
    exported `hf/`). An FP8 checkpoint is refused."""
    from dsv32_jax.checkpoint import orbax_layout

    if os.path.isfile(os.path.join(path, "run.json")) and os.path.isdir(os.path.join(path, "hf")):
        path = os.path.join(path, "hf")
    if orbax_layout.is_orbax_dir(path):
        other = orbax_layout.load_config(path, fp8_activations=False)
    else:
        other = Config.from_hf(path, fp8_activations=False)  # the weight format is what matters
    if other.quantized:
        raise TrainError(f"{path}: an FP8 checkpoint: FP8 weights are not trained (no useful gradient "
                         "through e4m3); convert it first (dsv32 convert HF_DIR OUT --weights bf16) "
                         "and start from OUT")
    return path, other


def load_init(path: str, cfg: Config, mtp: bool = False, seed: int = 0,
              say: Callable[[str], None] | None = None) -> dict:
    """Params of a checkpoint `check_init` accepts, for `cfg`. mtp: with the MTP layers ("mtp"),
    the checkpoint's own, or random ones (said) when it has none."""
    from dsv32_jax.checkpoint import orbax_layout
    from dsv32_jax.checkpoint.hf import load_params
    from dsv32_jax.engine.runner import has_mtp, load_mtp

    path = check_init(path)[0]
    if orbax_layout.is_orbax_dir(path):
        params = orbax_layout.restore_params(path, cfg)
    else:
        params = load_params(path, cfg)
    if mtp:
        if has_mtp(path, cfg):
            params["mtp"] = load_mtp(path, cfg)
        else:
            (say or _stderr)(f"{path}: no multi-token-prediction layer: the MTP layer starts from "
                             "random weights, its embedding and head copies of the model's")
            params["mtp"] = init_mtp_params(cfg, seed)
            mtp = params["mtp"]  # stacked (n_mtp_layers, ...): the paper shares them with the model
            mtp["embed_tokens"]["weight"] = _copies(params["embed"]["weight"], cfg.n_mtp_layers)
            mtp["shared_head"]["head"]["weight"] = _copies(params["head"]["weight"], cfg.n_mtp_layers)
    return params


def _copies(a, n: int):
    return jax.numpy.broadcast_to(a, (n, *a.shape)).copy()


def export_hf(params: dict, cfg: Config, directory: str, tokenizer_dir: str | None) -> str:
    """The float32 masters as a bf16 checkpoint in the released HF layout, with the MTP layers
    when the params have them ("mtp")."""
    mtp = "mtp" in params
    cfg = dataclasses.replace(cfg, n_mtp_layers=cfg.n_mtp_layers if mtp else 0)
    specs = flatten(abstract_params(cfg, mtp=mtp))
    tmp = directory + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {}
    for path, leaf in flatten(params).items():
        names = hf_names(cfg, path)
        arr = np.asarray(jax.device_get(leaf)).astype(specs[path].dtype)
        for i in np.ndindex(names.shape):
            tensors[str(names[i])] = arr[i]
    fname = "model.safetensors"
    write_safetensors(os.path.join(tmp, fname), tensors, {"format": "pt"})
    _json(os.path.join(tmp, "model.safetensors.index.json"),
          {"metadata": {"total_size": sum(int(t.nbytes) for t in tensors.values())},
           "weight_map": {n: fname for n in sorted(tensors)}})
    _json(os.path.join(tmp, "config.json"), cfg.to_hf())
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def checksums(state) -> tuple[list[str], list[int]]:
    """(name, CRC-32 of the bytes) of every array of a state: saved with a checkpoint, compared
    on restore (a flipped or truncated file that still restores is caught)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return ([jax.tree_util.keystr(p) for p, _ in flat],
            [zlib.crc32(np.ascontiguousarray(jax.device_get(x)).reshape(-1).view(np.uint8))
             for _, x in flat])


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_metrics(out: str) -> list[dict]:
    """The rows of OUT/metrics.jsonl; a last line cut short (a kill during an append) is left out."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.endswith("\n") or not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                raise TrainError(f"{path}: line {i} is not a metrics row of dsv32 train (a JSON object "
                                 "with a step)")
            rows.append(row)
    return rows


def _previous_run(out: str) -> dict | None:
    """The settings (run.json) of the run in `out`; None when `out` does not exist or is an empty
    directory. Anything else is refused, untouched: only a run of ours is resumed."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise TrainError(f"{out}: exists and is not a directory; choose another --out")
    if not os.path.isdir(out) or not os.listdir(out):
        return None
    try:
        with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and old.get("format") == RUN_FORMAT):
        raise TrainError(f"{out}: exists, is not empty and is not a run of dsv32 train (no run.json with "
                         f"format {RUN_FORMAT!r}), so nothing in it was touched; choose a new or empty "
                         "--out directory")
    return old


def plot(out: str, metrics: list[dict] | None = None, name: str = "curves.png") -> str | None:
    """OUT/curves.png (LM loss, KL, recall per step; stage changes dashed); None (and nothing
    written) without matplotlib."""
    try:  # a Figure of its own: no pyplot, so the caller's backend (a notebook's inline) is kept
        from matplotlib.figure import Figure
    except ImportError:
        return None
    metrics = read_metrics(out) if metrics is None else metrics
    if not metrics:
        return None
    steps = list(range(1, len(metrics) + 1))  # stages one after another (see join_stages)
    stages = [m.get("stage", "") for m in metrics]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    for ax, key, title in ((axes[0], "lm", "LM loss"), (axes[1], "kl", "indexer KL"),
                           (axes[2], "recall", "recall of dense attention mass")):
        ax.plot(steps, [m[key] for m in metrics], lw=1)
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax.axvline(i + 0.5, color="gray", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    names = list(dict.fromkeys(stages))
    fig.suptitle(" -> ".join(names) + (" stages" if len(names) > 1 else " stage"))
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=90)
    return path


class Run:
    """One stage of training into directory `out` (created, or resumed when it holds a run)."""

    def __init__(self, out: str, cfg: Config, stage: str, steps: int, batches: Batches,
                 hp: S.Hparams = S.Hparams(), init: str | None = None, seed: int = 0,
                 ckpt_every: int = 50, tokenizer_dir: str | None = None, data: str = "",
                 mesh=None, say: Callable[[str], None] | None = None):
        if cfg.quantized:
            raise TrainError("FP8 weights are not trained: use a bf16 config (train.step.train_config)")
        if hp.mtp_weight < 0 or (hp.mtp_weight > 0 and not cfg.n_mtp_layers):
            raise TrainError(f"MTP loss weight {hp.mtp_weight}: must be >= 0, and 0 for a model "
                             "without an MTP layer (num_nextn_predict_layers=0)")
        if stage == "mtp" and not hp.mtp_weight:
            raise TrainError("the mtp stage trains the MTP layer alone: it needs an MTP loss weight > 0")
        self.out, self.cfg, self.stage, self.steps, self.batches = out, cfg, stage, steps, batches
        self.hp, self.seed, self.ckpt_every, self.tokenizer_dir, self.mesh = hp, seed, ckpt_every, tokenizer_dir, mesh
        settings = {"format": RUN_FORMAT, "config": cfg.to_hf(), "dtype": cfg.dtype, "stage": stage,
                    "steps": steps, "hparams": dataclasses.asdict(hp),
                    "batch": batches.b, "seq_len": batches.s, "seed": seed, "init": init,
                    "data": os.path.basename(data)}
        self._lock = hold(out, "dsv32 train")  # held until close() / finish()
        try:
            self._open(settings, init, say or _stderr)
        except BaseException:
            self.close()
            raise

    def _open(self, settings: dict, init: str | None, say: Callable[[str], None]) -> None:
        import orbax.checkpoint as ocp

        out, cfg = self.out, self.cfg
        old = _previous_run(out)
        os.makedirs(out, exist_ok=True)
        run_json = os.path.join(out, "run.json")
        if old is not None:
            diff = [k for k in settings if k != "steps" and old.get(k) != settings[k]]
            if diff:
                raise TrainError(f"{out}: holds a run with other settings ({', '.join(diff)}): resume it "
                                 "with the same ones, or train into a new directory (--init that run "
                                 "to continue from its model)")
        _json(run_json, settings)
        if self.tokenizer_dir:  # the run keeps its own copy (the export reads it)
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(self.tokenizer_dir, name)):
                    shutil.copy(os.path.join(self.tokenizer_dir, name), out)
            self.tokenizer_dir = out
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(out, "ckpt")),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
            item_names=("state", "meta"))
        mtp = self.hp.mtp_weight > 0
        if init:
            params = load_init(init, cfg, mtp, self.seed, say)
        else:
            params = init_params(cfg, self.seed, mtp)
        params = self._place(params)
        self.tx, self.step_fn = S.trainer(cfg, self.stage, self.hp, self.steps)
        with self._ctx():
            self.state = S.init_state(params, self.tx)
        self.start = self._resume(say)
        self.metrics = [m for m in read_metrics(out) if m["step"] <= self.start]
        self._write_metrics(self.metrics, "w")

    def close(self) -> None:
        """Let another process write this run directory (finish() does it too)."""
        self._lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def compile(self) -> float:
        """Compile the step for this run's shapes before the first one (the jitted step finds
        the executable in JAX's caches) -> seconds."""
        t = time.perf_counter()
        with self._ctx():
            self.step_fn.lower(self.state, self._tokens(self.start)).compile()
        return time.perf_counter() - t

    def _restore(self, step: int):
        """The state of checkpoint `step`, verified: -> (state, None), or (None, (reason, why))."""
        import orbax.checkpoint as ocp

        d = os.path.join(self.manager.directory, str(step))
        if not os.path.isdir(os.path.join(d, "state")):
            return None, ("missing", "it has no state/ (an empty or half-written directory)")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            meta = dict(got["meta"])
            pos, sums = int(meta["data_position"]), meta.get("checksums")
            if int(meta["step"]) != step or pos != step * self.batches.b:
                return None, ("meta", f"its metadata says step {meta['step']} at data position "
                                      f"{pos}, expected step {step} at {step * self.batches.b}")
        except Exception as e:  # noqa: BLE001 - whatever a damaged checkpoint raises, said in one line
            return None, ("unreadable", f"it does not restore: {type(e).__name__}: "
                                        f"{' '.join(str(e).split())[:300]}")
        if sums is not None:  # checkpoints written before checksums were kept have none
            names, now = checksums(got["state"])
            if len(sums) != len(now):
                return None, ("checksum", f"{len(sums)} checksums recorded for {len(now)} arrays")
            for name, a, b in zip(names, sums, now):
                if a != b:
                    return None, ("checksum", f"{name} does not match its checksum (its data "
                                              "changed on disk)")
        return got["state"], None

    def _resume(self, say: Callable[[str], None]) -> int:
        """Restore the newest intact checkpoint -> its step (0: none). A damaged step is said,
        set aside as `ckpt/<step>.bad-<reason>` (never deleted) and the next older one tried."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            state, bad = self._restore(step)
            if bad is None:
                self.state = state
                return step
            d = os.path.join(self.manager.directory, str(step))
            aside = d + f".bad-{bad[0]}"
            n = 1
            while os.path.exists(aside if n == 1 else f"{aside}.{n}"):
                n += 1
            aside = aside if n == 1 else f"{aside}.{n}"
            os.rename(d, aside)
            say(f"{self.out}: checkpoint of step {step} is damaged: {bad[1]}; set aside as "
                f"{aside}, trying the previous one")
            self.manager.reload()
        if steps:
            say(f"{self.out}: no intact checkpoint left: training starts again from step 0")
        return 0

    def _ctx(self):
        import contextlib

        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _place(self, params):
        if self.mesh is None:
            return params
        specs = abstract_params(self.cfg, mtp="mtp" in params)
        return jax.device_put(params, param_shardings(specs, self.mesh))

    def _tokens(self, step: int):
        t = self.batches.batch(step)
        if self.mesh is None:
            return t
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(t, NamedSharding(self.mesh, PartitionSpec("data", None)))

    def _write_metrics(self, rows: list[dict], mode: str = "a") -> None:
        with open(os.path.join(self.out, "metrics.jsonl"), mode) as f:
            for m in rows:
                f.write(json.dumps(m) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save(self, step: int) -> None:
        import orbax.checkpoint as ocp

        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state),
            meta=ocp.args.JsonSave({"step": step, "data_position": step * self.batches.b,
                                    "stage": self.stage,
                                    "checksums": checksums(self.state)[1]})), force=True)
        self.manager.wait_until_finished()

    def train(self, on_step: Callable[[dict], None] | None = None) -> list[dict]:
        """Steps start..steps-1; a checkpoint every `ckpt_every` steps and at the end."""
        pending: list[dict] = []
        with self._ctx():
            for i in range(self.start, self.steps):
                t = time.perf_counter()
                self.state, m = self.step_fn(self.state, self._tokens(i))
                m = {k: (float(v) if np.ndim(v) == 0 else [float(x) for x in np.asarray(v)])
                     for k, v in jax.device_get(m).items()}
                m.update(step=i + 1, stage=self.stage, seconds=time.perf_counter() - t)
                self.metrics.append(m)
                pending.append(m)
                if on_step:
                    on_step(m)
                if (i + 1) % self.ckpt_every == 0 or i + 1 == self.steps:
                    self._write_metrics(pending)  # the log never runs ahead of a checkpoint by more
                    pending = []                  # than the steps since it (cut back on resume)
                    self.save(i + 1)
        self._write_metrics(pending)
        return self.metrics

    def finish(self) -> dict:
        """Export the model (OUT/hf) and the curves; -> a summary of the run."""
        hf = export_hf(self.state["params"], self.cfg, os.path.join(self.out, "hf"), self.tokenizer_dir)
        png = plot(self.out, self.metrics)
        self.close()
        return {"hf": hf, "plot": png, "first": self.metrics[0] if self.metrics else None,
                "last": self.metrics[-1] if self.metrics else None}
