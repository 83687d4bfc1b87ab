#!/usr/bin/env bash
# CPU variant of multi_node_pdsh.sh. By default the hostfile is "localhost slots=NPROC": one
# host, so DeepSpeed starts the ranks locally (no pdsh/ssh needed) through the hostfile path.
# A HOSTFILE with several hosts needs pdsh and passwordless ssh to each, as on GPUs.
#   launch/cpu_multi_node_pdsh.sh                   # localhost slots=2, cage_w4a4.yaml
#   HOSTFILE=hostfile MASTER_ADDR=node0 launch/cpu_multi_node_pdsh.sh --config ... [k=v ...]
# Env: HOSTFILE, NPROC (2, for the default hostfile), MASTER_ADDR, MASTER_PORT (29500),
# OMP_NUM_THREADS (1), CAGE_SKIP_CHECK=1, CAGE_TRAIN_MODULE.
set -euo pipefail
source "$(dirname "$0")/common.sh"
(( $# )) || set -- --config "$CAGE_ROOT/configs/experiments/cage_w4a4.yaml"
cage_usage_if_asked "$@"
cage_cpu_env
if [[ -z "${HOSTFILE:-}" ]]; then
  HOSTFILE="$(mktemp -t cage-hostfile.XXXXXX)"
  trap 'rm -f "$HOSTFILE"' EXIT
  NPROC="${NPROC:-2}"
  cage_count_or_exit NPROC "$NPROC"
  echo "localhost slots=$NPROC" > "$HOSTFILE"
fi
ssh_check=()
if (( $(cage_hostfile_hosts "$HOSTFILE") > 1 )); then
  if ! command -v pdsh > /dev/null; then
    echo "launch: $HOSTFILE lists several hosts but pdsh is not installed;" \
         "use launch/cpu_per_node_no_ssh.sh instead" >&2
    exit 2
  fi
else
  ssh_check=(--no_ssh_check)  # one host: DeepSpeed runs it locally, no ssh needed
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
cage_preflight "$(cage_hostfile_slots "$HOSTFILE")" "$@"
cage_run_group deepspeed --hostfile "$HOSTFILE" --launcher pdsh "${ssh_check[@]}" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" --module "$CAGE_TRAIN_MODULE" "$@"
