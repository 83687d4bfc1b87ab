#!/usr/bin/env bash
# The training step end to end on one GPU (issue 15 item 3) as one device command: installs
# the carried wheels, then benchmarks/train_step.py on the 30M and the 1B preset (FP, QuEST
# W4A4 and CAGE W4A4 under DeepSpeed ZeRO-3 at world size 1, bf16, the Triton kernels and the
# fused ZeRO step), appending both tables to $OUT/train_step_gpu.md (the output also to
# $OUT/train_step_gpu.txt). Prepare the wheels here first (benchmarks/gpu_wheels.sh), then with
# the device tool: carry [".whl"], command
#   OUT=$OUT bash benchmarks/gpu_train_step.sh        (timeout 600)
# The 1B preset runs 2 sequences of 2048 tokens a step instead of its preset's 4: by estimate
# (not measured) 4 would put activations and the 128K-vocabulary logits close to 80 GB.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a writable folder}
source benchmarks/gpu_site.sh || exit 1
$PY -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)"
status=0
run() {  # <timeout s> <train_step.py arguments...>
  local limit=$1
  shift
  timeout "$limit" $PY benchmarks/train_step.py --device cuda --out "$OUT/train_step_gpu.md" "$@" \
    2>&1 | tee -a "$OUT/train_step_gpu.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
}
run 220 --preset 30m
run 300 --preset 1b --micro-batch 2
exit "$status"
