#!/usr/bin/env bash
# CIFAR-10 at CPU scale: does a change of the distillation settings carry from the known-answer mixture to images?
# One teacher (SimpleUNet, 1.35M parameters, 3 epochs at batch 128), then one-step distillations of it (2 epochs
# by default at batch 128, ratio 5, learning rate 1e-4 for both networks) that differ only in the remedies of the
# mixture preset, and the FD of 5,000 samples of each against the 10,000 test images:
#   official   constant learning rate after a 100-step warm-up, no generator EMA (the paper's schedule)
#   remedies   generator_ema_decay=0.99 generator_ema_warmup=true lr_decay=cosine (experiment=mixture_dmd2's)
#   ema        generator_ema_decay=0.99 generator_ema_warmup=true, constant rate (the EMA without the decay;
#              only when --variants names it)
#
#   bash benchmarks/cifar10_cpu_row.sh --data DIR --featnet FILE [--out DIR] [--seed N] [--teacher CKPT]
#                                      [--distill-epochs N (default 2)] [--teacher-seed N (default: --seed)]
#                                      [--variants LIST (default official,remedies; any of official,remedies,ema)]
#
# --data: the JPEG copy extracted (DIR/train/<class>/*.jpg, DIR/test/<class>/*.jpg); --featnet: a TorchScript
# feature network (float [B,3,32,32] in [0,255] -> [B,D]); FDs are named "FD (<its file>)". --teacher reuses a
# teacher checkpoint; an FD whose result in --out measured the same checkpoint with the same seed is not redone.
# --teacher-seed: the sampling seed of the teacher's two FDs, so that the rows of other student seeds can reuse one
# teacher measurement (copy its fd_teacher_* folders into --out; the 35-NFE FD is the row's longest step).
# Each run is a real train.py / evaluate.py command, logged in --out/logs; --out/summary.txt has the table. The
# distillations run side by side with one OpenMP thread each, the teacher's FDs beside them; the teacher and
# the students' FDs use every core.
# Cost on 2 CPU cores, measured on two hosts of that size (a slower one / a faster one): teacher 27 / 20 min (1.4 /
# 0.9 s/step); then the two distillations and the teacher's FDs side by side, 5.4 / 1.25 s/step per distillation
# (35 / 8 min per epoch; the 35-NFE FD 32 min beside them on the slower host); students' FDs 1-3 min each. Each
# further variant is one more single-thread run on the same cores (slower host: two distillations beside two other
# single-thread runs, 6.5-8 s/step each).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA=""; FEATNET=""; OUT="outputs/cifar10_cpu_row"; SEED=0; TEACHER=""; EPOCHS=2; TSEED=""; VARIANTS="official,remedies"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --featnet) FEATNET="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --teacher) TEACHER="$2"; shift 2 ;;
    --distill-epochs) EPOCHS="$2"; shift 2 ;;
    --teacher-seed) TSEED="$2"; shift 2 ;;
    --variants) VARIANTS="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "cifar10_cpu_row.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -d "$DATA/train" && -d "$DATA/test" ]] || { echo "cifar10_cpu_row.sh: --data must hold train/ and test/ (got '$DATA')" >&2; exit 2; }
[[ -f "$FEATNET" ]] || { echo "cifar10_cpu_row.sh: --featnet must name a TorchScript file (got '$FEATNET')" >&2; exit 2; }
[[ "$EPOCHS" =~ ^[1-9][0-9]*$ ]] || { echo "cifar10_cpu_row.sh: --distill-epochs must be a positive integer (got '$EPOCHS')" >&2; exit 2; }
TSEED="${TSEED:-$SEED}"
[[ "$TSEED" =~ ^[0-9]+$ ]] || { echo "cifar10_cpu_row.sh: --teacher-seed must be a non-negative integer (got '$TSEED')" >&2; exit 2; }
[[ "$VARIANTS" =~ ^(official|remedies|ema)(,(official|remedies|ema))*$ ]] || { echo "cifar10_cpu_row.sh: --variants must be a comma-separated list of official, remedies, ema (got '$VARIANTS')" >&2; exit 2; }
IFS=, read -r -a VLIST <<< "$VARIANTS"
[[ -z "$TEACHER" || -f "$TEACHER" ]] || { echo "cifar10_cpu_row.sh: --teacher $TEACHER does not exist" >&2; exit 2; }
abspath() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
DATA="$(cd "$DATA" && pwd)"; FEATNET="$(abspath "$FEATNET")"; [[ -z "$TEACHER" ]] || TEACHER="$(abspath "$TEACHER")"
mkdir -p "$OUT/logs"; OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export WANDB_MODE=disabled WANDB_SILENT=true PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
# the feature network's head classifies the samples (class entropy, label agreement); the test split's statistics
# and features are computed once and cached (precision / recall / density / coverage need the features)
FEAT=(feature_network.name=torchscript "feature_network.path=$FEATNET" feature_network.resize=none
      feature_network.classifier=net.head reference.name=folder "reference.folder=$DATA/test")
