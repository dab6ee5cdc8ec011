#!/usr/bin/env bash
# Bayesian search (TPE) over the two learning rates and the update ratio: conf/hparams_search/distill_optuna.yaml,
# 20 trials, minimising each trial's best in-training FID / FD (pass eval_every and, offline, eval.* keys).
# Needs: pip install -e ".[sweep]"
set -euo pipefail
cd "$(dirname "$0")/.."
sweep="${SWEEP_DIR:-multirun/optuna/$(date +%Y-%m-%d_%H-%M-%S)}"  # every job below it
python train.py hparams_search=distill_optuna hydra.sweep.dir="$sweep" "$@"
echo "Compare the runs: python -m dmd2.compare $sweep --out $sweep/compare"
