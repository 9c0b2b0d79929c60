"""Shared test helpers: the golden fixtures (../shared/fixtures or $DSV32_FIXTURES) and cached models."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DSV32_FIXTURES", REPO.parent / "shared" / "fixtures"))
CASES = ("tiny-fp8", "tiny-bf16")
# numerics mode name in the fixtures -> (dtype, fp8_activations)
MODES = {"exact": ("float32", False), "fp32": ("float32", True), "bf16": ("bfloat16", True)}


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path_factory, monkeypatch):
    """Every test has its own $DSV32_CACHE (the CLI's compile cache, the random demo's checkpoints): nothing is
    written into the user's ~/.cache, and no test reads what another one compiled. CLIs spawned by a test
    inherit it."""
    monkeypatch.setenv("DSV32_CACHE", str(tmp_path_factory.mktemp("dsv32-cache")))


def fixture_dir(case: str) -> Path:
    """The fixture case directory, or skip (fail under DSV32_REQUIRE_FIXTURES=1) if absent."""
    path = FIXTURES / case
    if not (path / "hf" / "config.json").is_file():
        reason = f"golden fixtures not found at {path} (set DSV32_FIXTURES to the fixtures dir)"
        if os.environ.get("DSV32_REQUIRE_FIXTURES") == "1":
            pytest.fail(reason + "; DSV32_REQUIRE_FIXTURES=1 makes this a failure")
        pytest.skip(reason)
    return path


@functools.lru_cache(maxsize=None)
def golden(case: str, mode: str) -> dict:
    with np.load(fixture_dir(case) / f"golden_{mode}.npz") as z:
        return {k: z[k] for k in z.files}


@functools.lru_cache(maxsize=None)
def fixture_model(case: str, mode: str, attention_impl: str = "xla"):
    import dsv32_jax

    dtype, fp8 = MODES[mode]
    return dsv32_jax.load_model(fixture_dir(case) / "hf", dtype=dtype, fp8_activations=fp8,
                                attention_impl=attention_impl)


def row_error(a, g) -> np.ndarray:
    """Per-row (last axis) max abs error relative to the golden tensor's std."""
    a = np.asarray(a, np.float32).reshape(-1, g.shape[-1])
    g = np.asarray(g, np.float32).reshape(-1, g.shape[-1])
    return np.abs(a - g).max(-1) / g.std()


def row_cosine(a, g) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1, g.shape[-1])
    g = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    return (a * g).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(g, axis=-1)


def topk_agreement(ours, gold) -> float:
    """Share of (layer, batch, query) rows whose selected key sets agree on the visible entries
    (ours marks 'no pick' with -1)."""
    ours, gold = np.asarray(ours), np.asarray(gold)
    same = []
    for o, g in zip(ours.reshape(-1, *ours.shape[-2:]), gold.reshape(-1, *gold.shape[-2:])):
        for s in range(o.shape[0]):
            same.append(set(o[s][(o[s] >= 0) & (o[s] <= s)]) == set(g[s][g[s] <= s]))
    return float(np.mean(same))


def interrupt_step(monkeypatch, at: int) -> None:
    """Make the `at`-th compiled decode step of every ChatSession raise KeyboardInterrupt (as a
    Ctrl-C during the device call, whose cache was donated); other executables run as they are."""
    from dsv32_jax.engine.session import ChatSession

    real, calls = ChatSession._executable, []

    def patched(self, label, key, stats, lower):
        exe = real(self, label, key, stats, lower)
        if key[0] != "step":
            return exe

        def step(*args):
            calls.append(1)
            if len(calls) == at:
                raise KeyboardInterrupt
            return exe(*args)

        return step

    monkeypatch.setattr(ChatSession, "_executable", patched)


def components(model, z: dict) -> list[dict]:
    """Per layer, the model's MLA / FFN (or MoE) outputs and intermediates fed the golden attn_in /
    ffn_in of `z`, in the model's compute dtype: the production modules, one layer at a time."""
    import jax
    import jax.numpy as jnp

    from dsv32_jax.checkpoint.weights import layer_params
    from dsv32_jax.model.attention import MLA
    from dsv32_jax.model.cache import KVCache
    from dsv32_jax.model.moe import EXPERTS, FFN, MoE
    from dsv32_jax.model.rope import rope_tables
    from dsv32_jax.model.transformer import variables

    cfg = model.config
    b, s = z["tokens"].shape
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin = rope_tables(cfg, pos)

    @jax.jit
    def attn(p, x):  # one layer's MLA writing into a one-layer cache, as in the model
        cache = KVCache.zeros(cfg, 1, b, s)
        return MLA(cfg).apply({"params": p}, x, pos, cos, sin, cache, 0, mutable=["intermediates"])

    @jax.jit
    def moe(p, x, layer):  # p: one layer's params; its experts come from the stack of all
        v = variables({"moe_layers": {"ffn": p}})
        v = {"params": v["params"]["moe_layers"]["ffn"], EXPERTS: {"experts": experts}}
        return MoE(cfg).apply(v, x, layer, mutable=["intermediates"])

    @jax.jit
    def ffn(p, x):
        return FFN(cfg, cfg.inter_dim).apply({"params": p}, x)

    experts = model.params["moe_layers"]["ffn"]["experts"]
    out = []
    for layer in range(cfg.n_layers):
        is_moe, p = layer_params(cfg, model.params, layer)
        (a, _), st = attn(p["attn"], jnp.asarray(z["attn_in"][layer], cfg.dtype))
        r = {"attn_out": a, "index_scores": st["intermediates"]["index_scores"][0],
             "topk": st["intermediates"]["topk"][0]}
        x = jnp.asarray(z["ffn_in"][layer], cfg.dtype)
        if is_moe:
            f, st = moe(p["ffn"], x, layer - cfg.n_dense_layers)
            r["gate_experts"] = st["intermediates"]["gate_experts"][0]
        else:
            f = ffn(p["ffn"], x)
        r["ffn_out"] = f
        out.append(r)
    return out
