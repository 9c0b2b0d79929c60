#!/usr/bin/env bash
# One device call for a GPU session: every Pallas kernel checked against its jnp reference on the
# GPU, then timed (released shapes, vs the XLA path and the dense path) plus a small block-size
# sweep. Writes $OUT (or benchmarks/out)/kernels.{json,md}; then the FP8 GEMMs (benchmarks.gemm:
# checks, fp8_linear at the model's shapes vs XLA blockwise / bf16, one MoE layer's routed experts)
# -> gemm.{json,md}. Rows still left after BUDGET_S (default 280) / GEMM_BUDGET_S (default 120)
# seconds are recorded as skipped, so the whole run stays under about 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/out}"
PY="${PYTHON:-python}"
"$PY" -c "import jax; print(jax.__version__, jax.devices())"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -W ignore::DeprecationWarning \
  -m benchmarks.kernels --gpu-all --out "$DEST" --repeats 10 --budget-s "${BUDGET_S:-280}" "$@" || status=$?
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -W ignore::DeprecationWarning \
  -m benchmarks.gemm --out "$DEST" --repeats 10 --budget-s "${GEMM_BUDGET_S:-120}" || status=$?
exit "${status:-0}"
