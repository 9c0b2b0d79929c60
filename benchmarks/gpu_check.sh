#!/usr/bin/env bash
# The one device call of a GPU session (fits 7 minutes wall): `python3 -m benchmarks.session`
# -> $OUT (or benchmarks/out)/session.{json,md}: checks on the device, the released-width model
# (decode step, prefill chunk; attention and matmul_impl xla / pallas), the kernels at the shapes
# benchmarks.deviceless compiles, then FP8 GEMMs and sweeps while the budget lasts. BUDGET_S
# (default 390) bounds everything, compiles and input creation included; rows that do not fit are
# recorded as skipped. `timeout` stops a row that overruns its estimate (session.json then says
# "complete": false). Second-call work: benchmarks.kernels --gpu-all, benchmarks.gemm,
# benchmarks.model (see benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/out}"
BUDGET="${BUDGET_S:-390}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 timeout -s INT -k 10 \
  "$(( ${BUDGET%.*} + 20 ))" "${PYTHON:-python3}" -W ignore::DeprecationWarning \
  -m benchmarks.session --out "$DEST" --budget-s "$BUDGET" "$@"
