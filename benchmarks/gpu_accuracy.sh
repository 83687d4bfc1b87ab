#!/usr/bin/env bash
# The GPU accuracy recipe as one device command: installs the carried wheels, then runs the
# configs/studies/gpu_30m.yaml study (FP, QuEST and CAGE at W4A4 and W3A3, 30M preset, one
# GPU) and copies its report to $OUT. Prepare the wheels here first (benchmarks/gpu_wheels.sh),
# then with the device tool: carry [".whl"], command
#   OUT=$OUT bash benchmarks/gpu_accuracy.sh        (timeout 600; about 8 minutes expected)
# Tracking goes to a local sqlite store only when MLflow is installed there (--no-tracking else).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a writable folder}
source benchmarks/gpu_site.sh || exit 1
tracking=(--no-tracking)
$PY -c "import mlflow" 2>/dev/null && tracking=()
$PY -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)"
timeout 560 $PY benchmarks/accuracy.py configs/studies/gpu_30m.yaml --jobs 1 "${tracking[@]}" \
  2>&1 | tee "$OUT/gpu_accuracy.txt"
status=${PIPESTATUS[0]}
cp runs/accuracy/gpu_30m/report.md runs/accuracy/gpu_30m/summary.json \
  runs/accuracy/gpu_30m/*.png "$OUT/" 2>/dev/null
exit "$status"
