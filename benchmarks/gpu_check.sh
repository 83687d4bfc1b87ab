#!/usr/bin/env bash
# GPU correctness: the kernel tests of tests/kernels COMPILED on a CUDA GPU (no interpreter),
# every kernel against its torch twin on the CPU (same assertions as the interpreter run).
#
#   bash benchmarks/gpu_check.sh                    # from the repository root, one CUDA GPU
#   bash benchmarks/gpu_check.sh -k cage_adamw      # extra pytest arguments pass through
#
# With the benchmark, as one device command (on an H200, 2026-11-27: the tests took 40 s over
# 8 xdist workers, first-use compiles included; gpu_kernels.py about a minute):
#   timeout 240 bash benchmarks/gpu_check.sh; timeout 220 python benchmarks/gpu_kernels.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
unset TRITON_INTERPRET CAGE_TRITON_INTERPRET
export CAGE_KERNELS_DEVICE=cuda
"$PYTHON" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
# First-use compiles dominate: spread the tests over pytest-xdist workers where it is installed.
WORKERS=()
"$PYTHON" -c "import xdist" 2>/dev/null && WORKERS=(-n "${CAGE_GPU_CHECK_WORKERS:-8}")
exec "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels -o addopts="" "${WORKERS[@]}" "$@"
