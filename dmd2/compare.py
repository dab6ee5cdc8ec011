"""Compare finished runs: one table row per setting, mean +- sd over its seeds.

    python -m dmd2.compare multirun/2026-11-29/18-30-00                   # every run under a sweep folder
    python -m dmd2.compare 'multirun/2026-11-29/*' runs/teacher --csv table.csv

A run is a folder holding the ``config.yaml`` and ``metrics.jsonl`` every training run writes. The settings that
differ between the runs (any config key except the seed, paths and names) define the groups; within a group the
runs are repetitions. For every ``eval/*`` metric the table shows the mean +- sd over the group's runs of its
last logged value, with n; also the steps and the wall time (from the first to the last write of the run). The
Markdown table goes to stdout (and ``--markdown FILE``), one CSV row per group to ``--csv FILE``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any

import yaml

# keys that name or place a run rather than shape it
IGNORED = ("seed", "output_dir", "run_name", "resume", "data_dir", "logger.group", "logger.tags", "data.root",
           "data.num_workers", "teacher_checkpoint", "device")


@dataclass
class Run:
    path: str
    config: dict[str, Any]        # flattened: "data.num_classes" -> 2
    final: dict[str, float]       # the last logged value of every metric
    steps: int
    seconds: float


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def read_run(folder: str) -> Run:
    with open(os.path.join(folder, "config.yaml")) as f:
        config = flatten(yaml.safe_load(f) or {})
    final: dict[str, float] = {}
    steps = 0
    metrics = os.path.join(folder, "metrics.jsonl")
    with open(metrics) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a crash: the rest still counts
                continue
            steps = max(steps, int(row.get("step", 0)))
            final.update({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})
    seconds = os.path.getmtime(metrics) - os.path.getmtime(os.path.join(folder, "config.yaml"))
    return Run(folder, config, final, steps, seconds)


def find_runs(patterns: list[str]) -> list[Run]:
    """Every run folder at or below the given paths (globs allowed), in path order."""
    folders: set[str] = set()
    for pattern in patterns:
        matches = glob.glob(pattern) or [pattern]
        for top in matches:
            if not os.path.isdir(top):
                raise SystemExit(f"dmd2.compare: {top!r} is not a folder")
            for folder, _, files in os.walk(top):
                if "config.yaml" in files and "metrics.jsonl" in files:
                    folders.add(folder)
    if not folders:
        raise SystemExit(f"dmd2.compare: no runs (folders with config.yaml and metrics.jsonl) under {patterns}")
    return [read_run(f) for f in sorted(folders)]


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config})
    return [k for k in keys if k not in IGNORED and len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def table(runs: list[Run], metrics: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per group of runs with equal settings in the keys that differ."""
    keys = differing_keys(runs)
    groups: dict[tuple[str, ...], list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(str(r.config.get(k)) for k in keys), []).append(r)
    metrics = metrics or sorted({k for r in runs for k in r.final if k.startswith("eval/")
                                 and k not in ("eval/seconds", "eval/images_per_sec", "eval/nfe", "eval/best_step")})
    header = [*keys, "n", *metrics, "steps", "wall s"]
    rows = []
    for setting, members in groups.items():
        values = [mean_sd([float(r.final.get(m, math.nan)) for r in members]) for m in metrics]
        rows.append([*setting, str(len(members)), *values, mean_sd([r.steps for r in members]),
                     mean_sd([r.seconds for r in members])])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmd2.compare", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders, sweep folders or globs")
    parser.add_argument("--metric", action="append", help="eval metric to show (repeatable); default: every eval/*")
    parser.add_argument("--markdown", help="also write the Markdown table here")
    parser.add_argument("--csv", help="write the table as CSV here")
    args = parser.parse_args(argv)
    header, rows = table(find_runs(args.paths), args.metric)
    text = markdown(header, rows)
    sys.stdout.write(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
