"""The pictures of README "Is my run healthy?": the health diagnostics of three known-answer distillations
(a healthy one, dfake_gen_update_ratio=1 and dm_gradient_sign=-1), read from their run folders.

    python docs/health/make_figures.py healthy=RUN ratio1=RUN flipped=RUN --out docs/health

Writes health_curves.png (the diagnostics against the step, alerts marked) and denoiser_<name>.png (each run's
last denoiser panel, copied from its samples/ folder) and prints the alert rows of each run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("eval/mixture_fd", "pixel FD to the exact mixture (lower is better)", True),
          ("eval/recall", "recall (k = 5)", False), ("eval/coverage", "coverage (k = 5)", False),
          ("eval/precision", "precision (k = 5)", False), ("eval/mixture_near", "fraction of samples on a mode", False),
          ("train/dm_grad_norm", "DM gradient norm per sample", True),
          ("train/saturated_fraction", "saturated pixels (at +-1)", False),
          ("eval/class_entropy", "class entropy (exact classifier)", False)]
COLOURS = {"healthy": "tab:green", "ratio1": "tab:orange", "flipped": "tab:red"}
LABELS = {"healthy": "healthy (mixture_dmd2)", "ratio1": "dfake_gen_update_ratio=1",
          "flipped": "dm_gradient_sign=-1"}


def read(folder: str) -> tuple[dict[str, list[tuple[int, float]]], list[dict]]:
    series: dict[str, list[tuple[int, float]]] = {}
    alerts = []
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "alert" in row:
                alerts.append(row)
                continue
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    series.setdefault(k, []).append((row["step"], float(v)))
    return series, alerts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="name=run_folder")
    parser.add_argument("--out", default="docs/health")
    args = parser.parse_args()
    runs = dict(r.split("=", 1) for r in args.runs)
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.2))
    for name, folder in runs.items():
        series, alerts = read(folder)
        for ax, (key, title, log_y) in zip(axes.flat, PANELS):
            points = series.get(key, [])
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("eval/") else None, ms=3,
                        color=COLOURS.get(name), label=LABELS.get(name, name))
            for a in alerts:
                if a["key"] == key or (key == "eval/mixture_fd" and a["alert"] == "fd_rising"):
                    ax.axvline(a["step"], color=COLOURS.get(name), ls=":", lw=1)
            ax.set_title(title, fontsize=9)
            ax.set_yscale("log" if log_y else "linear")
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        print(f"== {name} ({folder}): {len(alerts)} alert(s)")
        for a in alerts:
            print(f"[health] step {a['step']}: ALERT {a['alert']}: {a['message']}")
        panels = sorted(glob.glob(os.path.join(folder, "samples", "diagnostics_denoiser_*.png")))
        if panels:
            shutil.copyfile(panels[-1], os.path.join(args.out, f"denoiser_{name}.png"))
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Known-answer distillations: the health diagnostics (dotted lines: alerts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "health_curves.png"), dpi=80)


if __name__ == "__main__":
    main()
