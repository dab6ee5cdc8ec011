"""Why a known-answer distillation stops where it does: the DM gradient's parts measured against their exact values.

For a distillation checkpoint of ``data=gaussian_mixture`` (dmd2_final.pt or a periodic one), it draws generator
samples, fits a mixture to them (``dmd2.method.mixture.fit_mixture``: the generator's own distribution, whose exact
denoiser is what a perfect fake score network would output) and reports per noise level
(``dmd2.method.mixture.dm_gradient_errors``): the fake score network's error against that ideal, the real score's
error against the data's exact denoiser on the same inputs, the exact DM direction's size (``signal``) and the
networks' direction's error (``error``) and cosine to it, plus the fitted mode weights against the true ones.

    python benchmarks/mixture_mechanism.py runs/mixture/dmd2/dmd2_final.pt [more checkpoints] --out mech.json

Reading: where ``error`` > ``signal`` the generator follows the networks' error more than the data; at a
plateau the exact signal has shrunk to the size of the fake score network's error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmd2.data.mixture import mixture_from_config  # noqa: E402
from dmd2.io.checkpoint import load_checkpoint, network_from_checkpoint  # noqa: E402
from dmd2.method.mixture import (ExactDenoiser, dm_gradient_errors, fit_mixture,  # noqa: E402
                                 mixture_scores)
from dmd2.method.randomness import torch_generator  # noqa: E402

SIGMAS = [0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0]


def generator_samples(state: dict, weights: str, num: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` one-step samples [num,3,R,R] (classes round-robin) of the checkpoint's generator ``weights``, clipped
    to [-1, 1] as every evaluation's samples are (the data's modes lie well inside)."""
    net = network_from_checkpoint(state, weights).eval()
    sigma = float(state["conditioning_sigma"])
    labels = torch.arange(num) % max(1, classes)
    z = torch.randn(num, 3, state["resolution"], state["resolution"], generator=torch_generator(seed))
    with torch.no_grad():
        x = net(z * sigma, torch.full((num,), sigma), labels).float().clamp(-1, 1)
    return x, labels


def measure(path: str, num: int, seed: int) -> dict:
    state = load_checkpoint(path, "dmd2")
    steps = len(state.get("denoising_sigmas") or [state["conditioning_sigma"]])
    if steps > 1:
        raise SystemExit(f"mixture_mechanism.py: {path} is a {steps}-step generator; this measurement models the "
                         "samples of a one-step generator (the fake score network's inputs at its first step only)")
    cfg = state["config"]
    mix = mixture_from_config(cfg["data"])
    if cfg.get("exact_teacher"):
        real = ExactDenoiser(mix)
    else:
        real = network_from_checkpoint(load_checkpoint(state["teacher_checkpoint"], "teacher"), "ema").eval()
    fake = network_from_checkpoint(state, "fake_unet").eval()
    out = {"checkpoint": path, "step": state["step"], "samples": num}
    for weights in ["generator"] + (["generator_ema"] if "generator_ema" in state else []):
        x, labels = generator_samples(state, weights, num, mix.num_classes, seed)
        fit = fit_mixture(mix, x, labels)
        k = mix.num_components
        out[weights] = {"scores": mixture_scores(mix, x, labels),
                        "fitted_weights": fit.weights[:, :k].tolist(), "off_mode_weight": fit.weights[:, k].tolist()}
        if weights == "generator":  # the fake score network models the raw generator's samples
            out["levels"] = dm_gradient_errors(x, labels, real, fake, mix, fit, SIGMAS, seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [measure(p, args.samples, args.seed) for p in args.checkpoints]
    for r in rows:
        print(f"{r['checkpoint']} (step {r['step']}): scores {r['generator']['scores']}")
        print(f"  fitted mode weights {r['generator']['fitted_weights']}, off-mode {r['generator']['off_mode_weight']}")
        print("  sigma    fake_mse  fake_mse_x0  real_mse    signal     error   cosine")
        for lv in r["levels"]:
            print(f"  {lv['sigma']:6g} {lv['fake_mse']:9.2e} {lv['fake_mse_x0']:9.2e} {lv['real_mse']:9.2e} "
                  f"{lv['signal']:9.2e} {lv['error']:9.2e} {lv['cosine']:7.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
