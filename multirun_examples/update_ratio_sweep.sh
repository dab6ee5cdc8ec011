#!/usr/bin/env bash
# Two time-scale update rule: generator every 1, 5 (official ImageNet / FastGen CIFAR-10) or 10 (spec) steps.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep="${SWEEP_DIR:-multirun/update_ratio/$(date +%Y-%m-%d_%H-%M-%S)}"  # every job below it
python train.py -m stage=distill dfake_gen_update_ratio=1,5,10 hydra.sweep.dir="$sweep" "$@"
echo "Compare the runs: python -m dmd2.compare $sweep --out $sweep/compare"
