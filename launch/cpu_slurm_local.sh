#!/usr/bin/env bash
# CPU variant of slurm_sbatch.sh without SLURM: runs its per-node step NNODES times on this
# machine with SLURM_NNODES / SLURM_NODEID set as srun would, rendezvous on 127.0.0.1.
#   launch/cpu_slurm_local.sh                       # 2 nodes x 1 rank, cage_w4a4.yaml
#   NNODES=2 NPROC_PER_NODE=1 launch/cpu_slurm_local.sh --config ... [k=v ...]
# Env: NNODES (2), NPROC_PER_NODE (1), MASTER_PORT (29500), CAGE_SKIP_CHECK=1,
# CAGE_TRAIN_MODULE.
set -euo pipefail
source "$(dirname "$0")/common.sh"
(( $# )) || set -- --config "$CAGE_ROOT/configs/experiments/cage_w4a4.yaml"
cage_usage_if_asked "$@"
cage_cpu_env
NNODES="${NNODES:-2}"
export NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
cage_count_or_exit NNODES "$NNODES"
cage_count_or_exit NPROC_PER_NODE "$NPROC_PER_NODE"
cage_preflight "$(( NNODES * NPROC_PER_NODE ))" "$@"
export SLURM_NNODES="$NNODES" SLURM_SUBMIT_DIR="$CAGE_ROOT" CAGE_SLURM_STEP=1
export MASTER_ADDR=127.0.0.1 MASTER_PORT CAGE_TRAIN_MODULE CAGE_SKIP_CHECK=1
node_step() { SLURM_NODEID="$NODE_RANK" bash "$CAGE_ROOT/launch/slurm_sbatch.sh" "$@"; }
cage_run_local_nodes "$NNODES" node_step "$@"
