#!/usr/bin/env bash
# Each fast path alone against its baseline, to choose the perf.* defaults on a given machine (one call).
#
#   bash benchmarks/fast_paths.sh                          # cuda, simple_unet, batch 128: results in outputs/fast_paths
#   bash benchmarks/fast_paths.sh --out "$OUT" --arch edm_unet
#   bash benchmarks/fast_paths.sh --device cpu --tiny      # tiny widths: checks the script in about a minute
#   bash benchmarks/fast_paths.sh --only fp32,bf16,compile # some settings (a switch needs its baseline to compare)
#
# Runs benchmarks/bench.py once per setting (JSON + table each) and prints, per setting, the teacher step, the
# DMD2 step at ratio 10 and one-step sampling in images/s, and each as a ratio to the setting's baseline:
#   fp32          baseline of: bf16, no_tf32
#   bf16          (precision=bf16) baseline of: the switches below, each added alone on top of bf16
#   no_tf32       perf.tf32=false
#   channels_last perf.channels_last=true
#   fused_adamw   perf.fused_adamw=true
#   compile       perf.compile=true (compilation happens in the warm-up iterations)
# On the CPU bf16 and TF32 are no-ops (the table then shows noise). A run cut short still leaves its JSON files.
set -uo pipefail

DEVICE=cuda
OUT=""
ARCH=simple_unet
EXTRA=()
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --arch) ARCH="$2"; shift 2 ;;
    --tiny) EXTRA+=(--tiny); shift ;;
    --only) ONLY="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "fast_paths.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-outputs/fast_paths}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
[[ "$DEVICE" == cpu ]] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
BASE=(--device "$DEVICE" --arch "$ARCH" "${EXTRA[@]}")
[[ "$DEVICE" != cpu && ${#EXTRA[@]} -eq 0 ]] && BASE+=(--batch-size 128 --warmup 5 --heun-iters 2)

declare -A FLAGS=([fp32]="" [bf16]="--bf16" [no_tf32]="--no-tf32" [channels_last]="--bf16 --channels-last"
                  [fused_adamw]="--bf16 --fused-adamw" [compile]="--bf16 --compile")
ORDER=(fp32 bf16 no_tf32 channels_last fused_adamw compile)
if [[ -n "$ONLY" ]]; then
  IFS=, read -r -a ORDER <<< "$ONLY"
  for name in "${ORDER[@]}"; do
    [[ -v "FLAGS[$name]" ]] || { echo "fast_paths.sh: --only: unknown setting $name (${!FLAGS[*]})" >&2; exit 2; }
  done
fi
FAILED=0
for name in "${ORDER[@]}"; do
  # shellcheck disable=SC2086
  if ! "$PY" benchmarks/bench.py "${BASE[@]}" ${FLAGS[$name]} --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1; then
    echo "fast_paths: $name FAILED (see $OUT/$name.log)" >&2; FAILED=1
  fi
done

"$PY" - "$OUT" "${ORDER[*]}" <<'PYEOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
baseline = {"fp32": None, "bf16": "fp32", "no_tf32": "fp32", "channels_last": "bf16", "fused_adamw": "bf16",
            "compile": "bf16"}


def rates(name):
    f = out / f"{name}.json"
    if not f.is_file() or not json.loads(f.read_text())["results"]:
        return None
    e = json.loads(f.read_text())["results"][0]
    return {"teacher": e["teacher_step"]["images_per_sec"], "dmd2_r10": e["dmd2"]["avg_ratio_10"]["images_per_sec"],
            "one_step": e["sampling"]["one_step"]["images_per_sec"]}


first = next((json.loads((out / f"{n}.json").read_text()) for n in baseline if (out / f"{n}.json").is_file()), None)
if first:
    m = first["machine"]
    print(f"fast paths on {m['device']} = {m['device_name']}, torch {m['torch']}, "
          f"arch {first['settings']['archs'][0]}, batch {first['settings']['batch_size']}")
print(f"{'setting':14s} {'teacher':>10s} {'dmd2 r10':>10s} {'1-step':>10s}   vs baseline (teacher / dmd2 / 1-step)")
for name, base in baseline.items():
    if name not in sys.argv[2].split():
        continue  # not asked for (--only)
    r = rates(name)
    if r is None:
        print(f"{name:14s} missing")
        continue
    b = rates(base) if base else None
    vs = " / ".join(f"{r[k] / b[k]:.2f}x" for k in r) + f" vs {base}" if b else ""
    print(f"{name:14s} {r['teacher']:10.1f} {r['dmd2_r10']:10.1f} {r['one_step']:10.1f}   {vs}")
PYEOF
exit $FAILED
