#!/usr/bin/env bash
# Teacher learning rate x batch size: 6 jobs. Compare train/loss curves and the EMA sample grids.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep="${SWEEP_DIR:-multirun/teacher_lr/$(date +%Y-%m-%d_%H-%M-%S)}"  # every job below it
python train.py -m stage=teacher lr=1e-4,2e-4,5e-4 batch_size=128,256 hydra.sweep.dir="$sweep" "$@"
echo "Compare the runs: python -m dmd2.compare $sweep --out $sweep/compare"
