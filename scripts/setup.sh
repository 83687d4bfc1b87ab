#!/usr/bin/env bash
# Idempotent environment set-up: creates ./.venv and installs cage_ds with its pinned stack.
#   bash scripts/setup.sh
# On a machine without CUDA, torch==2.13.0 (CPU) is installed first so that nothing pulls a
# multi-GB CUDA build; on a CUDA machine the torch already present (or pip's default) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CAGE_VENV:-.venv}
stamp="$VENV/.cage_ds_installed"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install -q torch
  else
    $PIP install -q torch==2.13.0
  fi
fi
# DeepSpeed 0.19.8 ships only an sdist: build it without ops, against the torch above.
if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 $PIP install -q --no-build-isolation deepspeed==0.19.8
fi
$PIP install -q -e ".[dev]"
echo "$want" > "$stamp"
