#!/usr/bin/env bash
# The learning-rate sweep on SLURM: one job per combination, one GPU each.
# Needs: pip install hydra-submitit-launcher. Edit partition / time / gpus for your cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep="${SWEEP_DIR:-multirun/slurm_lr/$(date +%Y-%m-%d_%H-%M-%S)}"  # every job below it
python train.py -m stage=distill hydra/launcher=submitit_slurm \
    hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 hydra.launcher.tasks_per_node=1 \
    hydra.launcher.cpus_per_task=8 hydra.launcher.timeout_min=1440 hydra.launcher.mem_gb=64 \
    generator_lr=2e-6,5e-6 guidance_lr=2e-6,5e-6 hydra.sweep.dir="$sweep" "$@"
echo "Compare the runs: python -m dmd2.compare $sweep --out $sweep/compare"
