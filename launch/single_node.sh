#!/usr/bin/env bash
# One node, its GPUs, the DeepSpeed launcher.
#   launch/single_node.sh --config configs/experiments/cage_w4a4.yaml [section.key=value ...]
#   NUM_GPUS=4 launch/single_node.sh --config configs/experiments/cage_w4a4.yaml model.preset=430m
# Env: NUM_GPUS (default: every GPU nvidia-smi lists), MASTER_PORT (29500), CAGE_SKIP_CHECK=1,
# CAGE_TRAIN_MODULE (see launch/common.sh). CPU variant: launch/cpu_single_node.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cage_usage_if_asked "$@"
NUM_GPUS="${NUM_GPUS:-$(nvidia-smi -L | wc -l)}"
cage_count_or_exit NUM_GPUS "$NUM_GPUS"
cage_preflight "$NUM_GPUS" "$@"
cage_run_group deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" \
  --module "$CAGE_TRAIN_MODULE" "$@"
