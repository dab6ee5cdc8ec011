#!/usr/bin/env bash
# The DMD2 paper's ablations at toy scale, on data=gaussian_mixture, scored against the exact distribution
# (README "Known-answer runs"). CPU only, no data, no account. One teacher, then four sweeps of 3 seeds each
# around the official schedule at toy scale (experiment=mixture_dmd2 with constant learning rates and no EMA, 800
# iterations: ratio 5, no GAN head, both learning rates 1e-3), from the EDM-noise teacher (p_std 1.2, 800 steps)
# these tables were measured with (README "Known-answer runs"; the converging defaults: README "Convergence"):
#   update ratio 1 / 5 / 10, the GAN head on, generator_lr 3e-4 / 3e-3, the exact denoiser as teacher, and
#   FastGen's variant (experiment=mixture_fastgen).
# Ends with the table and plots: python -m dmd2.compare runs/mixture/official/ablation --metric ... --out ...
# Extra overrides go to every distillation, e.g. max_steps=2000.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/mixture/official
if [ ! -f "$out/teacher/teacher_final.pt" ]; then
  python train.py experiment=mixture_teacher p_std=1.2 max_steps=800 logger=none output_dir="$out/teacher"
fi
official=(lr_decay=none generator_ema_decay=null generator_ema_warmup=false max_steps=800 eval_every=200)
common=(experiment=mixture_dmd2 logger=none teacher_checkpoint="$out/teacher/teacher_final.pt" seed=0,1,2
        "${official[@]}")
python train.py -m "${common[@]}" dfake_gen_update_ratio=1,5,10 hydra.sweep.dir="$out/ablation/ratio" "$@"
python train.py -m "${common[@]}" gan_classifier=true hydra.sweep.dir="$out/ablation/gan" "$@"
python train.py -m "${common[@]}" generator_lr=3e-4,3e-3 hydra.sweep.dir="$out/ablation/lr" "$@"
python train.py -m "${common[@]}" exact_teacher=true hydra.sweep.dir="$out/ablation/exact" "$@"
# FastGen's DMD2 variant at the same scale (experiment=mixture_fastgen: teacher-feature discriminator, alternating
# updates, unweighted fake score loss over the DM range 0.2-99.8 %)
python train.py -m experiment=mixture_fastgen "${common[@]:1}" hydra.sweep.dir="$out/ablation/fastgen" "$@"
python -m dmd2.compare "$out/ablation" --metric eval/mixture_fd --metric eval/mixture_near \
    --metric eval/mixture_coverage --metric eval/mixture_weight_tv --out "$out/ablation/compare"
