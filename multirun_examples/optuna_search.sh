#!/usr/bin/env bash
# Bayesian search (TPE) over the two learning rates and the update ratio: conf/hparams_search/distill_optuna.yaml,
# 20 trials, minimising each trial's best in-training FID / FD (pass eval_every and, offline, eval.* keys).
# Needs: pip install -e ".[sweep]"
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py hparams_search=distill_optuna "$@"
