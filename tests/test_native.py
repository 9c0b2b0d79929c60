"""The native CPU kernels (`dsv32_jax.native`): the few-row e4m3 / bf16 products against their jnp
reference, every e4m3 and bf16 value read exactly, the path the model runs (a scan slicing a
stack of e4m3 bits), and matmul_impl="native" end to end against matmul_impl="xla" on the
tiny-fp8 fixture (decode steps through the production forward, the kernels in its program)."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv32_jax
from conftest import fixture_dir, fixture_model, golden
from dsv32_jax import native
from dsv32_jax.native import build
from dsv32_jax.native.gemv import gemv, gemv_reference

E4M3 = ml_dtypes.float8_e4m3fn
NAN_BITS = (0x7F, 0xFF)  # e4m3fn's NaNs: no weight holds them (`checkpoint.finite`)



@pytest.fixture(autouse=True)
def _kernels():
    """Built on first use (into the test's own $DSV32_CACHE); where they cannot be (no C++
    compiler), the tests skip, and fail with CI=true (CI has one)."""
    if not native.available():
        reason = f"native kernels unavailable: {native.why_not()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true makes this a failure)")
        pytest.skip(reason)


def _e4m3_bits(rng, shape) -> np.ndarray:
    """Random e4m3 bytes over every value but NaN (subnormals, -0 and +-448 included)."""
    b = rng.integers(0, 256, shape, dtype=np.uint8)
    return np.where(np.isin(b, NAN_BITS), np.uint8(0x80), b)


def _bound(x, w) -> np.ndarray:
    """A float32 summation's error bound for x . w^T: K * eps * sum |x| |w|."""
    return x.shape[1] * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64)
                                                    @ np.abs(w).astype(np.float64).T)


