#!/usr/bin/env bash
# torchrun instead of the DeepSpeed launcher; one node, or run on every node with its rank.
#   NPROC_PER_NODE=8 launch/torchrun.sh --config configs/experiments/cage_w4a4.yaml
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh --config ... [k=v ...]
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh --config ... [k=v ...]
# Env: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (default: every GPU nvidia-smi lists),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), CAGE_SKIP_CHECK=1, CAGE_TRAIN_MODULE.
# CPU variant: launch/cpu_torchrun.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cage_usage_if_asked "$@"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}"
cage_count_or_exit NNODES "$NNODES"
cage_count_or_exit NPROC_PER_NODE "$NPROC_PER_NODE"
cage_preflight "$(( NNODES * NPROC_PER_NODE ))" "$@"
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT" \
  -m "$CAGE_TRAIN_MODULE" "$@"
