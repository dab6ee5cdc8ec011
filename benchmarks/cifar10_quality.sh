#!/usr/bin/env bash
# CIFAR-10 quality benchmark: teacher, one-step distillation and their FDs, through the real CLIs, in 9 minutes
# on one H100 / H200 with no network access.
#
#   bash benchmarks/cifar10_quality.sh                              # device cuda, assets/ -> outputs/cifar10_quality/results
#   bash benchmarks/cifar10_quality.sh --out results/q1 --budget 540
#   bash benchmarks/cifar10_quality.sh --device cpu                 # the same steps at tiny sizes (a few minutes on 2 cores)
#
# Needs, in --assets DIR (default assets/ in the checkout, git-ignored):
#   cifar10-jpeg.tar.gz          cifar10-jpeg/train/<class>/*.jpg (50,000) and cifar10-jpeg/test/<class>/*.jpg (10,000)
#   cifar10-featnet-dev.ts.pt    TorchScript feature network: float [B,3,32,32] in [0,255] -> features [B,D]
#
# Steps (each one timed and recorded, ok / FAILED / skipped):
#   1. extract    the tarball into --work/data (kept, and not extracted again while the tarball is unchanged)
#   2. reference  python evaluate.py write_reference=... reference.name=folder reference.folder=<data>/<split>
#                 with the feature network (resize=none): the statistics the three FDs are measured against
#   3. teacher    python train.py stage=teacher data=image_folder data.root=<data>/train arch=simple_unet ...
#                 class-conditional EDM teacher, precision=bf16, the dataset cached on the GPU
#   4. fd_teacher_35nfe, fd_teacher_1nfe
#                 python evaluate.py checkpoint=<teacher> sampler.steps=18 (35 NFE), then sampler.steps=1 (1 NFE)
#   5. distill    python train.py stage=distill teacher_checkpoint=<teacher> "${DISTILL[@]}" ...   (one step)
#   6. fd_student python evaluate.py checkpoint=<generator>
# Each FD is "FD (<feature network file>)" from --samples generated images (classes round-robin) against the
# CIFAR-10 --reference split (train, the papers' convention, on a GPU; test, 10,000 images, on the CPU).
#
# Time budget (--budget, default 540 s, all steps together, 10 s kept for the summary): the two training runs get
# the time the other steps leave (the teacher --teacher-share of it, 60 s held back per FD step; the distillation
# all but the student's FD step, measured when it starts). A run that reaches its allotted time is stopped with
# SIGTERM: it finishes its current step, writes <stage>_<step>.pt and the next step goes on from that checkpoint;
# the summary says "time budget: stopped after N s" and the steps done. Steps that no longer fit are skipped.
# --teacher-steps / --distill-steps are the upper limits (20,000 each on a GPU).
#
# Writes into --out: summary.json and summary.txt (every step's status and seconds, the three FDs with their
# bootstrap std, images/s of teacher training, distillation and each sampling run, the settings), logs/<step>.log,
# metrics_{teacher,distill}.jsonl and results_<fd step>.json. Data, statistics and checkpoints stay in --work
# (default outputs/cifar10_quality/work, git-ignored). Exit status 0 when every step passed, 1 otherwise.
set -uo pipefail

# Distillation: the preset and its overrides (device, sizes, steps, logging and evaluation keys are added below).
# FastGen's CIFAR-10 recipe, shortened for a few minutes of training:
DISTILL=(
  experiment=fastgen_dmd2_cifar10  # lr 1e-4, ratio 5 (alternate), GAN heads on the teacher's features, clip 10
  global_batch_size=null           # one process, one round per step (the preset's 2048 = 8 rounds of 256)
  precision=bf16                   # the preset trains in fp32
  generator_ema_warmup=true        # EMA decay min(d, (1+n)/(10+n)): a few hundred generator updates are too few
                                   # for the preset's 0.9995 from the first update on
  'generator_ema_decays=[]'        # the preset's two extra EMAs are not measured here
)
# Teacher: overrides of stage=teacher's defaults for a run of a few minutes (arch, batch and steps are set below)
TEACHER=(lr=2e-4 warmup_steps=100 precision=bf16)

