#!/usr/bin/env bash
# CPU variant of per_node_no_ssh.sh: NNODES "nodes" x NPROC_PER_NODE ranks on this machine,
# talking over loopback (127.0.0.1); each node is a separate DeepSpeed launcher with --no_ssh.
#   launch/cpu_per_node_no_ssh.sh                   # 2 nodes x 1 rank, cage_w4a4.yaml
#   NNODES=2 NPROC_PER_NODE=1 launch/cpu_per_node_no_ssh.sh --config ... [k=v ...]
# Env: NNODES (2), NPROC_PER_NODE (1), MASTER_PORT (29500), OMP_NUM_THREADS (1),
# CAGE_SKIP_CHECK=1, CAGE_TRAIN_MODULE.
set -euo pipefail
source "$(dirname "$0")/common.sh"
(( $# )) || set -- --config "$CAGE_ROOT/configs/experiments/cage_w4a4.yaml"
cage_usage_if_asked "$@"
cage_cpu_env
NNODES="${NNODES:-2}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
cage_count_or_exit NNODES "$NNODES"
cage_count_or_exit NPROC_PER_NODE "$NPROC_PER_NODE"
HOSTFILE="$(mktemp -t cage-hostfile.XXXXXX)"
trap 'rm -f "$HOSTFILE"' EXIT
for (( i = 0; i < NNODES; i++ )); do echo "node$i slots=$NPROC_PER_NODE"; done > "$HOSTFILE"
cage_preflight "$(( NNODES * NPROC_PER_NODE ))" "$@"
export HOSTFILE MASTER_ADDR=127.0.0.1 MASTER_PORT CAGE_TRAIN_MODULE CAGE_SKIP_CHECK=1
cage_run_local_nodes "$NNODES" "$(dirname "$0")/per_node_no_ssh.sh" "$@"
