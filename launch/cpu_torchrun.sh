#!/usr/bin/env bash
# CPU variant of torchrun.sh: NNODES "nodes" (each its own torchrun, on loopback) x
# NPROC_PER_NODE ranks on this machine, gloo.
#   launch/cpu_torchrun.sh                          # 1 node x 2 ranks, cage_w4a4.yaml
#   NNODES=2 NPROC_PER_NODE=1 launch/cpu_torchrun.sh --config ... [k=v ...]
# Env: NNODES (1), NPROC_PER_NODE (2), MASTER_PORT (29500), OMP_NUM_THREADS (1),
# CAGE_SKIP_CHECK=1, CAGE_TRAIN_MODULE.
set -euo pipefail
source "$(dirname "$0")/common.sh"
(( $# )) || set -- --config "$CAGE_ROOT/configs/experiments/cage_w4a4.yaml"
cage_usage_if_asked "$@"
cage_cpu_env
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
cage_count_or_exit NNODES "$NNODES"
cage_count_or_exit NPROC_PER_NODE "$NPROC_PER_NODE"
cage_preflight "$(( NNODES * NPROC_PER_NODE ))" "$@"
export NNODES NPROC_PER_NODE MASTER_ADDR=127.0.0.1 MASTER_PORT CAGE_TRAIN_MODULE CAGE_SKIP_CHECK=1
cage_run_local_nodes "$NNODES" "$(dirname "$0")/torchrun.sh" "$@"
