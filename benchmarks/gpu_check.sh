#!/usr/bin/env bash
# One-call check of the whole pipeline on a GPU, then the benchmark. Under 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh                       # device cuda: results in outputs/gpu_check/results
#   bash benchmarks/gpu_check.sh --out results/gpu     # results into a folder of your choice
#   bash benchmarks/gpu_check.sh --device cpu          # the same steps at --tiny sizes, to check the script on a CPU
#
# Steps (each through the real CLI, on a synthetic image-folder dataset written here with PIL):
#   1. teacher   python train.py stage=teacher arch=simple_unet batch_size=128 ... device=cuda precision=bf16 logger=none
#                perf.compile=true                                                  (torch.compile)
#   2. distill   python train.py stage=distill teacher_checkpoint=<1> ...           (one-step, no GAN, eager)
#   3. full      python train.py stage=distill ... gan_classifier=true 'denoising_sigmas=[80.0,2.5]'
#                generator_ema_decay=0.9 dfake_gen_update_ratio=2                  (experiment=cpu_smoke's method; eager:
#                compiling its many graphs took over 2 minutes on the CPU)
#   4. generate  python generate.py on the results of 2 and 3 (and the teacher)
#   5. bench     python benchmarks/bench.py --device cuda --arch simple_unet edm_unet --batch-size 128
#                --full-method, fp32 and --bf16; then simple_unet with every fast path (--bf16 --channels-last
#                --compile --fused-adamw), and batch loading with the in-memory cache vs DataLoader workers
# debug=smoke is not used: it forces device=cpu and a tiny network; every key is passed explicitly instead.
#
# Writes into --out: summary.txt (one line per step: ok/FAILED/skipped, seconds), logs/<step>.log,
# metrics_<run>.jsonl (the runs' logged scalars, incl. train/images_per_sec), grid_<run>.png,
# bench_fp32.json / bench_bf16.json (+ .txt tables) and machine.txt. Checkpoints and data stay in --work.
# summary.txt ends with the real loops' train/images_per_sec next to bench.py's bare steps (same arch and batch).
# Exit status: 0 when every step passed, 1 otherwise. A global time budget (--budget, default 450 s) shortens the
# per-step timeouts so the whole script ends in time; steps that no longer fit are skipped and reported.
set -uo pipefail

DEVICE=cuda
OUT=""
WORK=""
BUDGET=470
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-outputs/gpu_check/results}"
WORK="${WORK:-outputs/gpu_check/work}"   # outputs/ is git-ignored
mkdir -p "$OUT/logs" "$WORK"
OUT="$(cd "$OUT" && pwd)"
WORK="$(cd "$WORK" && pwd)"
PY="${PYTHON:-python}"
export WANDB_MODE=disabled WANDB_SILENT=true HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1

if [[ "$DEVICE" == cpu ]]; then
  ARCH=simple_unet_tiny; BATCH=8; TEACHER_STEPS=4; DISTILL_STEPS=4; SAMPLE_STEPS=2; PER_CLASS=2; WORKERS=0; LOG=2
  BENCH=(--device cpu --tiny --full-method)
  FAST=(--device cpu --tiny --arch simple_unet)
  # On a small shared CPU, torch's default of one OpenMP thread per core can be ~30x slower than one thread
  # (threads wait at every op's barrier for a descheduled sibling); override with OMP_NUM_THREADS=N.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  ARCH=simple_unet; BATCH=128; TEACHER_STEPS=30; DISTILL_STEPS=20; SAMPLE_STEPS=18; PER_CLASS=32; WORKERS=2; LOG=5
  BENCH=(--device "$DEVICE" --arch simple_unet edm_unet --batch-size 128 --full-method)
  FAST=(--device "$DEVICE" --arch simple_unet --batch-size 128 --warmup 5)
fi
DATA="$WORK/data"
RUN_KEYS=(data=image_folder "data.root=$DATA" "data.num_workers=$WORKERS" "device=$DEVICE" precision=bf16
          logger=none "batch_size=$BATCH" warmup_steps=5 save_every=100000 "log_every=$LOG" sample_every=0
          samples_per_class=2 "sample_steps=$SAMPLE_STEPS"
          eval_every=0)  # no in-training FID: Inception's weights cannot be downloaded on an offline machine

START=$SECONDS
FAILED=0
: > "$OUT/summary.txt"
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# step NAME TIMEOUT CMD... : run CMD with a timeout cut to the remaining budget; log, time and record it
step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - (SECONDS - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 15 )); then
    note "$(printf '%-16s skipped (time budget of %ss spent)' "$name" "$BUDGET")"; FAILED=1; return 1
  fi
  local t0=$SECONDS rc
  echo ">>> [$name] $* (timeout ${limit}s)" >&2
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  if (( rc == 0 )); then
    note "$(printf '%-16s ok      %4ss' "$name" $(( SECONDS - t0 )))"
  else
    [[ $rc == 124 || $rc == 137 ]] && rc="$rc (timeout ${limit}s)"
    note "$(printf '%-16s FAILED  %4ss  exit %s; last lines of logs/%s.log:' "$name" $(( SECONDS - t0 )) "$rc" "$name")"
    tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt" >&2
    FAILED=1
  fi
  return 0
}

