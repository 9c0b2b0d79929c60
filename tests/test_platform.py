"""The program lowered for a GPU is the GPU program, whatever machine lowers it.

- Kernels: `pallas_kernels.common.pallas_call` picks the compiled Triton kernel when lowering for
  CUDA and jax's interpreter elsewhere (`jax.lax.platform_dependent`), not by
  `jax.default_backend()` (which is "cpu" on a machine that compiles for an H100 without one).
- Arithmetic: in the bf16 deployment numerics, the GPU program's dots take bf16 (or e4m3)
  operands; the only float32 dots at HIGHEST precision are the release's float32 linears
  (router, lm_head, indexer weights_proj), under the `fp32_by_spec` named scope. The CPU program
  widens bf16 dots to float32 (XLA:CPU lacks some bf16 x bf16 -> f32 dots).
- Sampling: greedy decoding on the CPU skips the nucleus's vocabulary sort (a conditional); the
  GPU program computes both and selects, as it did.
- Few-row linears (a speculative verify): the CPU program takes them one row at a time.
- FP8 linears with a bf16 result: the CPU program is one float32 product of the dequantized
  weight; the GPU program keeps the release's per-block e4m3 dots.
- FP8 dots in Triton kernels carry `maxNumImpreciseAcc = 128` (pallas_kernels/triton_fp8.py):
  what lets Triton emit Hopper's FP8 wgmma, promoted to float32 every 128 of K.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental import pallas as pl

import dsv32_jax
from dsv32_jax.checkpoint.weights import abstract_params
from dsv32_jax.engine.generate import forward, sample
from dsv32_jax.engine.speculative import draft
from dsv32_jax.model import layers
from dsv32_jax.model.quant import FP32_BY_SPEC, GEMV_ROWS, MATMUL, einsum
from dsv32_jax.model.transformer import init_cache
from pallas_kernels.common import compiler_params, lower_for_gpu
from pallas_kernels.fp8_linear import fp8_linear

S = jax.ShapeDtypeStruct
E4M3 = jnp.float8_e4m3fn
TRITON_CALL = "__gpu$xla.gpu.triton"


def _fp8_operands(m=32, n=256, k=256):
    return (S((m, k), E4M3), S((m, k // 128), jnp.float32), S((n, k), E4M3),
            S((n // 128, k // 128), jnp.float32))


def test_kernel_is_compiled_for_cuda_and_interpreted_on_cpu():
    gpu = lower_for_gpu(fp8_linear, *_fp8_operands())
    assert TRITON_CALL in gpu and "stablehlo.while" not in gpu  # the Triton kernel, no loops
    cpu = jax.jit(fp8_linear).lower(*_fp8_operands()).as_text()
    assert TRITON_CALL not in cpu and "stablehlo.while" in cpu  # the interpreter's grid loop


def test_forced_interpret_stays_interpreted_on_gpu():
    gpu = lower_for_gpu(lambda *a: fp8_linear(*a, interpret=True), *_fp8_operands())
    assert TRITON_CALL not in gpu


def _dots(kernel_asm: str) -> list[str]:
    return [line for line in kernel_asm.splitlines() if "tt.dot " in line]


def test_fp8_dots_promote_every_128(capsys):
    """The Triton module of a kernel with an e4m3 dot and a bf16 dot: only the e4m3 one carries
    maxNumImpreciseAcc = 128."""
    def kernel(a_ref, b_ref, c_ref, d_ref, o_ref, p_ref):
        dims = (((1,), (1,)), ((), ()))
        o_ref[...] = jax.lax.dot_general(a_ref[...], b_ref[...], dims,
                                         preferred_element_type=jnp.float32)
        p_ref[...] = jax.lax.dot_general(c_ref[...], d_ref[...], dims,
                                         preferred_element_type=jnp.float32)

    call = pl.pallas_call(kernel, out_shape=[S((64, 64), jnp.float32)] * 2, debug=True,
                          interpret=False, compiler_params=compiler_params(4, 1))
    lower_for_gpu(call, S((64, 128), E4M3), S((64, 128), E4M3), S((64, 128), jnp.bfloat16),
                  S((64, 128), jnp.bfloat16))
    dots = _dots(capsys.readouterr().out)
    fp8 = [d for d in dots if "f8E4M3FN>" in d]
    bf16 = [d for d in dots if "bf16>" in d]
    assert len(fp8) == 1 and len(bf16) == 1, dots
    assert "maxNumImpreciseAcc = 128" in fp8[0]
    assert "maxNumImpreciseAcc" not in bf16[0]


def _forward_text(cfg, gpu: bool) -> str:
    params = jax.tree.map(lambda s: S(s.shape, s.dtype), abstract_params(cfg),
                          is_leaf=lambda x: hasattr(x, "names"))
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 64))
    i32 = jnp.int32
    args = (params, S((1, 8), i32), S((1, 8), i32), cache, S((1,), i32))
    fn = lambda p, t, q, c, l: forward(p, t, q, c, l, cfg=cfg, impl="xla")  # noqa: E731
    if gpu:
        dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
                                          num_cores=132)
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (),
                                                                      abstract_device=dev)):
            low = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    else:
        low = jax.jit(fn).lower(*args)
    return low.as_text(debug_info=True)


def _contraction(line: str) -> int:
    """The contracted size of a stablehlo.dot_general line (its lhs operand's contracting dims)."""
    lhs = re.search(r": \(tensor<([\dx]+)x\w+>", line).group(1).split("x")
    dims = re.search(r"contracting_dims = \[([\d, ]*)\]", line).group(1)
    size = 1
    for d in filter(None, dims.split(",")):
        size *= int(lhs[int(d)])
    return size


def _f32_highest_dots(text: str) -> tuple[list[str], list[str]]:
    """float32 dots at HIGHEST precision: (those outside the fp32_by_spec scope, those inside)."""
    locs = dict(re.findall(r"^(#loc\d+) = (.*)$", text, re.M))
    outside, inside = [], []
    for line in text.splitlines():
        if "stablehlo.dot_general" not in line or "HIGHEST" not in line:
            continue
        if not re.search(r": \(tensor<[^>]*xf32>, tensor<[^>]*xf32>\)", line):
            continue
        m = re.search(r"loc\((#loc\d+)\)", line)
        where = locs.get(m.group(1), "") if m else ""
        (inside if FP32_BY_SPEC in where else outside).append(line)
    return outside, inside


# Below this contracted size a float32 dot is one of the release's float32 weighted sums (over
# K/128 scale blocks, top-k picks, index heads; XLA:GPU turns them into reductions), not a matmul:
# the tiny preset's smallest matmul contraction is 64 (its rope head dim).
SUM_MAX = 16


def test_bf16_gpu_program_has_no_f32_matmuls_but_the_specs():
    cfg = dsv32_jax.preset("tiny")  # bf16 compute, FP8 activations: the deployment numerics
    assert cfg.dtype == "bfloat16" and cfg.fp8_activations
    outside, inside = _f32_highest_dots(_forward_text(cfg, gpu=True))
    matmuls = [line for line in outside if _contraction(line) > SUM_MAX]
    assert matmuls == [], matmuls[:3]
    assert inside, "the release's float32 linears (router, head, weights_proj) are missing"
    cpu_outside, _ = _f32_highest_dots(_forward_text(cfg, gpu=False))
    widened = [line for line in cpu_outside if _contraction(line) > SUM_MAX]
    assert widened, "the CPU program widens bf16 dots to float32: none found"


def _unbranched(hlo: str) -> str:
    """The instructions of a compiled HLO module that its ENTRY runs without entering a branch
    of a `conditional` (the computations reached through calls, fusions, loops, reductions)."""
    comps = {m.group(2): m.group(3) for m in re.finditer(
        r"^(ENTRY )?%([\w.\-]+) .*?\{\n(.*?)^\}", hlo, re.M | re.S)}
    entry = re.search(r"^ENTRY %([\w.\-]+)", hlo, re.M).group(1)
    seen, todo, out = {entry}, [entry], []
    while todo:
        for line in comps[todo.pop()].splitlines():
            if " conditional(" in line:
                continue
            out.append(line)
            for callee in re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line):
                if callee not in seen:
                    seen.add(callee)
                    todo.append(callee)
    return "\n".join(out)