DEVICE=cuda
ASSETS=""
OUT=""
WORK=""
BUDGET=540
SAMPLES=""
REFERENCE=""
TEACHER_STEPS=""
DISTILL_STEPS=""
TEACHER_SHARE=50   # percent of the training time
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --assets) ASSETS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --samples) SAMPLES="$2"; shift 2 ;;
    --reference) REFERENCE="$2"; shift 2 ;;
    --teacher-steps) TEACHER_STEPS="$2"; shift 2 ;;
    --distill-steps) DISTILL_STEPS="$2"; shift 2 ;;
    --teacher-share) TEACHER_SHARE="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
               echo "Options: --device cuda|cpu  --assets DIR  --out DIR  --work DIR  --budget SECONDS  --samples N"
               echo "         --reference train|test  --teacher-steps N  --distill-steps N  --teacher-share PERCENT"
               exit 0 ;;
    *) echo "cifar10_quality.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
ASSETS="${ASSETS:-assets}"
OUT="${OUT:-outputs/cifar10_quality/results}"
WORK="${WORK:-outputs/cifar10_quality/work}"   # outputs/ is git-ignored
if [[ ! -d "$ASSETS" ]]; then echo "cifar10_quality.sh: no assets folder $ASSETS (--assets DIR)" >&2; exit 3; fi
mkdir -p "$OUT/logs" "$WORK"
ASSETS="$(cd "$ASSETS" && pwd)"
OUT="$(cd "$OUT" && pwd)"
WORK="$(cd "$WORK" && pwd)"
TARBALL="$ASSETS/cifar10-jpeg.tar.gz"
FEATNET="$ASSETS/cifar10-featnet-dev.ts.pt"
for f in "$TARBALL" "$FEATNET"; do
  [[ -f "$f" ]] || { echo "cifar10_quality.sh: missing $f" >&2; exit 3; }
done
PY="${PYTHON:-python}"
export WANDB_MODE=disabled WANDB_SILENT=true HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1

if [[ "$DEVICE" == cpu ]]; then
  # tiny sizes: the same steps in a few minutes on two cores
  TEACHER_ARCH=simple_unet_tiny; TEACHER_BATCH=8; DISTILL_BATCH=8; WORKERS=0; LOG=5; EVAL_BATCH=100
  TEACHER_STEPS="${TEACHER_STEPS:-40}"; DISTILL_STEPS="${DISTILL_STEPS:-10}"; SAMPLES="${SAMPLES:-200}"
  REFERENCE="${REFERENCE:-test}"
  SIZES=('gan_feature_resolutions=[32]')  # the tiny network's encoder has outputs at 32 px only
  PERF=(perf.cache_dataset=false)   # a few hundred images are read: no one-time decode of the whole set
  EVAL_RESERVE=60                   # seconds held back for one FD step when the budget is shared out
  # one OpenMP thread: on a small shared CPU torch's default of one per core is often far slower
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  # 21M-parameter SimpleUNet at batch 256 in bf16; the whole training set decoded once into GPU memory
  TEACHER_ARCH=simple_unet; TEACHER_BATCH=256; DISTILL_BATCH=256; WORKERS=4; LOG=50; EVAL_BATCH=1000
  TEACHER_STEPS="${TEACHER_STEPS:-20000}"; DISTILL_STEPS="${DISTILL_STEPS:-20000}"; SAMPLES="${SAMPLES:-10000}"
  REFERENCE="${REFERENCE:-train}"
  SIZES=()
  PERF=(perf.cache_dataset=auto)    # tf32, cuDNN autotuning and fused AdamW are on by default; compile is not
                                    # (its compilation would take a large part of the budget)
  EVAL_RESERVE=60
fi
[[ "$REFERENCE" == train || "$REFERENCE" == test ]] || { echo "--reference train|test" >&2; exit 2; }

DATA="$WORK/data/cifar10-jpeg"
REF_NPZ="$WORK/ref_${REFERENCE}_$(basename "$FEATNET" .ts.pt).npz"
COMMON=(logger=none "device=$DEVICE" save_every=1000000 sample_every=0 eval_every=0 "log_every=$LOG"
        samples_per_class=4 data=image_folder "data.root=$DATA/train" "data.num_workers=$WORKERS" "${PERF[@]}")
