"""The program lowered for a GPU is the GPU program, whatever machine lowers it.

- Kernels: `pallas_kernels.common.pallas_call` picks the compiled Triton kernel when lowering for
  CUDA and jax's interpreter elsewhere (`jax.lax.platform_dependent`), not by
  `jax.default_backend()` (which is "cpu" on a machine that compiles for an H100 without one).
- Arithmetic: in the bf16 deployment numerics, the GPU program's dots take bf16 (or e4m3)
  operands; the only float32 dots at HIGHEST precision are the release's float32 linears
  (router, lm_head, indexer weights_proj), under the `fp32_by_spec` named scope. The CPU program
  widens bf16 dots to float32 (XLA:CPU lacks some bf16 x bf16 -> f32 dots).
- FP8 dots in Triton kernels carry `maxNumImpreciseAcc = 128` (pallas_kernels/triton_fp8.py):
  what lets Triton emit Hopper's FP8 wgmma, promoted to float32 every 128 of K.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

import dsv32_jax
from dsv32_jax.checkpoint.weights import abstract_params
from dsv32_jax.engine.generate import forward
from dsv32_jax.model.quant import FP32_BY_SPEC
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