@pytest.mark.parametrize("m", [1, 3, 4, 7, 32])
@pytest.mark.parametrize("n, k", [(1, 32), (6, 48), (130, 200), (257, 256)])
@pytest.mark.parametrize("kind", ["e4m3", "bf16"])
def test_gemv_matches_the_reference(kind, m, n, k):
    """Row and column tails (N not a multiple of the 4-row tile or of 128, K of the 32-value
    step or of 128), 1..32 rows of x: within float32 summation error of the jnp product."""
    rng = np.random.default_rng(m * 1000 + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if kind == "e4m3":
        w = _e4m3_bits(rng, (n, k))
        s = (2.0 ** rng.integers(-12, 4, (-(-n // 128), -(-k // 128)))).astype(np.float32)
        s[0, 0] = 0.37  # a scale that is not a power of two
    else:
        w = rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16)
        s = None
    got = np.asarray(jax.jit(gemv)(x, w, s))
    want = np.asarray(gemv_reference(x, w, s))
    assert got.shape == (m, n) and got.dtype == np.float32
    wf = w.view(E4M3).astype(np.float32) if kind == "e4m3" else w.astype(np.float32)
    if s is not None:
        wf = wf * np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k]
    assert np.all(np.abs(got - want) <= 2 * _bound(x, wf) + 1e-30), np.abs(got - want).max()


def test_every_e4m3_value_is_read_exactly():
    """Each of the 254 non-NaN e4m3 bytes (subnormals, +-0, +-448) times a scale comes out as
    its value times that scale, bit for bit (-0 as +0: a sum), at every lane and in a tail."""
    bits = np.array([b for b in range(256) if b not in NAN_BITS], np.uint8)
    values = bits.view(E4M3).astype(np.float32)
    k = 40  # a 32-value step and an 8-value tail
    for col in (0, 17, 31, 35):
        w = np.zeros((bits.size, k), np.uint8)
        w[:, col] = bits
        x = np.zeros((1, k), np.float32)
        x[0, col] = 1.0
        for scale in (1.0, 2.0**-10, 3.0):
            s = np.full((2, 1), scale, np.float32)
            got = np.asarray(gemv(x, w, s))[0]
            want = values * np.float32(scale)
            np.testing.assert_array_equal(got, want)  # -0 as a sum from +0 is +0
            np.testing.assert_array_equal(got[want != 0].view(np.uint32),
                                          want[want != 0].view(np.uint32))


def test_every_finite_bf16_value_is_read_exactly():
    """Each finite bf16 value times 1 comes out as its value, bit for bit, but the subnormal ones:
    their products are flushed to 0, as in XLA:CPU's own dots (its threads run with denormals
    flushed; the reference is one such dot)."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    values = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    keep = np.isfinite(values)
    bits, values = bits[keep], values[keep]
    w = np.zeros((bits.size, 32), np.uint16)
    w[:, 5] = bits
    x = np.zeros((1, 32), np.float32)
    x[0, 5] = 1.0
    w = w.view(ml_dtypes.bfloat16)
    got = np.asarray(gemv(x, w))[0]
    normal = np.abs(values) >= np.finfo(np.float32).tiny
    np.testing.assert_array_equal(got[normal].view(np.uint32), values[normal].view(np.uint32))
    assert np.all(got[~normal] == 0)
    np.testing.assert_array_equal(got, np.asarray(gemv_reference(x, w))[0])


def test_gemv_in_a_scan_over_stacked_bits():
    """The model's path: a layer scan slicing a stack of e4m3 bits (uint8) gives each layer the
    product a call on that layer's weight alone gives, bit for bit."""
    rng = np.random.default_rng(0)
    layers, n, k = 3, 384, 256
    w = _e4m3_bits(rng, (layers, n, k))
    s = (2.0 ** rng.integers(-8, 0, (layers, 3, 2))).astype(np.float32)
    x = rng.standard_normal((2, k)).astype(np.float32)

    @jax.jit
    def scan(x, w, s):
        return jax.lax.scan(lambda c, ws: (c, gemv(x, *ws)), 0, (w, s))[1]

    got = np.asarray(scan(x, w, s))
    for i in range(layers):
        np.testing.assert_array_equal(got[i], np.asarray(gemv(x, w[i], s[i])))


@pytest.mark.parametrize("kind", ["e4m3", "bf16"])
def test_gemv_reads_one_matrix_of_a_stack(kind):
    """W (L, E, N, K) with an (l, e) index, traced (a loop's counter): the matrix W[l, e], read in
    place, bit for bit the product of that matrix alone; an index past the end is clamped, as
    XLA's dynamic-slice clamps it."""
    rng = np.random.default_rng(5)
    lay, e, n, k = 2, 3, 130, 96
    x = rng.standard_normal((3, k)).astype(np.float32)
    if kind == "e4m3":
        w = _e4m3_bits(rng, (lay, e, n, k))
        s = (2.0 ** rng.integers(-6, 2, (lay, e, 2, 1))).astype(np.float32)
    else:
        w, s = rng.standard_normal((lay, e, n, k)).astype(ml_dtypes.bfloat16), None
    run = jax.jit(lambda x, w, s, i, j: gemv(x, w, s, (i, j)))
    for i, j in [(0, 0), (1, 2), (0, 1), (1, 7)]:
        alone = gemv(x, w[i, min(j, e - 1)], None if s is None else s[i, min(j, e - 1)])
        np.testing.assert_array_equal(np.asarray(run(x, w, s, i, j)), np.asarray(alone))
        np.testing.assert_allclose(np.asarray(run(x, w, s, i, j)),
                                   np.asarray(gemv_reference(x, w, s, (i, min(j, e - 1)))),
                                   rtol=1e-5, atol=1e-5)


def test_gemv_refuses_bad_operands():
    x = np.zeros((1, 64), np.float32)
    w = np.zeros((4, 64), np.uint8)
    s = np.ones((1, 1), np.float32)
    with pytest.raises(TypeError, match="block scales"):
        gemv(x, w, np.ones((1, 2), np.float32))
    with pytest.raises(TypeError, match="block scales"):
        gemv(x, w)
    with pytest.raises(TypeError, match="W must be"):
        gemv(x, np.zeros((4, 32), np.uint8), s)
    with pytest.raises(TypeError, match="x must be"):
        gemv(x.astype(np.float16), w, s)
    with pytest.raises(TypeError, match=r"e4m3 \(or its uint8 bits\) or bf16"):
        gemv(x, w.astype(np.float32), s)
    with pytest.raises(TypeError, match="no scales"):
        gemv(x, w.view(np.uint8).astype(ml_dtypes.bfloat16), s)
    with pytest.raises(ValueError, match="rows"):
        gemv(np.zeros((native.GEMV_ROWS + 1, 64), np.float32), w, s)
    with pytest.raises(TypeError, match="needs 1 indices, got 0"):
        gemv(x, w[None], s[None])
    with pytest.raises(TypeError, match="block scales"):
        gemv(x, w[None], s, (0,))


def _native_model():
    return dsv32_jax.load_model(fixture_dir("tiny-fp8") / "hf", matmul_impl="native")


def test_native_storage_and_program():
    """matmul_impl="native" keeps the FP8 weights as their bits (uint8) and the head bf16, and a
    decode step's XLA:CPU program calls both kernels; a prefill of more rows only for its
    expert windows (few rows each)."""
    from dsv32_jax.engine.generate import forward
    from dsv32_jax.model.transformer import init_cache

    model = _native_model()
    cfg = model.config
    assert cfg.matmul_impl == "native"
    leaves = jax.tree_util.tree_leaves_with_path(model.params)
    kinds = {jnp.dtype(a.dtype) for p, a in leaves if jax.tree_util.keystr(p).endswith("weight']")}
    assert jnp.dtype(jnp.uint8) in kinds and jnp.dtype(E4M3) not in kinds
    assert model.params["head"]["weight"].dtype == jnp.bfloat16

    def program(b, s):
        args = (jnp.zeros((b, s), jnp.int32), jnp.zeros((b, s), jnp.int32), init_cache(cfg, b, 64),
                jnp.zeros(b, jnp.int32))
        return forward.lower(model.params, *args, cfg=cfg).as_text()

    def gemv_rows(text):  # rows of x in each kernel call
        return [int(r) for r in re.findall(r"@dsv32_gemv_\w+\(.*?\) .*?: \(tensor<(\d+)x", text)]

    decode = program(2, 1)
    assert "dsv32_gemv_e4m3" in decode and "dsv32_gemv_bf16" in decode
    assert max(gemv_rows(decode)) == 2  # the batch (an expert window: 1 or 2)
    rows = native.GEMV_ROWS + 8  # the dense linears' rows: XLA's; an expert window's: the kernel
    prefill = gemv_rows(program(1, rows))
    assert prefill and max(prefill) <= native.GEMV_ROWS and rows not in prefill


def test_native_decode_matches_xla():
    """bf16 + FP8 numerics, decode steps after an XLA prefill, teacher-forced, through the
    production forward: the native kernels' logits against XLA's. The kernels sum in another
    float32 order, so a bf16 rounding, then an e4m3 rounding of the next linear's input, can
    come out one step apart (as between any two summation orders: see tests/test_parity.py);
    such a flip moves its row by up to ~1e-1 * std. So: the bulk at rounding level, near-all
    rows within 1e-2 * std, every row's argmax equal or a near-tie."""
    from dsv32_jax.engine import generate as gen
    from dsv32_jax.model.transformer import init_cache

    ref = fixture_model("tiny-fp8", "bf16")
    model = _native_model()
    tokens = golden("tiny-fp8", "bf16")["tokens"]
    b, prompt = tokens.shape[0], 8
    xla_cfg, cfg = ref.config, model.config
    _, cache, _ = gen.prefill(ref.params, xla_cfg, "xla", tokens[:, :prompt], np.full(b, prompt),
                              init_cache(xla_cfg, b, 64))
    ncache = jax.tree.map(jnp.copy, cache)
    errs, agree = [], []
    for j in range(prompt, tokens.shape[1]):
        step = jnp.asarray(tokens[:, j:j + 1]), jnp.full((b, 1), j, jnp.int32)
        got, ncache, _ = gen.forward(model.params, *step, ncache, jnp.zeros(b, jnp.int32), cfg=cfg)
        want, cache, _ = gen.forward(ref.params, *step, cache, jnp.zeros(b, jnp.int32),
                                     cfg=xla_cfg)
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        errs.extend(np.abs(got - want).reshape(b, -1).max(-1) / want.std())
        agree.extend(got.reshape(b, -1).argmax(-1) == want.reshape(b, -1).argmax(-1))
    errs = np.array(errs)
    print(f"native vs xla decode: median row err {np.median(errs):.2e}, max {errs.max():.2e}, "
          f"argmax {np.mean(agree):.3f} over {errs.size} rows")
    assert np.median(errs) < 1e-4, np.median(errs)  # measured 4.7e-7 (max 0.16: a flip)
    assert np.mean(errs < 5e-2) >= 0.9, errs
    assert np.mean(agree) >= 0.9, np.mean(agree)


def test_native_config_and_storage_errors(monkeypatch):
    base = fixture_dir("tiny-fp8") / "hf"
    with pytest.raises(ValueError, match="bf16 numerics"):
        dsv32_jax.load_model(base, dtype="float32", matmul_impl="native")
    with pytest.raises(ValueError, match="matmul_impl='native': its FP8 kernels read e4m3"):
        dsv32_jax.load_model(base, weights="f32", matmul_impl="native")


@pytest.mark.parametrize("env, why", [({"DSV32_NATIVE": "0"}, "DSV32_NATIVE=0"),
                                      ({"DSV32_CXX": "no-such-c++"}, "no C\\+\\+ compiler")])
def test_unavailable_kernels_are_an_error(monkeypatch, tmp_path, env, why):
    """Asked for and not available (turned off, or no compiler for a first build): load_model
    says why, before it reads the checkpoint; nothing falls back."""
    monkeypatch.setattr(build, "_REGISTERED", [])
    monkeypatch.setenv("DSV32_CACHE", str(tmp_path))  # no library built there yet
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    build._load.cache_clear()
    try:
        assert not native.available()
        with pytest.raises(native.NativeUnavailable, match=why):
            dsv32_jax.load_model(fixture_dir("tiny-fp8") / "hf", matmul_impl="native")
        assert not list(tmp_path.rglob("*.so"))  # no half-built library left
    finally:
        build._load.cache_clear()


def test_a_failed_build_leaves_no_library(monkeypatch, tmp_path):
    """A compiler that fails: the error carries its output, and no file that looks built."""
    fake = tmp_path / "bad-c++"
    fake.write_text("#!/bin/sh\necho 'fake compiler error' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(build, "_REGISTERED", [])
    monkeypatch.setenv("DSV32_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DSV32_CXX", str(fake))
    build._load.cache_clear()
    try:
        with pytest.raises(native.NativeUnavailable, match="fake compiler error"):
            build.require()
        assert not list((tmp_path / "cache").rglob("*.so"))
    finally:
        build._load.cache_clear()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """The tiny FP8 preset at 2 layers: not the programs of `dsv32 demo --random` (tiny), which
    tests/test_cli.py expects to compile afresh (the test run shares one compile cache)."""
    from dsv32_jax import preset
    from dsv32_jax.checkpoint.synthetic import write_checkpoint

    return write_checkpoint(preset("tiny", n_layers=2), tmp_path_factory.mktemp("ckpt") / "tiny")


def test_cli_generate_with_native_kernels(tiny_ckpt, capsys, monkeypatch):
    """`dsv32 generate --matmul native` greedy gives the text `--matmul xla` gives (the tiny FP8
    preset); with the kernels turned off it is one line, exit 1."""
    from dsv32_jax.cli import main

    args = ["generate", "--ckpt", str(tiny_ckpt), "--prompt", "Hello there", "--max-new-tokens", "6",
            "--temperature", "0"]
    assert main(args) == 0
    xla = capsys.readouterr().out
    assert main([*args, "--matmul", "native"]) == 0
    assert capsys.readouterr().out == xla
    monkeypatch.setattr(build, "_REGISTERED", [])
    monkeypatch.setenv("DSV32_NATIVE", "0")
    build._load.cache_clear()
    try:
        assert main([*args, "--matmul", "native"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("dsv32 generate: error: the native CPU kernels are unavailable")
        assert "DSV32_NATIVE=0" in err[-1]
    finally:
        build._load.cache_clear()
