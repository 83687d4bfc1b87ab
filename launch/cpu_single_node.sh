#!/usr/bin/env bash
# CPU variant of single_node.sh: NPROC ranks on this machine (gloo), DeepSpeed launcher.
#   launch/cpu_single_node.sh                       # 2 ranks, configs/experiments/cage_w4a4.yaml
#   NPROC=2 launch/cpu_single_node.sh --config configs/experiments/cage_w4a4.yaml train.steps=50
# Env: NPROC (2), MASTER_PORT (29500), OMP_NUM_THREADS (1), CAGE_SKIP_CHECK=1,
# CAGE_TRAIN_MODULE (see launch/common.sh).
set -euo pipefail
source "$(dirname "$0")/common.sh"
(( $# )) || set -- --config "$CAGE_ROOT/configs/experiments/cage_w4a4.yaml"
cage_usage_if_asked "$@"
cage_cpu_env
NPROC="${NPROC:-2}"
cage_count_or_exit NPROC "$NPROC"
cage_preflight "$NPROC" "$@"
cage_run_group deepspeed --num_accelerators "$NPROC" --master_port "$MASTER_PORT" \
  --module "$CAGE_TRAIN_MODULE" "$@"
