#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow multi-process tests included.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Two pytest workers (CAGE_TEST_WORKERS), whole files each: a file's module fixtures (an MLflow
# server, a reference run) are built once; every multi-rank job has its own port and folders.
# --no-loadscope-reorder keeps tests/conftest.py's order (multi-process files first) instead of
# xdist's default of the files with the most tests first, which left the long files for last.
exec .venv/bin/python -m pytest -q -rs -n "${CAGE_TEST_WORKERS:-2}" --dist loadfile \
  --no-loadscope-reorder "$@"
