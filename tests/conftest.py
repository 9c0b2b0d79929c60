"""Shared test helpers: the golden fixtures (../shared/fixtures or $DSV32_FIXTURES) and cached models."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DSV32_FIXTURES", REPO.parent / "shared" / "fixtures"))
CASES = ("tiny-fp8", "tiny-bf16")
# numerics mode name in the fixtures -> (dtype, fp8_activations)
MODES = {"exact": ("float32", False), "fp32": ("float32", True), "bf16": ("bfloat16", True)}


# The test run's settings for JAX, set once by the controller (pytest-xdist's workers and the processes
# tests spawn inherit them); `user_env()` gives a spawned program the environment without them.
# - One persistent XLA compilation cache for the run: a program several tests (or their CLI processes)
#   compile identically is compiled once. The cache is keyed by the program and the compiler, so what
#   it returns is what a compile would give; fresh for each run, removed after it. The tests of the
#   CLI's own cache opt out (`no_shared_compile_cache`).
# - XLA:CPU's machine code made fast to compile: the same HLO programs after the same XLA passes,
#   only the code generation differs. LLVM at -O0 (--xla_backend_optimization_level=0): compiles,
#   most of this suite's time on tiny shapes, take about 1/3 less (the notebook test: 80 s -> 52 s);
#   fusions by XLA:CPU's older LLVM IR emitters instead of its MLIR fusion emitters
#   (--xla_cpu_use_fusion_emitters=false): a tiny model's forward compiles in 1.5 s instead of
#   2.5 s, test_parity + test_bf16_numerics take 53 s instead of 76 s.
#   DSV32_TEST_FULL_OPT=1 keeps XLA's defaults. The deviceless H100 compile never gets them.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
TEST_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        return
    if os.environ.get("DSV32_TEST_FULL_OPT") != "1" and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        config._dsv32_xla_cache = tempfile.mkdtemp(prefix="dsv32-test-xla-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config._dsv32_xla_cache
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def xla_env(devices: int | None = None, **extra) -> dict:
    """The environment for a test's subprocess: this run's, with `devices` simulated CPU devices
    (XLA_FLAGS must be set before JAX starts) and the repo on PYTHONPATH."""
    flags = os.environ.get("XLA_FLAGS", "")
    if devices is not None:
        flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, XLA_FLAGS=flags,
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def user_env(**extra) -> dict:
    """The environment as a user's shell has it: without this run's JAX settings (above)."""
    env = {k: v for k, v in os.environ.items() if k not in TEST_ENV}
    flags = env.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
    env.pop("XLA_FLAGS", None)
    if flags:
        env["XLA_FLAGS"] = flags
    return {**env, **extra}


def pytest_unconfigure(config):
    if getattr(config, "_dsv32_xla_cache", None):
        shutil.rmtree(config._dsv32_xla_cache, ignore_errors=True)


@pytest.fixture
def no_shared_compile_cache(monkeypatch):
    """JAX as a user's process starts: no compilation cache configured (in this process and the ones
    the test spawns)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    for name in TEST_ENV:
        monkeypatch.delenv(name, raising=False)
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    compilation_cache.reset_cache()


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path_factory, monkeypatch):
    """Every test has its own $DSV32_CACHE (the CLI's compile cache, the random demo's checkpoints): nothing is
    written into the user's ~/.cache (the run's shared XLA cache stands in for the CLI's). CLIs spawned by a test
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
def fixture_model(case: str, mode: str, attention_impl: str = "xla", weights: str = "auto"):
    import dsv32_jax

    dtype, fp8 = MODES[mode]
    return dsv32_jax.load_model(fixture_dir(case) / "hf", dtype=dtype, fp8_activations=fp8,
                                attention_impl=attention_impl, weights=weights)


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


def page_table(rng, owned, p: int, n_pages: int) -> np.ndarray:
    """A page table (B, p) int32 for the paged kernels: sequence i owns owned[i] distinct pages
    of a pool of n_pages, drawn shuffled (not contiguous, not monotonic; page 0, the scratch page,
    never), its other entries 0 (the scratch page)."""
    table = np.zeros((len(owned), p), np.int32)
    free = rng.permutation(np.arange(1, n_pages, dtype=np.int32))
    for i, n in enumerate(owned):
        table[i, :n], free = free[:n], free[n:]
    return table


def interrupt_step(monkeypatch, at: int) -> None:
    """Make the `at`-th decode step of every engine (a ChatSession's too) raise KeyboardInterrupt,
    as a Ctrl-C during the device call, whose pools were donated; other steps run as they are."""
    from dsv32_jax.engine.core import Engine

    real, calls = Engine._program, []

    def patched(self, a):
        if a["decode"]:
            calls.append(1)
            if len(calls) == at:
                raise KeyboardInterrupt
        return real(self, a)

    monkeypatch.setattr(Engine, "_program", patched)


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
