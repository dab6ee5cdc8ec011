#!/usr/bin/env bash
# DMD2's GAN term: off, and on with three generator-side weights (official ImageNet 3e-3, FastGen CIFAR-10 1e-3).
set -euo pipefail
cd "$(dirname "$0")/.."
sweep="${SWEEP_DIR:-multirun/gan_weight/$(date +%Y-%m-%d_%H-%M-%S)}"  # every job below it
python train.py -m stage=distill gan_classifier=false hydra.sweep.dir="$sweep/off" "$@"
python train.py -m stage=distill gan_classifier=true gen_cls_loss_weight=1e-3,3e-3,1e-2 hydra.sweep.dir="$sweep/on" "$@"
echo "Compare the runs: python -m dmd2.compare $sweep --out $sweep/compare"
