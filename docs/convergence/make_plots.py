"""The README "Convergence" figure: exact scores against iterations, mean and spread over each row's seeds.

    python docs/convergence/make_plots.py ROW=FOLDER[,FOLDER...] ... --out docs/convergence/curves.png

Each FOLDER is a run folder (its metrics.jsonl); a row's folders are its seeds.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KEYS = [("fd", "pixel FD (lower is better)"), ("near", "on a mode"), ("weight_tv", "mode weight TV")]


def curves(folder: str) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in Path(folder, "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: {k: r[f"eval/mixture_{k}"] for k, _ in KEYS} for r in rows if "eval/mixture_fd" in r}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows", nargs="+", help="LABEL=FOLDER[,FOLDER...]")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for spec in args.rows:
        label, folders = spec.split("=", 1)
        runs = [curves(f) for f in folders.split(",")]
        steps = sorted(set.intersection(*(set(r) for r in runs)) - {0})
        for ax, (k, title) in zip(axes, KEYS):
            v = np.array([[r[s][k] for s in steps] for r in runs])
            m, sd = v.mean(0), v.std(0, ddof=1) if len(runs) > 1 else 0.0 * v[0]  # sample sd over seeds
            ax.plot(steps, m, marker=".", label=f"{label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, m - sd, m + sd, alpha=0.2)
            ax.set_title(title)
            ax.set_xlabel("iteration")
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)


if __name__ == "__main__":
    main()
