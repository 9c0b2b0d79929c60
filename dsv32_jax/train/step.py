"""Losses, the optimizer (optax AdamW per param group) and the pure jitted train step per stage.

Param groups (`param_labels`): "indexer" (every `attn/indexer/*` param), "router_bias" (the MoE
gate's e_score_correction_bias: it steers expert selection only, so no gradient reaches it; the
release adjusts it by load balancing, not by the loss; here it stays frozen) and "main" (the
rest). Per stage, what trains:

  dense   main (LM loss)                      indexer frozen
  warmup  indexer (KL to the dense attention)  main frozen
  sparse  main (LM loss) and indexer (KL restricted to the selected keys), each its own LR
  mtp     the MTP layers only, on top of a frozen model ("frozen": every param outside "mtp", and
          the MTP layers' embedding and head, which start as copies of the model's: the paper
          shares them); see `losses`

A frozen group gets `optax.set_to_zero` (no update, no weight decay, no optimizer state). Each
trained group: clip by its own global norm, AdamW (decay on matrices only), a warmup + cosine
schedule.

Mixed precision: the state holds float32 master weights; the forward casts each param to its
checkpoint dtype (bf16) when the compute dtype is bfloat16, so the gradients (float32, through
the cast) update the masters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dsv32_jax.checkpoint.weights import abstract_params, flatten, unflatten
from dsv32_jax.model.config import Config
from dsv32_jax.train.model import STAGES, TrainTransformer, train_mtp

GROUPS = ("main", "indexer", "router_bias", "frozen")
TRAINED = {"dense": ("main",), "warmup": ("indexer",), "sparse": ("main", "indexer"),
           "mtp": ("main", "indexer")}
SHARED = (("embed_tokens",), ("shared_head", "head"))  # the MTP layer's copies of the model's


@dataclasses.dataclass(frozen=True)
class Hparams:
    lr: float = 3e-3  # main model peak LR
    indexer_lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    remat: str = "none"  # none | full | dots (train.model.REMAT)
    mtp_weight: float = 0.0  # lambda of the MTP loss (0: no MTP layer trained nor needed)


def param_labels(params: dict, stage: str = "") -> dict:
    def label(path):
        if stage == "mtp" and (path[0] != "mtp" or any(path[1:1 + len(p)] == p for p in SHARED)):
            return "frozen"
        if "indexer" in path:
            return "indexer"
        if path[-1] == "gate_bias":
            return "router_bias"
        return "main"
    return unflatten({p: label(p) for p in flatten(params)})


def _decay_mask(params: dict) -> dict:
    """Weight decay on weight matrices only (not norms, biases, the router bias)."""
    def decays(path):
        leaf, parent = path[-1], path[-2] if len(path) > 1 else ""
        return leaf.endswith("weight") and "norm" not in parent
    return unflatten({p: decays(p) for p in flatten(params)})


def make_optimizer(stage: str, hp: Hparams, total_steps: int, params: dict):
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    mask = _decay_mask(params)

    def group(lr):
        warm = max(1, min(hp.warmup_steps, total_steps))
        sched = optax.warmup_cosine_decay_schedule(  # the first step at lr/warm, not 0
            lr / warm, lr, warm, max(total_steps, hp.warmup_steps + 1),
            lr * hp.min_lr_ratio)
        return optax.chain(optax.clip_by_global_norm(hp.clip),
                           optax.adamw(sched, hp.b1, hp.b2, weight_decay=hp.weight_decay, mask=mask))

    lrs = {"main": hp.lr, "indexer": hp.indexer_lr}
    transforms = {g: group(lrs[g]) if g in TRAINED[stage] else optax.set_to_zero() for g in GROUPS}
    return optax.multi_transform(transforms, param_labels(params, stage))


def compute_params(params: dict, cfg: Config) -> dict:
    """float32 masters -> the forward's params: the checkpoint dtypes under bf16 compute."""
    if cfg.dtype != "bfloat16":
        return params
    specs = flatten(abstract_params(cfg, mtp="mtp" in params))
    return unflatten({p: v.astype(specs[p].dtype) for p, v in flatten(params).items()})


def lm_loss(logits: jax.Array, tokens: jax.Array, ahead: int = 1) -> jax.Array:
    """Mean cross-entropy of logits (B,S,V) predicting tokens[:, ahead:] (the next token: 1)."""
    logp = jax.nn.log_softmax(logits[:, :tokens.shape[1] - ahead].astype(jnp.float32), -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, ahead:, None], -1))


