"""The README "Convergence" figure: exact scores against iterations, mean and spread over each row's seeds.

    python docs/convergence/make_plots.py LABEL=FOLDER[,FOLDER...] ... --out docs/convergence/curves.png [--x samples]

Each FOLDER is a run folder (its metrics.jsonl and config.yaml); a row's folders are its seeds. --x samples puts the
training samples seen (iterations x batch_size) on the x axis, to compare batch sizes at equal data.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KEYS = [("fd", "pixel FD (lower is better)"), ("near", "on a mode"), ("weight_tv", "mode weight TV")]


def curves(folder: str) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in Path(folder, "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: {k: r[f"eval/mixture_{k}"] for k, _ in KEYS} for r in rows if "eval/mixture_fd" in r}


def split_row(spec: str) -> tuple[str, list[str]]:
    """LABEL=FOLDER[,FOLDER...] -> (label, folders). A label may hold "=" and "," (``lr_decay=none``) and a Hydra
    folder name may too: the split is the first "=" after which the rest reads as run folders (each with its
    metrics.jsonl), joined by "," (a part that is no run folder is joined to the next)."""
    def run_folders(rest: str) -> list[str] | None:
        folders, part = [], ""
        for piece in rest.split(","):
            part = f"{part},{piece}" if part else piece
            if Path(part, "metrics.jsonl").is_file():
                folders, part = folders + [part], ""
        return folders if folders and not part else None

    for i, c in enumerate(spec):
        folders = run_folders(spec[i + 1:]) if c == "=" and i > 0 else None
        if folders:
            return spec[:i], folders
    raise SystemExit(f"row {spec!r}: expected LABEL=FOLDER[,FOLDER...] with run folders (each with metrics.jsonl)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows", nargs="+", help="LABEL=FOLDER[,FOLDER...]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--x", choices=["iteration", "samples"], default="iteration")
    parser.add_argument("--title", default=None, help="a title above the panels")
    parser.add_argument("--teacher-fd", type=float, default=None,
                        help="draw the asked standard: FD <= 2x this teacher FD, >= 0.95 on a mode, TV <= 0.06")
    args = parser.parse_args()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for spec in args.rows:
        label, folders = split_row(spec)
        runs = [curves(f) for f in folders]
        steps = sorted(set.intersection(*(set(r) for r in runs)) - {0})
        batches = {yaml.safe_load(Path(f, "config.yaml").read_text())["batch_size"] for f in folders}
        if args.x == "samples" and len(batches) != 1:
            raise SystemExit(f"row {label!r}: its runs have different batch sizes {sorted(batches)}")
        xs = [s * min(batches) / 1000 for s in steps] if args.x == "samples" else steps
        for ax, (k, title) in zip(axes, KEYS):
            v = np.array([[r[s][k] for s in steps] for r in runs])
            m, sd = v.mean(0), v.std(0, ddof=1) if len(runs) > 1 else 0.0 * v[0]  # sample sd over seeds
            ax.plot(xs, m, marker=".", label=f"{label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(xs, m - sd, m + sd, alpha=0.2)
            ax.set_title(title)
            ax.set_xlabel("iteration" if args.x == "iteration" else "training samples (thousands)")
    if args.teacher_fd is not None:
        for ax, (level, label) in zip(axes, [(2 * args.teacher_fd, "2x teacher"), (0.95, "standard"),
                                             (0.06, "standard")]):
            ax.axhline(level, color="grey", linestyle="--", linewidth=1, label=label)
        axes[0].axhline(args.teacher_fd, color="black", linestyle=":", linewidth=1, label="teacher (35 NFE)")
        axes[0].legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)


if __name__ == "__main__":
    main()
