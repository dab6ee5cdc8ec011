#!/usr/bin/env bash
# DMD2's GAN term: off, and on with three generator-side weights (official ImageNet 3e-3, FastGen CIFAR-10 1e-3).
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m stage=distill gan_classifier=false "$@"
python train.py -m stage=distill gan_classifier=true gen_cls_loss_weight=1e-3,3e-3,1e-2 "$@"
