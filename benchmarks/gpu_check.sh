#!/usr/bin/env bash
# One device call for a GPU session: every Pallas kernel checked against its jnp reference on the
# GPU, then timed (released shapes, vs the XLA path and the dense path) plus a small block-size
# sweep. Writes $OUT (or benchmarks/out)/kernels.{json,md}. Rows still left after --budget-s
# seconds (default 360) are recorded as skipped, so the whole run stays well under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/out}"
PY="${PYTHON:-python}"
"$PY" -c "import jax; print(jax.__version__, jax.devices())"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -W ignore::DeprecationWarning \
  -m benchmarks.kernels --gpu-all --out "$DEST" --repeats 10 --budget-s "${BUDGET_S:-360}" "$@"
