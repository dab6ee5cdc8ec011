#!/usr/bin/env bash
# The convergence curves of README "Convergence": known-answer distillations (data=gaussian_mixture, 2 classes x 3
# modes, 8 px) scored exactly every 250 iterations, each row a Hydra multirun, read by python -m dmd2.compare.
# CPU only; one thread per run (OMP_NUM_THREADS=1: single runs are chaotic, so the thread count is part of a
# result). Two teachers: the EDM-noise one (p_std 1.2, 800 steps) and the preset's (p_std 2.0, 1600 steps); the
# last three rows are the harder mixture (10 classes x 3 modes, 16 px) with its own teacher trained 6000 steps.
#   bash multirun_examples/convergence_curves.sh                 # every row below (hours on 2 cores)
#   SEEDS=0 bash multirun_examples/convergence_curves.sh         # one seed per row
#   OUT=DIR bash multirun_examples/convergence_curves.sh         # into DIR (default runs/mixture/convergence)
# Extra overrides go to every distillation.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="${OUT:-runs/mixture/convergence}"   # OUT=DIR writes elsewhere
seeds="${SEEDS:-0,1,2}"
[ -f "$out/teacher_edm/teacher_final.pt" ] || python train.py experiment=mixture_teacher p_std=1.2 max_steps=800 \
    logger=none output_dir="$out/teacher_edm"
[ -f "$out/teacher/teacher_final.pt" ] || python train.py experiment=mixture_teacher logger=none \
    output_dir="$out/teacher"
official=(lr_decay=none generator_ema_decay=null generator_ema_warmup=false)
run() {  # run <row name> <teacher folder> <overrides...>
  local name=$1 teacher=$2; shift 2
  python train.py -m experiment=mixture_dmd2 logger=none teacher_checkpoint="$out/$teacher/teacher_final.pt" \
      seed="$seeds" max_steps=3000 eval_every=250 hydra.sweep.dir="$out/$name" "$@" "${EXTRA[@]}"
}
EXTRA=("$@")
# the official schedule (constant rates, no EMA) from the EDM-noise teacher: the plateau
run official teacher_edm "${official[@]}"
# one change at a time from there
run official_dm60 teacher_edm "${official[@]}" max_step_percent=0.6      # DM noise levels below sigma ~5 only
run remedies_teacher_edm teacher_edm                                       # the preset's EMA + cosine decay
run remedies_exact teacher_edm exact_teacher=true                          # ... with the exact denoiser as teacher
run official_teacher teacher "${official[@]}"                              # the preset's teacher alone
# the preset as it is: the better teacher, EMA 0.99 warmed up, cosine decay
run preset teacher
# ... with the budget raised (the decay spans the longer run)
run preset_10k teacher max_steps=10000 eval_every=500
# one further change at a time from the preset
run gan teacher gan_classifier=true                                  # DMD2's GAN head (its default weights)
run generator_lr_half teacher generator_lr=5e-4                      # generator rate half the fake score's
run fake_warmup teacher fake_warmup_steps=250                        # 250 fake-only iterations first
run ratio10 teacher dfake_gen_update_ratio=10                        # half the generator updates
run batch256 teacher batch_size=256 max_steps=1500 eval_every=125    # twice the batch, the same samples
run fastgen teacher experiment=mixture_fastgen                       # FastGen's variant (preset's rates)
# the harder mixture: 10 classes x 3 modes at 16 px, the presets unchanged but for the data and the teacher's budget
m10=(data.num_classes=10 data.resolution=16)
[ -f "$out/teacher_m10/teacher_final.pt" ] || python train.py experiment=mixture_teacher logger=none "${m10[@]}" \
    max_steps=6000 eval_every=1000 output_dir="$out/teacher_m10"
run preset_m10 teacher_m10 "${m10[@]}"
run ema_const_m10 teacher_m10 "${m10[@]}" lr_decay=none      # ... the EMA at a constant rate (no decay)
run preset_10k_m10 teacher_m10 "${m10[@]}" max_steps=10000 eval_every=500  # ... a longer budget
python -m dmd2.compare "$out" --metric eval/mixture_fd --metric eval/mixture_near --metric eval/mixture_coverage \
    --metric eval/mixture_weight_tv --out "$out/compare"
