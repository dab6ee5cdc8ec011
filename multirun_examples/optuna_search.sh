#!/usr/bin/env bash
# Bayesian search (TPE) over the two learning rates and the update ratio; 20 trials, minimising the
# value train.py returns. Needs: pip install hydra-optuna-sweeper
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m stage=distill hydra/sweeper=optuna \
    hydra.sweeper.direction=minimize hydra.sweeper.n_trials=20 hydra.sweeper.n_jobs=1 \
    'generator_lr=tag(log,interval(1e-6,1e-4))' 'guidance_lr=tag(log,interval(1e-6,1e-4))' \
    'dfake_gen_update_ratio=choice(1,5,10)' "$@"
