#!/usr/bin/env bash
# SLURM: one torchrun per node (srun), NPROC_PER_NODE ranks each; submit from the repo root.
#   sbatch --nodes 2 launch/slurm_sbatch.sh --config configs/experiments/cage_w4a4.yaml model.preset=8b
#   sbatch --nodes 4 --gpus-per-node 8 launch/slurm_sbatch.sh --config ... [k=v ...]
# The batch step re-runs this script on every node (CAGE_SLURM_STEP=1); node 0 of the job's
# node list is the rendezvous host. Env: NPROC_PER_NODE (default: SLURM_GPUS_ON_NODE, else
# every GPU nvidia-smi lists), MASTER_PORT (29500), CAGE_SKIP_CHECK=1, CAGE_TRAIN_MODULE;
# export DS_ACCELERATOR=cpu for CPU nodes. Without SLURM: launch/cpu_slurm_local.sh.
#SBATCH --job-name=cage-train
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=cage-train-%j.out
set -euo pipefail
SCRIPT="${SLURM_SUBMIT_DIR:-$(pwd)}/launch/slurm_sbatch.sh"
source "$(dirname "$SCRIPT")/common.sh"
cage_usage_if_asked "$@"
if [[ "${CAGE_SLURM_STEP:-0}" != "1" ]]; then  # the batch script: fan out, one task per node
  export CAGE_SLURM_STEP=1
  exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$SCRIPT" "$@"
fi
: "${SLURM_NNODES:?not inside a SLURM job}" "${SLURM_NODEID:?not inside a SLURM job}"
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
if [[ "${DS_ACCELERATOR:-}" == "cpu" ]]; then
  cage_cpu_env
  NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
else
  NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}}"
fi
export NNODES="$SLURM_NNODES" NODE_RANK="$SLURM_NODEID" NPROC_PER_NODE MASTER_ADDR MASTER_PORT
exec "$CAGE_ROOT/launch/torchrun.sh" "$@"
