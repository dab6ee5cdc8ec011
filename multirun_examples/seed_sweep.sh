#!/usr/bin/env bash
# Three seeds of the same setting: how much of a difference between runs is noise.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep="${SWEEP_DIR:-multirun/seeds/$(date +%Y-%m-%d_%H-%M-%S)}"  # every job below it
python train.py -m seed=0,1,2 hydra.sweep.dir="$sweep" "$@"
echo "Compare the runs: python -m dmd2.compare $sweep --out $sweep/compare"
