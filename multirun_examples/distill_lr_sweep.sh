#!/usr/bin/env bash
# Generator and fake-score learning rates: 9 jobs around the spec's 2e-6 (and its suggested 5e-6).
# Needs teacher_checkpoint=... (pass it as an extra argument).
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m stage=distill generator_lr=2e-6,5e-6,1e-5 guidance_lr=2e-6,5e-6,1e-5 "$@"
