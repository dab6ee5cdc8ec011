#!/usr/bin/env bash
# Generator and fake-score learning rates: 9 jobs around the spec's 2e-6 (and its suggested 5e-6).
# Needs teacher_checkpoint=... (pass it as an extra argument).
set -euo pipefail
cd "$(dirname "$0")/.."
sweep="${SWEEP_DIR:-multirun/distill_lr/$(date +%Y-%m-%d_%H-%M-%S)}"  # every job below it
python train.py -m stage=distill generator_lr=2e-6,5e-6,1e-5 guidance_lr=2e-6,5e-6,1e-5 hydra.sweep.dir="$sweep" "$@"
echo "Compare the runs: python -m dmd2.compare $sweep --out $sweep/compare"
