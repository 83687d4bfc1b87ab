#!/usr/bin/env bash
# Several nodes from one command: the DeepSpeed launcher reaches every host of HOSTFILE over
# pdsh/ssh (passwordless ssh, pdsh on this node, the same repo path and venv on every node).
#   HOSTFILE=hostfile MASTER_ADDR=node0 launch/multi_node_pdsh.sh \
#       --config configs/experiments/cage_w4a4.yaml model.preset=1b
# hostfile: one "<hostname> slots=<gpus>" line per node. Environment variables listed in
# ./.deepspeed_env (NAME=VALUE lines) are exported on every node.
# Env: HOSTFILE (required), MASTER_ADDR (default: first host), MASTER_PORT (29500),
# CAGE_SKIP_CHECK=1, CAGE_TRAIN_MODULE. CPU variant: launch/cpu_multi_node_pdsh.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cage_usage_if_asked "$@"
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (\"<host> slots=<gpus>\" lines)}"
MASTER_ADDR="${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ { print $1; exit }' "$HOSTFILE")}"
cage_preflight "$(cage_hostfile_slots "$HOSTFILE")" "$@"
cage_run_group deepspeed --hostfile "$HOSTFILE" --launcher pdsh --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" --module "$CAGE_TRAIN_MODULE" "$@"
