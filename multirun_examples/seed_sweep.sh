#!/usr/bin/env bash
# Three seeds of the same setting: how much of a difference between runs is noise.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m seed=0,1,2 "$@"