FD_KEYS=(logger=none "device=$DEVICE" "num_samples=$SAMPLES" "batch_size=$EVAL_BATCH" "num_workers=$WORKERS"
         feature_network.name=torchscript "feature_network.path=$FEATNET" feature_network.resize=none)

START=$SECONDS
FAILED=0
MARGIN=10
STAGES="$OUT/stages.tsv"
: > "$STAGES"
: > "$OUT/summary.txt"
left() { echo $(( BUDGET - MARGIN - (SECONDS - START) )); }   # MARGIN: the summary, a run's last step
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STAGES"; }

# step NAME LIMIT CMD... : run CMD with a timeout of LIMIT seconds cut to the budget left; log, time and record it.
# A training run (SIGTERM_OK=1) stopped at its limit writes a checkpoint and exits 143: that counts as done.
SIGTERM_OK=0
step() {
  local name="$1" limit="$2"; shift 2
  LAST_SECONDS=0
  local rest; rest=$(left)
  (( limit > rest )) && limit=$rest
  if (( limit < 20 )); then
    record "$name" skipped 0 "time budget of ${BUDGET}s spent"; FAILED=1
    echo ">>> [$name] skipped (time budget spent)" >&2; return 1
  fi
  local t0=$SECONDS rc
  echo ">>> [$name] $* (timeout ${limit}s)" >&2
  # --foreground: the signal reaches the script alone, not its data-loader workers, so a training run can finish its
  # step and save (exit 143, kept by --preserve-status); whatever still runs 30 s later is killed (137)
  timeout --foreground --preserve-status -s TERM --kill-after=30 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  LAST_SECONDS=$(( SECONDS - t0 ))
  if (( rc == 0 )); then
    record "$name" ok $(( SECONDS - t0 )) ""
  elif (( rc == 143 && SIGTERM_OK )) && grep -q "SIGTERM received: stopped at step" "$OUT/logs/$name.log"; then
    record "$name" ok $(( SECONDS - t0 )) "time budget: stopped after ${limit}s"
  else
    local why="exit $rc"
    (( rc == 124 || rc == 137 || rc == 143 )) && why="exit $rc (timeout ${limit}s)"
    record "$name" FAILED $(( SECONDS - t0 )) "$why; see logs/$name.log"
    tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /' >&2
    FAILED=1; return 1
  fi
  return 0
}

# the newest checkpoint of a run: <stage>_final.pt, else the one written when it was stopped
checkpoint_of() {
  local dir="$1" stage="$2"
  if [[ -f "$dir/${stage}_final.pt" ]]; then echo "$dir/${stage}_final.pt"; return; fi
  ls "$dir/${stage}"_[0-9]*.pt 2>/dev/null | sort | tail -n 1
}

# an evaluate.py run: its results.json goes to --out
fd_step() {
  local name="$1" ckpt="$2"; shift 2
  rm -rf "$WORK/$name"
  if [[ -z "$ckpt" || ! -f "$REF_NPZ" ]]; then
    record "$name" skipped 0 "no checkpoint or no reference statistics"; FAILED=1; return 1
  fi
  step "$name" 300 "$PY" evaluate.py "checkpoint=$ckpt" "${FD_KEYS[@]}" reference.name=npz "reference.path=$REF_NPZ" \
    "$@" "output_dir=$WORK/$name" "hydra.run.dir=$WORK/$name/hydra" || return 1
  cp "$WORK/$name/results.json" "$OUT/results_$name.json"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "host: $(uname -srm)"; echo "device: $DEVICE"
  echo "cpus: $(getconf _NPROCESSORS_ONLN); load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null); OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
  "$PY" -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (modified)')"
} > "$OUT/machine.txt"
echo ">>> cifar10_quality on $DEVICE, budget ${BUDGET}s; results in $OUT, data and checkpoints in $WORK" >&2

# 1. the data, extracted once per tarball (size and modification time)
STAMP="$(stat -c '%s %Y' "$TARBALL")"
if [[ -f "$WORK/data/.extracted" && "$(cat "$WORK/data/.extracted")" == "$STAMP" && -d "$DATA/train" ]]; then
  record extract ok 0 "already extracted"