def mtp_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean over MTP layers of their cross-entropy: logits (D,B,S,V), layer d at position i
    predicts tokens[:, i + d + 2]."""
    return jnp.mean(jnp.stack([lm_loss(logits[d], tokens, d + 2) for d in range(logits.shape[0])]))


def losses(params: dict, tokens: jax.Array, cfg: Config, stage: str, remat: str = "none",
           mtp_weight: float = 0.0):
    """-> (the stage's loss, metrics). kl: the mean over layers and queries of the indexer's KL
    (to the dense attention in dense/warmup, on the selected set in sparse); recall: the mean over
    layers of the dense-attention mass inside the indexer's top-k.

    mtp_weight > 0 (params["mtp"]: the MTP layers): + mtp_weight x `mtp_loss` (metric "mtp"),
    which trains the main model too (through the hidden state the MTP layers read), and outside
    the dense stage the MTP layers' own indexer KL (metric "mtp_kl"). 0: the loss without MTP.

    Stage "mtp" (mtp_weight > 0): the model runs as it serves (sparse attention) and is frozen (its
    hidden state detached); the MTP layers run dense attention while their indexer learns it (the
    warm-up's KL), as a fresh indexer cannot yet pick the keys; they serve sparse over its top-k.
    Loss: mtp_weight x `mtp_loss` + the MTP indexer's KL; lm/kl/recall: the frozen model's."""
    from dsv32_jax.model.transformer import variables

    frozen = stage == "mtp"
    module = TrainTransformer(cfg, "sparse" if frozen else stage, remat)
    params = compute_params(params, cfg)
    if mtp_weight:
        main = {k: v for k, v in params.items() if k != "mtp"}
        logits, stats, h = module.apply(variables(main), tokens, hidden=True)
    else:
        logits, stats = module.apply(variables(params), tokens)
    lm, kl = lm_loss(logits, tokens), jnp.mean(stats["kl"])
    loss = {"dense": lm, "warmup": kl, "sparse": lm + kl, "mtp": 0.0}[stage]
    metrics = {"lm": lm, "kl": kl, "recall": jnp.mean(stats["recall"]),
               "recall_layers": stats["recall"]}
    if mtp_weight:
        if frozen:
            h = jax.lax.stop_gradient(h)
        mtp_logits, mtp_stats = train_mtp(params["mtp"], cfg, "dense" if frozen else stage, h, tokens)
        metrics["mtp"], metrics["mtp_kl"] = mtp_loss(mtp_logits, tokens), jnp.mean(mtp_stats["kl"])
        loss = loss + mtp_weight * metrics["mtp"] + (0.0 if stage == "dense" else metrics["mtp_kl"])
    return loss, {"loss": loss, **metrics}


def init_state(params: dict, tx) -> dict:
    """Train state: float32 master params, optimizer state, step."""
    master = jax.tree.map(lambda a: jnp.array(a, jnp.float32), params)  # a copy: the step donates it
    return {"params": master, "opt_state": tx.init(master), "step": jnp.zeros((), jnp.int32)}


def make_step(cfg: Config, stage: str, tx, remat: str = "none", mtp_weight: float = 0.0):
    """The jitted step: (state, tokens (B,S)) -> (state, metrics). Pure; the state is donated."""
    def step(state, tokens):
        grad_fn = jax.grad(losses, has_aux=True)
        grads, metrics = grad_fn(state["params"], tokens, cfg, stage, remat, mtp_weight)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        labels = flatten(param_labels(grads, stage))
        for g in ("main", "indexer"):
            leaves = [v for p, v in flatten(grads).items() if labels[p] == g]
            metrics[f"grad_norm_{g}"] = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in leaves))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def trainer(cfg: Config, stage: str, hp: Hparams, total_steps: int):
    """(optimizer, jitted step) for a run; cached, so runs of the same settings in one process
    (a resume, a test) share one compiled step."""
    specs = abstract_params(cfg, mtp=hp.mtp_weight > 0)  # labels need paths only
    tx = make_optimizer(stage, hp, total_steps, specs)
    return tx, make_step(cfg, stage, tx, hp.remat, hp.mtp_weight)


def train_config(cfg: Config, dtype: str = "bfloat16") -> Config:
    """The config a model trains under: bf16 weights (FP8 weights are not trained), no FP8
    activation simulation (its rounding has no useful gradient), compute dtype `dtype`."""
    return dataclasses.replace(cfg, weight_dtype="bf16", scale_fmt=None, fp8_activations=False,
                               dtype=dtype)


def tree_dtypes(tree: Any) -> set:
    return {str(a.dtype) for a in jax.tree.leaves(tree)}
