# Sourced by the device scripts (gpu_accuracy.sh, gpu_train_step.sh), from the repository
# root: installs the wheels carried in .whl (benchmarks/gpu_wheels.sh prepares them) into
# /tmp/site, puts that folder and cage_kernels (a symlink: its import name differs from the
# folder's) on PYTHONPATH, and sets PY. Returns non-zero when an install fails.
PY=${PYTHON:-python3}
site=/tmp/site
$PY -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || return 1
DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" \
  .whl/deepspeed-*.tar.gz || return 1
ln -sfn "$PWD/kernels" "$site/cage_kernels"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
