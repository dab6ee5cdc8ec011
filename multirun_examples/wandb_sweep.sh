#!/usr/bin/env bash
# W&B sweep with Hyperband early termination: multirun_examples/wandb_sweep.yaml (known-answer distillation, CPU).
# Needs W&B online (`wandb login`). Trains the mixture teacher once, creates the sweep, then runs COUNT (12) trials
# in this shell; more agents (other shells or machines) may join with the printed `wandb agent` command.
set -euo pipefail
cd "$(dirname "$0")/.."
teacher=runs/mixture/teacher/teacher_final.pt
if [ ! -f "$teacher" ]; then
  python train.py experiment=mixture_teacher logger=none output_dir="$(dirname "$teacher")"
fi
created=$(wandb sweep --project "${WANDB_PROJECT:-dmd2-mixture}" multirun_examples/wandb_sweep.yaml 2>&1 | tee /dev/stderr)
sweep_id=$(printf '%s\n' "$created" | sed -n 's/.*wandb agent //p' | tail -n 1)
wandb agent --count "${COUNT:-12}" "$sweep_id"
echo "Compare the runs: python -m dmd2.compare runs/mixture/wandb_sweep --out runs/mixture/wandb_sweep/compare"
