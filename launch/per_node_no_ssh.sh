#!/usr/bin/env bash
# Several nodes without ssh: run this on every node with its own NODE_RANK (e.g. from a
# cluster scheduler or by hand); the DeepSpeed launcher starts only this node's ranks.
#   node0$ NODE_RANK=0 MASTER_ADDR=node0 HOSTFILE=hostfile launch/per_node_no_ssh.sh \
#              --config configs/experiments/cage_w4a4.yaml model.preset=1b
#   node1$ NODE_RANK=1 MASTER_ADDR=node0 HOSTFILE=hostfile launch/per_node_no_ssh.sh \
#              --config configs/experiments/cage_w4a4.yaml model.preset=1b
# hostfile: the same "<hostname> slots=<gpus>" lines on every node, in node-rank order.
# Env: NODE_RANK, MASTER_ADDR, HOSTFILE (all required), MASTER_PORT (29500),
# CAGE_SKIP_CHECK=1, CAGE_TRAIN_MODULE. CPU variant: launch/cpu_per_node_no_ssh.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cage_usage_if_asked "$@"
: "${HOSTFILE:?set HOSTFILE}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
cage_preflight "$(cage_hostfile_slots "$HOSTFILE")" "$@"
cage_run_group deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module "$CAGE_TRAIN_MODULE" "$@"