# keep a run's metrics and last sample grid next to the results
collect() {
  local run="$1" dir="$WORK/$1"
  [[ -f "$dir/metrics.jsonl" ]] && cp "$dir/metrics.jsonl" "$OUT/metrics_$run.jsonl"
  local grid
  grid=$(ls -t "$dir"/samples/*.png "$dir"/grid.png 2>/dev/null | head -n 1)
  [[ -n "$grid" ]] && cp "$grid" "$OUT/grid_$run.png"
  return 0
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "host: $(uname -a)"; echo "device: $DEVICE"
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null); OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
  "$PY" -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
} > "$OUT/machine.txt"
note "gpu_check on $DEVICE: $(tail -n +5 "$OUT/machine.txt" | head -n 1)"
note "results: $OUT ; work (data, checkpoints): $WORK"

step data 60 "$PY" - "$DATA" "$PER_CLASS" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, per_class = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for c in range(10):
    folder = root / f"class{c:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        base = np.array([20 + 20 * c, 200 - 15 * c, 100 + 10 * (i % 3)], dtype=np.float64)
        img = np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
print(f"wrote {10 * per_class} PNGs to {root}")
EOF

rm -rf "$WORK/teacher" "$WORK/distill" "$WORK/full" "$WORK"/gen_*
step teacher 150 "$PY" train.py stage=teacher "arch=$ARCH" "${RUN_KEYS[@]}" "max_steps=$TEACHER_STEPS" \
  perf.compile=true "output_dir=$WORK/teacher" "hydra.run.dir=$WORK/teacher/hydra"
collect teacher
TEACHER="$WORK/teacher/teacher_final.pt"

step distill 150 "$PY" train.py stage=distill "teacher_checkpoint=$TEACHER" "${RUN_KEYS[@]}" \
  "max_steps=$DISTILL_STEPS" dfake_gen_update_ratio=5 "output_dir=$WORK/distill" "hydra.run.dir=$WORK/distill/hydra"
collect distill

step full_method 150 "$PY" train.py stage=distill "teacher_checkpoint=$TEACHER" "${RUN_KEYS[@]}" \
  "max_steps=$DISTILL_STEPS" gan_classifier=true 'denoising_sigmas=[80.0,2.5]' generator_ema_decay=0.9 \
  dfake_gen_update_ratio=2 "output_dir=$WORK/full" "hydra.run.dir=$WORK/full/hydra"
collect full

for run in full distill teacher; do
  ckpt="$WORK/$run/dmd2_final.pt"; [[ $run == teacher ]] && ckpt="$TEACHER"
  step "generate_$run" 90 "$PY" generate.py "checkpoint=$ckpt" "output_dir=$WORK/gen_$run" seeds=0-39 \
    "device=$DEVICE" "sampler.steps=$SAMPLE_STEPS" "hydra.run.dir=$WORK/gen_$run/hydra"
  [[ -f "$WORK/gen_$run/grid.png" ]] && cp "$WORK/gen_$run/grid.png" "$OUT/generated_$run.png"
done

step bench_fp32 180 "$PY" benchmarks/bench.py "${BENCH[@]}" --out "$OUT/bench_fp32.json"
step bench_bf16 150 "$PY" benchmarks/bench.py "${BENCH[@]}" --bf16 --out "$OUT/bench_bf16.json"
step bench_fast 120 "$PY" benchmarks/bench.py "${FAST[@]}" --bf16 --channels-last --compile --fused-adamw \
  --data "$DATA" --data-batches 5 --out "$OUT/bench_fast.json"
for f in bench_fp32 bench_bf16 bench_fast; do
  [[ -f "$OUT/$f.json" ]] && "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['table'])" \
    "$OUT/$f.json" > "$OUT/$f.txt"
done

# the real training loops (data loading, logging, EMA included) against bench.py's bare steps, same arch and batch;
# the CLI runs use precision=bf16, so they are compared with bench_bf16 (on the CPU bf16 is a no-op either way)
"$PY" - "$OUT" 2>&1 <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
bench_file = out / "bench_bf16.json"
if not bench_file.is_file():
    print("loop vs bench: no bench_bf16.json")
    sys.exit(0)
entry = json.loads(bench_file.read_text())["results"][0]  # simple_unet (tiny widths on the CPU = simple_unet_tiny)
rows = [("teacher", entry["teacher_step"]["images_per_sec"], "teacher_step"),
        ("distill", entry["dmd2"]["avg_ratio_5"]["images_per_sec"], "dmd2 avg_ratio_5"),
        ("full", entry.get("dmd2_full_method", {}).get("avg_ratio_2", {}).get("images_per_sec"),
         "dmd2_full_method avg_ratio_2")]
print(f"loop vs bench ({entry['arch']}, batch {entry['batch_size']}; loop = mean train/images_per_sec after the "
      "first log interval, with data loading, logging and EMA):")
for run, bench, what in rows:
    f = out / f"metrics_{run}.jsonl"
    vals = [r["train/images_per_sec"] for r in map(json.loads, f.read_text().splitlines())
            if "train/images_per_sec" in r] if f.is_file() else []
    loop = sum(vals[1:]) / len(vals[1:]) if len(vals) > 1 else (vals[0] if vals else None)
    if loop is None or bench is None:
        print(f"  {run:8s} n/a")
        continue
    print(f"  {run:8s} loop {loop:9.1f} img/s   bench {bench:9.1f} img/s ({what})   loop/bench {loop / bench:.2f}")
EOF

note "total $(( SECONDS - START ))s; $( ((FAILED)) && echo 'SOME STEPS FAILED' || echo 'all steps ok')"
for f in bench_fp32 bench_bf16 bench_fast; do [[ -f "$OUT/$f.txt" ]] && { echo; echo "== $f"; cat "$OUT/$f.txt"; }; done
exit $FAILED