@pytest.mark.parametrize("fn, logits", [
    (sample, np.zeros((2, 64), np.float32)),  # a decode step's
    (draft, np.zeros(64, np.float32)),  # a speculative draft's (its `probs`, verify's too)
])
def test_greedy_sampling_sorts_the_vocab_only_in_the_gpu_program(fn, logits):
    """The nucleus's argsort of the vocabulary is what temperature > 0 needs: the CPU program
    runs it only in the sampled branch of a conditional (XLA:CPU's sort costs more than a demo
    decode step), the GPU program keeps computing both and selecting (no branch)."""
    args = (logits, jax.random.key(0), np.float32(0), np.float32(0.9))
    cpu = jax.jit(fn).lower(*args).compile().as_text()
    assert " sort(" in cpu and " sort(" not in _unbranched(cpu)
    gpu = lower_for_gpu(fn, *args)
    assert "stablehlo.sort" in gpu and _value_branches(gpu) == []


def _value_branches(stablehlo: str) -> list[str]:
    """The `stablehlo.case` ops of a lowered program that branch on a computed value (a lax.cond),
    not on a constant (the platform choices of `platform_dependent`, folded by XLA): those of
    @main, where the sampling code lies inlined."""
    stablehlo = re.search(r"func\.func public @main.*?\n  \}\n", stablehlo, re.S).group(0)
    defs = dict(re.findall(r"(%[\w#]+)(?::\d+)? = \"?([\w.]+)", stablehlo))
    return [sel for sel in re.findall(r'"stablehlo\.case"\((%[\w#]+)\)', stablehlo)
            if defs.get(sel) not in ("stablehlo.constant", "stablehlo.case")]


