#!/usr/bin/env bash
# Every GPU measurement the open kernel work needs, as one command for a lent device:
# compiled kernel tests, the bandwidth table, and the probe (A/B rows side by side).
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh     # ~2.3 min on an H100 before the wide-row
#                                                    # rows were added (at most 2.5 min more)
#
# Writes $OUT/gpu_kernels.csv, $OUT/gpu_check.txt, $OUT/gpu_probe.txt and
# $OUT/gpu_probe_wide.txt. The device image
# has torch and triton but no install of this project, so cage_kernels is put on the path
# through a symlink (its import name differs from the folder's, see pyproject.toml).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a writable folder}
PYTHON=${PYTHON:-python3}
site=$(mktemp -d)
ln -s "$PWD/kernels" "$site/cage_kernels"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHON
status=0
timeout 170 bash benchmarks/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.txt" | tail -3 || status=1
timeout 170 "$PYTHON" benchmarks/gpu_kernels.py --csv "$OUT/gpu_kernels.csv" || status=1
timeout 150 "$PYTHON" benchmarks/gpu_probe.py 2>&1 | tee "$OUT/gpu_probe.txt" || status=1
# Wide rows whole and in chunks (docs/benchmarks/kernel_tuning.md, section 9).
timeout 150 "$PYTHON" benchmarks/gpu_probe.py --steps-only --rows 8192 --chunks 1 2 4 \
  --caps 0 64 2>&1 | tee "$OUT/gpu_probe_wide.txt" || status=1
exit $status
