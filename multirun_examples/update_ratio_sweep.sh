#!/usr/bin/env bash
# Two time-scale update rule: generator every 1, 5 (official ImageNet / FastGen CIFAR-10) or 10 (spec) steps.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m stage=distill dfake_gen_update_ratio=1,5,10 "$@"