@pytest.mark.parametrize("rows", [2, 3, GEMV_ROWS])
def test_cpu_matmul_of_few_rows_is_their_one_row_products(rows):
    """Up to GEMV_ROWS rows, the CPU program takes a linear layer's product one row at a time
    (XLA:CPU's matrix-vector product, a fraction of its matrix-matrix one's cost there): each
    row has the bits of its own one-row product. The GPU program keeps one dot."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((1, rows, 384)).astype(np.float32)
    w = rng.standard_normal((512, 384)).astype(ml_dtypes.bfloat16)
    f = jax.jit(lambda x, w: einsum(MATMUL, x, w, jnp.bfloat16, jnp.float32))
    y = np.asarray(f(x, w))
    for i in range(rows):
        np.testing.assert_array_equal(y[:, i], np.asarray(f(x[:, i:i + 1], w))[:, 0])
    cpu = jax.jit(f).lower(x, w).as_text()
    assert cpu.count("stablehlo.dot_general") == rows
    assert lower_for_gpu(f, x, w).count("stablehlo.dot_general") == 1


def test_bf16_fp8_linear_is_one_f32_product_only_in_the_cpu_program():
    """An FP8 linear (impl "xla") with a bf16 result lowered for the CPU is one float32 dot over
    all of K (`quant.dequant_matmul` of the weight dequantized in the step); lowered for a GPU it
    is the release's blockwise sum, its per-block dots of e4m3 operands (`quant.blockwise_matmul`)."""
    f = lambda x, w, s: layers.fp8_linear(x, w, s, "ue8m0", jnp.bfloat16)  # noqa: E731
    args = (S((8, 256), jnp.bfloat16), S((384, 256), E4M3), S((3, 2), jnp.float32))

    def dots(text):
        return [line for line in text.splitlines() if "stablehlo.dot_general" in line]

    cpu = dots(jax.jit(f).lower(*args).as_text())
    assert len(cpu) == 1 and "xf32>, tensor<384x256xf32>" in cpu[0] and _contraction(cpu[0]) == 256
    gpu = dots(lower_for_gpu(f, *args))
    assert [_contraction(d) for d in gpu if "f8E4M3FN" in d] == [128], gpu
