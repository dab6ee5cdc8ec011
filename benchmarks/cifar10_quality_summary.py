"""summary.json and summary.txt of benchmarks/cifar10_quality.sh, from what its steps left in --out.

Reads stages.tsv (one line per step: name, ok | FAILED | skipped, seconds, detail), logs/<step>.log,
metrics_{teacher,distill}.jsonl (the training runs' logged scalars) and results_fd_*.json (evaluate.py's rows).
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

FD_STEPS = {"fd_teacher_35nfe": "teacher, 35 NFE (Heun, 18 steps)", "fd_teacher_1nfe": "teacher, 1 NFE (one Euler step)",
            "fd_student": "one-step generator (EMA weights)"}
STOPPED = re.compile(r"SIGTERM received: stopped at step (\d+)")


def read_stages(out: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (out / "stages.tsv").read_text().splitlines():
        name, status, seconds, detail = (line.split("\t") + ["", "", "", ""])[:4]
        rows.append({"name": name, "status": status, "seconds": int(seconds or 0), "detail": detail})
    return rows


def training(out: Path, run: str, planned: int, batch: int, stage: dict[str, Any] | None) -> dict[str, Any]:
    """Steps done and throughput of one training run: the mean of the logged train/images_per_sec after the first
    log interval (which holds cuDNN autotuning and the first launches), and images / the step's wall seconds
    (start-up, data decoding and the checkpoint included)."""
    info: dict[str, Any] = {"steps_planned": planned, "batch_size": batch, "steps_done": None,
                            "stopped_by_budget": False, "images_per_sec": None, "images_per_sec_wall": None}
    log = out / "logs" / f"{run}.log"
    stopped = STOPPED.findall(log.read_text(errors="replace")) if log.is_file() else []
    metrics = out / f"metrics_{run}.jsonl"
    rows = [json.loads(r) for r in metrics.read_text().splitlines() if r.strip()] if metrics.is_file() else []
    speeds = [r["train/images_per_sec"] for r in rows if "train/images_per_sec" in r]
    if stopped:
        info.update(steps_done=int(stopped[-1]), stopped_by_budget=True)
    elif stage and stage["status"] == "ok":
        info["steps_done"] = planned
    elif rows:
        info["steps_done"] = max(int(r.get("step", 0)) for r in rows)
    if speeds:
        later = speeds[1:] or speeds
        info["images_per_sec"] = sum(later) / len(later)
        info["log_intervals"] = len(speeds)
    if info["steps_done"] and stage and stage["seconds"] > 0:
        info["images_seen"] = info["steps_done"] * batch
        info["images_per_sec_wall"] = info["images_seen"] / stage["seconds"]
    return info


def fd_result(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"results_{name}.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())
    row = rows[0] if isinstance(rows, list) else rows
    keep = ("metric", "name", "value", "std", "num_samples", "nfe", "images_per_sec", "generation_seconds",
            "total_seconds", "checkpoint", "step", "kind", "sampler_steps", "weights")
    res = {k: row.get(k) for k in keep}
    res["finite"] = isinstance(res["value"], (int, float)) and math.isfinite(res["value"])
    return res


def reference_info(path: Path, split: str) -> dict[str, Any]:
    info: dict[str, Any] = {"split": split, "data": f"CIFAR-10 JPEG copy, {split} split", "statistics": str(path)}
    if path.is_file():
        with np.load(path) as z:
            if "meta" in z.files:
                meta = json.loads(str(z["meta"]))
                info.update({k: meta[k] for k in ("num_images", "image_size", "source") if k in meta})
            info["feature_dim"] = int(z["mu"].shape[0])
    return info


def fmt(v: Any, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for key in ("out", "device", "reference", "featnet", "teacher-arch", "distill", "reference-stats"):
        p.add_argument(f"--{key}", required=key != "reference-stats")
    for key in ("budget", "samples", "teacher-batch", "distill-batch", "teacher-steps", "distill-steps"):
        p.add_argument(f"--{key}", type=int, required=True)
    a = p.parse_args()
    out = Path(a.out)
    stages = read_stages(out)
    by_name = {s["name"]: s for s in stages}
    featnet = Path(a.featnet).name.removesuffix(".pt").removesuffix(".ts")
    fds = {name: fd_result(out, name) for name in FD_STEPS}
    teacher = training(out, "teacher", a.teacher_steps, a.teacher_batch, by_name.get("teacher"))
    distill = training(out, "distill", a.distill_steps, a.distill_batch, by_name.get("distill"))
    ref = reference_info(Path(a.reference_stats), a.reference) if a.reference_stats else {"split": a.reference}
    total = by_name.get("total", {})
    summary = {
        "benchmark": "cifar10_quality",
        "device": a.device,
        "budget_seconds": a.budget,
        "total_seconds": total.get("seconds"),
        "all_ok": all(s["status"] == "ok" for s in stages),
        "machine": (out / "machine.txt").read_text().splitlines() if (out / "machine.txt").is_file() else [],
        "metric": f"FD ({featnet})",
        "feature_network": a.featnet,
        "reference": ref,
        "samples": a.samples,
        "fd": {name.removeprefix("fd_"): fds[name] for name in FD_STEPS},
        "images_per_sec": {
            "teacher_training": teacher["images_per_sec"],
            "distillation": distill["images_per_sec"],
            **{f"sampling_{name.removeprefix('fd_')}": (fds[name] or {}).get("images_per_sec") for name in FD_STEPS},
        },
        "training": {"teacher": {"arch": a.teacher_arch, **teacher}, "distill": {"overrides": a.distill, **distill}},
        "stages": stages,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = [f"cifar10_quality on {a.device}: {'all steps ok' if summary['all_ok'] else 'SOME STEPS FAILED'}, "
             f"{fmt(total.get('seconds'), 'd')} s of a {a.budget} s budget"]
    lines += [f"  {m}" for m in summary["machine"][:6]]
    lines.append("")
    lines.append(f"FD ({featnet}), {a.samples} generated samples each (classes round-robin), against CIFAR-10 "
                 f"{a.reference}" + (f" ({ref['num_images']} images)" if "num_images" in ref else "") +
                 "; lower is better; compare only with FDs of the same network, reference and sample count:")
    for name, what in FD_STEPS.items():
        r = fds[name]
        if r is None:
            lines.append(f"  {what:36s} n/a (step {by_name.get(name, {}).get('status', 'not run')})")
        else:
            lines.append(f"  {what:36s} FD {fmt(r['value'], '.3f')} ± {fmt(r['std'], '.3f')}   "
                         f"(NFE {r['nfe']}, sampling {fmt(r['images_per_sec'])} img/s)")
    lines.append("")
    lines.append("images/s (training: mean logged train/images_per_sec after the first log interval; in brackets "
                 "steps x batch / the step's wall time, start-up included):")
    for run, info, label in (("teacher", teacher, f"teacher training ({a.teacher_arch})"),
                             ("distill", distill, "distillation (generator samples)")):
        cut = " (stopped by the time budget)" if info["stopped_by_budget"] else ""
        lines.append(f"  {label:36s} {fmt(info['images_per_sec']):>10s}  ({fmt(info['images_per_sec_wall'])})   "
                     f"steps {fmt(info['steps_done'], 'd') if info['steps_done'] is not None else 'n/a'} of "
                     f"{info['steps_planned']}, batch {info['batch_size']}{cut}")
    for name, what in FD_STEPS.items():
        r = fds[name] or {}
        lines.append(f"  {'sampling, ' + what:36s} {fmt(r.get('images_per_sec')):>10s}")
    lines.append("")
    lines.append(f"distillation overrides: {a.distill}")
    lines.append("")
    lines.append("steps:")
    for s in stages:
        lines.append(f"  {s['name']:18s} {s['status']:8s} {s['seconds']:5d} s  {s['detail']}".rstrip())
    (out / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