COMMON=(logger=none data=image_folder "data.root=$DATA/train" data.num_workers=0 batch_size=128 "seed=$SEED"
        save_every=1000000 eval_every=0 sample_every=0 log_every=50)

run() { local name="$1"; shift; echo ">>> [$name] $*" >&2; "$@" > "$OUT/logs/$name.log" 2>&1; }
fd() {  # fd NAME CHECKPOINT SEED [overrides]: FD of 5,000 samples (classes round-robin) against the test split
  local name="$1" ckpt="$2" seed="$3"; shift 3
  # an earlier result is kept only when it measured this checkpoint with this seed (a rerun with --teacher)
  "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1]))[0]; sys.exit(not (r["checkpoint"] == sys.argv[2] and r["seed"] == int(sys.argv[3])))' \
    "$OUT/$name/results.json" "$ckpt" "$seed" 2> /dev/null && return 0
  run "$name" "$PY" evaluate.py logger=none "checkpoint=$ckpt" num_samples=5000 batch_size=250 "${FEAT[@]}" \
    "seed=$seed" "$@" "output_dir=$OUT/$name" "hydra.run.dir=$OUT/$name/hydra"
}

if [[ -z "$TEACHER" ]]; then
  run teacher "$PY" train.py stage=teacher arch=simple_unet_small "${COMMON[@]}" num_epochs=3 lr=2e-4 warmup_steps=100 \
    "output_dir=$OUT/teacher" "hydra.run.dir=$OUT/teacher/hydra"
  TEACHER="$OUT/teacher/teacher_final.pt"
fi
DISTILL=(stage=distill "teacher_checkpoint=$TEACHER" "${COMMON[@]}" "num_epochs=$EPOCHS" generator_lr=1e-4 guidance_lr=1e-4
         dfake_gen_update_ratio=5 warmup_steps=100)
declare -A VARIANT=(
  [official]="lr_decay=none"
  [remedies]="generator_ema_decay=0.99 generator_ema_warmup=true lr_decay=cosine"
  [ema]="generator_ema_decay=0.99 generator_ema_warmup=true lr_decay=none"
)
pids=()
trap 'kill "${pids[@]}" 2> /dev/null' EXIT   # an error or a stop here also stops the other distillations
for v in "${VLIST[@]}"; do
  # shellcheck disable=SC2086  # the variant's overrides are words
  OMP_NUM_THREADS=1 run "distill_$v" "$PY" train.py "${DISTILL[@]}" ${VARIANT[$v]} \
    "output_dir=$OUT/distill_$v" "hydra.run.dir=$OUT/distill_$v/hydra" &
  pids+=($!)
done
OMP_NUM_THREADS=1 fd fd_teacher_35nfe "$TEACHER" "$TSEED" sampler.steps=18   # beside the distillations, one thread each
OMP_NUM_THREADS=1 fd fd_teacher_1nfe "$TEACHER" "$TSEED" sampler.steps=1
i=0
for v in "${VLIST[@]}"; do
  wait "${pids[$i]}" || { echo "cifar10_cpu_row.sh: distill_$v failed; see $OUT/logs/distill_$v.log" >&2
                          tail -n 15 "$OUT/logs/distill_$v.log" >&2; exit 1; }
  i=$((i + 1))
done
trap - EXIT
for v in "${VLIST[@]}"; do fd "fd_student_$v" "$OUT/distill_$v/generator" "$SEED"; done

"$PY" - "$OUT" "$(basename "$FEATNET")" "$SEED" "$TSEED" "${VLIST[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, net, seed, tseed, variants = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
rows = [("teacher, 35 NFE", "fd_teacher_35nfe"), ("teacher, 1 NFE", "fd_teacher_1nfe")]
rows += [(f"student, {v}", f"fd_student_{v}") for v in variants]
lines = [f"CIFAR-10 at CPU scale, seed {seed} (teacher's FDs: seed {tseed}): FD ({net}) of 5,000 samples against the 10,000 test images",
         "| model | FD | bootstrap sd | precision | recall | coverage | label agreement |", "|---|---|---|---|---|---|---|"]
for label, name in rows:
    r = json.loads((out / name / "results.json").read_text())[0]
    p, c = r.get("prdc") or {}, r.get("classes") or {}
    cells = [p.get("precision"), p.get("recall"), p.get("coverage"), c.get("label_agreement")]
    std = "-" if r.get("std") is None else f"{r['std']:.2f}"
    lines.append(f"| {label} | {r['value']:.2f} | {std} | "
                 + " | ".join("-" if x is None else f"{x:.3f}" for x in cells) + " |")
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