else
  rm -rf "$WORK/data"; mkdir -p "$WORK/data"
  step extract 120 tar -xzf "$TARBALL" -C "$WORK/data" && echo "$STAMP" > "$WORK/data/.extracted"
fi

# 2. reference statistics of the chosen split, with the feature network
rm -f "$REF_NPZ"
step reference 150 "$PY" evaluate.py logger=none "device=$DEVICE" "batch_size=$EVAL_BATCH" "num_workers=$WORKERS" \
  feature_network.name=torchscript "feature_network.path=$FEATNET" feature_network.resize=none \
  reference.name=folder "reference.folder=$DATA/$REFERENCE" "write_reference=$REF_NPZ" \
  "output_dir=$WORK/reference" "hydra.run.dir=$WORK/reference/hydra"

# 3. teacher: its share of what the budget leaves after the three FD steps and the distillation's start
rm -rf "$WORK/teacher" "$WORK/distill"
TRAIN_TIME=$(( $(left) - 3 * EVAL_RESERVE ))
SIGTERM_OK=1
step teacher $(( TRAIN_TIME * TEACHER_SHARE / 100 )) "$PY" train.py stage=teacher "arch=$TEACHER_ARCH" "${COMMON[@]}" \
  "batch_size=$TEACHER_BATCH" "max_steps=$TEACHER_STEPS" num_epochs=100000 "${TEACHER[@]}" \
  "output_dir=$WORK/teacher" "hydra.run.dir=$WORK/teacher/hydra"
SIGTERM_OK=0
[[ -f "$WORK/teacher/metrics.jsonl" ]] && cp "$WORK/teacher/metrics.jsonl" "$OUT/metrics_teacher.jsonl"
TEACHER="$(checkpoint_of "$WORK/teacher" teacher)"

# 4. the teacher at 35 and at 1 network evaluations
fd_step fd_teacher_35nfe "$TEACHER" sampler.steps=18
fd_step fd_teacher_1nfe "$TEACHER" sampler.steps=1
# the student's FD step costs what the teacher's 1-NFE one did (start-up, features, one network pass per sample):
# hold back that with room to spare, at most EVAL_RESERVE
STUDENT_RESERVE=$(( LAST_SECONDS > 0 ? LAST_SECONDS * 3 / 2 + 15 : EVAL_RESERVE ))
(( STUDENT_RESERVE > EVAL_RESERVE )) && STUDENT_RESERVE=$EVAL_RESERVE

# 5. one-step distillation: everything left but the student's FD step
if [[ -n "$TEACHER" ]]; then
  SIGTERM_OK=1
  step distill $(( $(left) - STUDENT_RESERVE )) "$PY" train.py stage=distill "teacher_checkpoint=$TEACHER" "${DISTILL[@]}" \
    "${SIZES[@]}" "${COMMON[@]}" "batch_size=$DISTILL_BATCH" "max_steps=$DISTILL_STEPS" num_epochs=100000 \
    "output_dir=$WORK/distill" "hydra.run.dir=$WORK/distill/hydra"
  SIGTERM_OK=0
else
  record distill skipped 0 "no teacher checkpoint"; FAILED=1
fi
[[ -f "$WORK/distill/metrics.jsonl" ]] && cp "$WORK/distill/metrics.jsonl" "$OUT/metrics_distill.jsonl"

# 6. the student
fd_step fd_student "$(checkpoint_of "$WORK/distill" dmd2)"

record total "$( ((FAILED)) && echo FAILED || echo ok)" $(( SECONDS - START )) "budget ${BUDGET}s"
"$PY" benchmarks/cifar10_quality_summary.py --out "$OUT" --device "$DEVICE" --budget "$BUDGET" \
  --samples "$SAMPLES" --reference "$REFERENCE" --featnet "$FEATNET" --teacher-arch "$TEACHER_ARCH" \
  --teacher-batch "$TEACHER_BATCH" --distill-batch "$DISTILL_BATCH" --teacher-steps "$TEACHER_STEPS" \
  --distill-steps "$DISTILL_STEPS" --distill "${DISTILL[*]}" \
  --reference-stats "$REF_NPZ" || FAILED=1
cat "$OUT/summary.txt"
exit $FAILED
