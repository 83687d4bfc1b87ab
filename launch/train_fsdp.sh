#!/usr/bin/env bash
# cage-train on FSDP2 (backend=fsdp2) under torchrun; one node, or run on every node.
#   launch/train_fsdp.sh --config configs/experiments/cage_w4a4.yaml [k=v ...]
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/train_fsdp.sh --config ... [k=v ...]
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/train_fsdp.sh --config ... [k=v ...]
# Appends backend=fsdp2 to the overrides and runs launch/torchrun.sh (pre-flight check
# included). Env: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (default: every GPU
# nvidia-smi lists; 2 on a machine without GPUs, which runs on CPU with gloo),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), CAGE_SKIP_CHECK=1, CAGE_TRAIN_MODULE.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cage_usage_if_asked "$@"
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
  NPROC_PER_NODE="${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}"
else
  cage_cpu_env
  NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
fi
export NPROC_PER_NODE
exec "$(dirname "$0")/torchrun.sh" "$@" backend=fsdp2
