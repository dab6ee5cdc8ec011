"""Compare finished runs: one table row per setting, mean +- sd over its seeds, and a plot per eval metric.

    python -m dmd2.compare multirun/2026-11-29/18-30-00                   # every run under a sweep folder
    python -m dmd2.compare 'multirun/2026-11-29/*' runs/teacher --out compare/

A run is a folder holding the ``config.yaml`` and ``metrics.jsonl`` every training run writes. The settings that
differ between the runs (any config key except the seed, paths and names) define the groups; within a group the
runs are repetitions. For every ``eval/*`` metric the table shows, as mean +- sd over the group's runs, its last
logged value (final) and its best value over the run (min for distances such as FID / FD, max for scores such as
coverage: ``dmd2.config.names.higher_is_better``), with n; also the steps and the wall time (from the first to the last
write of the run). The Markdown table goes to stdout; ``--out DIR`` writes compare.md, compare.csv (means and
sds as numbers), compare_<metric>.png (each metric against the step, one line per group, a band of +- sd over
its runs) and contact_sheet.png (each group's latest sample grid, from its first run, one below the other).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from dmd2.config.errors import FileError, FormatError, run_tool
from dmd2.config.names import count_label, higher_is_better, network_stem
from dmd2.config.policy import splits_groups

# eval/* values that describe the cost or the bookkeeping of an evaluation, not the model
NOT_METRICS = ("eval/seconds", "eval/images_per_sec", "eval/nfe", "eval/best_step", "eval/num_samples")
WALL_KEY = "wall_s"  # a metrics.jsonl row's seconds since its segment (one process of the run) started
MAX_CONFIG_BYTES = 1 << 20  # a run's config.yaml (a few KB in practice)
MAX_ROW_BYTES = 1 << 20  # one metrics.jsonl line


@dataclass
class Run:
    path: str
    config: dict[str, Any]        # flattened: "data.num_classes" -> 2
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (step, value), file order
    steps: int = 0
    seconds: float = 0.0

    def final(self, key: str) -> float:
        """The last logged value of ``key`` (nan when never logged)."""
        return self.series[key][-1][1] if key in self.series else math.nan

    def best(self, key: str) -> float:
        """The best logged value of ``key``: its max for scores, its min otherwise (nan when never logged)."""
        values = [v for _, v in self.series.get(key, []) if not math.isnan(v)]
        if not values:
            return math.nan
        return max(values) if higher_is_better(key) else min(values)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases: the config.yaml a run writes has none, and nested aliases
    make a file of a kilobyte expand to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"an alias (*{self.peek_event().anchor}): a run's config.yaml has none")
        return super().compose_node(parent, index)


def read_config(path: str) -> dict[str, Any]:
    """A run's config.yaml as a dict (at most MAX_CONFIG_BYTES, plain YAML: no aliases, no Python tags)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise FileError(f"{path}: cannot be read ({err.strerror or err})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise FormatError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes (not a run's config.yaml)")
    try:
        config = yaml.load(data.decode("utf-8"), Loader=_NoAliasLoader) or {}  # noqa: S506 - safe, no aliases
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise FormatError(f"{path}: not a run's config.yaml ({type(err).__name__}: {err})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: expected a mapping of settings, got {type(config).__name__}")
    return config


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str, run: Run) -> list[list[float]]:
    """Fill ``run``'s series and steps from its metrics.jsonl; return the ``wall_s`` values of each segment.
    A last line cut off by a crash is left out; any other line that is not a row {"step": <int >= 0>, key:
    number, ...} is refused, naming the file and line."""
    segments: list[list[float]] = []
    try:
        with open(path, "rb") as f:
            lines = []
            while line := f.readline(MAX_ROW_BYTES + 1):
                if len(line) > MAX_ROW_BYTES:
                    raise FormatError(f"{path}:{len(lines) + 1}: a line longer than {MAX_ROW_BYTES} bytes")
                lines.append(line)
    except OSError as err:
        raise FileError(f"{path}: cannot be read ({err.strerror or err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            if number == len(lines) and not line.endswith(b"\n"):
                continue  # a line cut off by a crash: the rest still counts
            raise FormatError(f"{path}:{number}: not a JSON row ({type(err).__name__}: {err})") from None
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise FormatError(f"{path}:{number}: expected a row {{\"step\": <integer >= 0>, ...}}, got "
                              f"{line.decode('utf-8', 'replace').strip()[:80]!r}")
        run.steps = max(run.steps, step)
        wall = row.get(WALL_KEY)
        if _number(wall) and math.isfinite(wall):
            if not segments or wall < segments[-1][-1]:
                segments.append([])  # the clock restarted: a resumed segment
            segments[-1].append(float(wall))
        for key, value in row.items():
            if _number(value) and key not in ("step", WALL_KEY):
                run.series.setdefault(key, []).append((step, float(value)))
    return segments


def read_run(folder: str) -> Run:
    config_path, metrics = os.path.join(folder, "config.yaml"), os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise FileError(f"{folder}: a run folder without metrics.jsonl (the run logged nothing, or this is not the "
                        "folder the run wrote: its output_dir)")
    if not os.path.isfile(config_path):
        raise FileError(f"{folder}: metrics.jsonl without the run's config.yaml")
    run = Run(folder, flatten(read_config(config_path)))
    segments = read_metrics(metrics, run)
    if segments:  # the sum over the run's segments (each started, was stopped, and was resumed)
        run.seconds = sum(s[-1] for s in segments)
    else:  # rows without wall_s (older runs): from the first to the last write
        run.seconds = os.path.getmtime(metrics) - os.path.getmtime(config_path)
    return run


def run_folders(top: str) -> list[str]:
    """The run folders at or below ``top``: those with a metrics.jsonl (Hydra's own .hydra/ folders skipped)."""
    found = []
    for folder, subfolders, files in os.walk(top):
        subfolders[:] = sorted(d for d in subfolders if d != ".hydra")
        if "metrics.jsonl" in files:
            found.append(folder)
    if not found and os.path.isfile(os.path.join(top, "config.yaml")):
        read_run(top)  # a run folder without metrics: say so
    return found


def find_runs(patterns: list[str]) -> list[Run]:
    """Every run folder at or below the given paths (globs allowed), in path order."""
    folders: dict[str, str] = {}  # the real path of each run folder -> the path it was first reached by
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for top in matches:
            if not os.path.isdir(top):
                raise FileError(f"{top!r} is not a folder (expected run folders, sweep folders or globs)")
            for folder in run_folders(top):  # a run reached again (a symlink, a trailing slash) counts once
                folders.setdefault(os.path.realpath(folder), os.path.normpath(folder))
    if not folders:
        raise FileError(f"no runs (folders with config.yaml and metrics.jsonl) under {' '.join(patterns)}")
    runs = [read_run(f) for f in sorted(folders.values())]
    for note in split_measurements(runs):
        print(f"[compare] {note}", file=sys.stderr)
    return runs


# what an eval/* value was measured with, as the run's config records it (eval.*): values measured otherwise are
# never put in one column
MEASURED_WITH = {
    "samples": ("eval.num_samples",),
    "network": ("eval.feature_network.name", "eval.feature_network.path", "eval.feature_network.resize"),
    "reference": ("eval.reference.name", "eval.reference.folder", "eval.reference.path"),
}


def measured_with(run: Run, part: str) -> str:
    """How ``run`` measured its eval/* values, one ``part`` of MEASURED_WITH, as it appears in a column name:
    '@2k' (the sample count), ' net=<network>', ' ref=<reference>'."""
    c = run.config
    if part == "samples":
        n = c.get("eval.num_samples")
        return f"@{count_label(int(n))}" if isinstance(n, (int, float)) else "@?"
    if part == "network":
        path = c.get("eval.feature_network.path")
        name = network_stem(str(path)) if path else str(c.get("eval.feature_network.name"))
        return f" net={name}/{c.get('eval.feature_network.resize')}"
    where = c.get("eval.reference.folder") or c.get("eval.reference.path")
    return f" ref={c.get('eval.reference.name')}" + (f":{os.path.normpath(str(where))}" if where else "")


def split_measurements(runs: list[Run]) -> list[str]:
    """Rename each eval/* series whose runs measured it with different sample counts, feature networks or
    references after what differs (eval/fid -> eval/fid@1k, eval/fid@2k): separate, named columns, never one
    column of values that do not compare. Returns a note per metric split."""
    notes = []
    for metric in eval_metrics(runs):
        members = [r for r in runs if metric in r.series]
        differing = [p for p in MEASURED_WITH if len({measured_with(r, p) for r in members}) > 1]
        if not differing:
            continue
        for r in members:
            tag = "".join(measured_with(r, p) for p in differing)
            for key in [k for k in (metric, metric + "_std", metric + "_best") if k in r.series]:
                r.series[metric + tag + key[len(metric):]] = r.series.pop(key)
        notes.append(f"{metric} was measured with different {', '.join(differing)}: one column for each "
                     f"({', '.join(sorted({metric + ''.join(measured_with(r, p) for p in differing) for r in members}))})")
    return notes


def differing_keys(runs: list[Run]) -> list[str]:
    """The config keys whose values differ between the runs, among those that split groups (each key's policy,
    dmd2.config.policy.splits_groups: not the seed, paths and names)."""
    keys = sorted({k for r in runs for k in r.config})
    return [k for k in keys if splits_groups(k) and len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def eval_metrics(runs: list[Run]) -> list[str]:
    """The eval/* metrics any run logged, without costs, bookkeeping and standard deviations."""
    keys = {k for r in runs for k in r.series if k.startswith("eval/")}
    return sorted(k for k in keys if k not in NOT_METRICS and not k.endswith(("_std", "_best")))


def group_runs(runs: list[Run]) -> tuple[list[str], dict[tuple[str, ...], list[Run]]]:
    """(the differing keys, their values -> the runs with them), groups in the order of their first run."""
    keys = differing_keys(runs)
    groups: dict[tuple[str, ...], list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(str(r.config.get(k)) for k in keys), []).append(r)
    return keys, groups


def best_label(metric: str) -> str:
    return f"{metric} best ({'max' if higher_is_better(metric) else 'min'})"


def columns(members: list[Run], metrics: list[str]) -> dict[str, list[float]]:
    """Column name -> the value of every run of a group: final and best of each metric, steps, wall seconds."""
    cols: dict[str, list[float]] = {}
    for m in metrics:
        cols[f"{m} final"] = [r.final(m) for r in members]
        cols[best_label(m)] = [r.best(m) for r in members]
    cols["steps"] = [float(r.steps) for r in members]
    cols["wall s"] = [r.seconds for r in members]
    return cols


def stats(values: list[float]) -> tuple[float, float]:
    """(mean, sd) of the values that are not nan; sd is 0 for one value, both nan for none."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_sd(values: list[float]) -> str:
    """mean ± sd of the values that are not nan, with "(n=k)" when only k of the group's runs have one."""
    present = [v for v in values if not math.isnan(v)]
    if not present:
        return ""
    mean, sd = stats(present)
    text = f"{present[0]:.4g}" if len(present) == 1 else f"{mean:.4g} ± {sd:.2g}"
    return text if len(present) == len(values) else f"{text} (n={len(present)})"


def table(runs: list[Run], metrics: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the Markdown table: one row per group of runs with equal settings in the keys that
    differ; cells are mean ± sd over the group's runs."""
    metrics = metrics or eval_metrics(runs)
    keys, groups = group_runs(runs)
    header: list[str] = []
    rows = []
    for setting, members in groups.items():
        cols = columns(members, metrics)
        header = [*keys, "n", *cols]
        rows.append([*setting, str(len(members)), *(mean_sd(v) for v in cols.values())])
    return header, rows


def csv_table(runs: list[Run], metrics: list[str] | None = None) -> list[list[Any]]:
    """The table as numbers: the settings, n, then a mean and an sd column for every Markdown column."""
    metrics = metrics or eval_metrics(runs)
    keys, groups = group_runs(runs)
    out: list[list[Any]] = []
    for setting, members in groups.items():
        cols = columns(members, metrics)
        if not out:
            out.append([*keys, "n", *(f"{name} {part}" for name in cols for part in ("mean", "sd", "n"))])
        cells = [cell for v in cols.values()
                 for cell in (*(f"{x:.6g}" if not math.isnan(x) else "" for x in stats(v)),
                              sum(not math.isnan(x) for x in v))]
        out.append([*setting, len(members), *cells])
    return out


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def curve(members: list[Run], metric: str) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, sd) of ``metric`` over the runs of a group, at every step any of them logged it."""
    by_step: dict[int, list[float]] = {}
    for r in members:
        for step, value in r.series.get(metric, []):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    means, sds = zip(*(stats(by_step[s]) for s in steps)) if steps else ((), ())
    return steps, list(means), list(sds)


def plot_file(metric: str) -> str:
    """compare_<metric>.png: eval/fd_featnet -> compare_fd_featnet.png."""
    name = metric[len("eval/"):] if metric.startswith("eval/") else metric
    return "compare_" + re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png"


def plot(runs: list[Run], metrics: list[str], folder: str) -> list[str]:
    """One PNG per metric in ``folder``: the metric against the step, a line per group (mean over its runs) with a
    band of +- sd; returns the paths. matplotlib is imported here only (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, groups = group_runs(runs)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for setting, members in groups.items():
            steps, mean, sd = curve(members, metric)
            if not steps:
                continue
            label = ", ".join(f"{k}={v}" for k, v in zip(keys, setting)) or "all runs"
            line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"{label} (n={len(members)})")
            ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = os.path.join(folder, plot_file(metric))
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# the sample grids a contact sheet shows, in order of preference (samples/<name>_<step>.png in a run folder)
SHEET_GRIDS = ("samples_generator_ema", "samples_generator", "samples_teacher_ema", "samples_teacher")


def latest_samples(run: Run) -> str | None:
    """The newest sample grid of ``run`` (its generator EMA's, else its generator's, else its teacher's)."""
    names = os.listdir(os.path.join(run.path, "samples")) if os.path.isdir(os.path.join(run.path, "samples")) else []
    for kind in SHEET_GRIDS:
        found = sorted(n for n in names if re.fullmatch(re.escape(kind) + r"_\d+\.png", n))
        if found:
            return os.path.join(run.path, "samples", found[-1])  # steps are zero-padded: the last is the latest
    return None


def contact_sheet(runs: list[Run], path: str) -> str | None:
    """``path``: each group's latest sample grid (from its first run that has one), titled with its setting,
    one below the other; None (nothing written) when no run has a grid."""
    from PIL import Image

    from dmd2.io.pictures import stacked, titled

    keys, groups = group_runs(runs)
    panels = []
    for setting, members in groups.items():
        grid = next((g for g in map(latest_samples, members) if g), None)
        if grid is None:
            continue
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, setting)) or "all runs"
        with Image.open(grid) as image:
            panels.append(titled(image.convert("RGB"), f"{label}: {os.path.relpath(grid)}"))
    if not panels:
        return None
    stacked(panels).save(path)
    return path


def write_outputs(runs: list[Run], metrics: list[str] | None, args: argparse.Namespace) -> None:
    try:
        _write_outputs(runs, metrics, args)
    except OSError as err:  # --out naming a file, a folder that is not writable, a full disk
        raise FileError(f"{err.filename or args.out}: cannot write the comparison ({err.strerror or err})") from None


def _write_outputs(runs: list[Run], metrics: list[str] | None, args: argparse.Namespace) -> None:
    metrics = metrics or eval_metrics(runs)
    text = markdown(*table(runs, metrics))
    sys.stdout.write(text)
    markdown_path = args.markdown or (os.path.join(args.out, "compare.md") if args.out else None)
    csv_path = args.csv or (os.path.join(args.out, "compare.csv") if args.out else None)
    for path in (markdown_path, csv_path):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(text)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows(csv_table(runs, metrics))
    if args.out or args.plot:
        for path in plot(runs, metrics, args.out or "."):
            print(f"[compare] plot: {path}", file=sys.stderr)
    if args.out:
        sheet = contact_sheet(runs, os.path.join(args.out, "contact_sheet.png"))
        print(f"[compare] contact sheet: {sheet}" if sheet else "[compare] no contact sheet: no run has a sample grid",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmd2.compare", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders, sweep folders or globs")
    parser.add_argument("--metric", action="append", help="eval metric to show (repeatable); default: every eval/*")
    parser.add_argument("--out", metavar="DIR", help="write compare.md, compare.csv, compare_<metric>.png and "
                        "contact_sheet.png here")
    parser.add_argument("--plot", action="store_true", help="write the PNG plots (into --out, else here)")
    parser.add_argument("--markdown", metavar="FILE", help="write the Markdown table here")
    parser.add_argument("--csv", metavar="FILE", help="write the table as CSV (means and sds) here")
    args = parser.parse_args(argv)
    return run_tool(parser.prog, lambda: compare_command(args))


def compare_command(args: argparse.Namespace) -> None:
    """``python -m dmd2.compare`` with its parsed arguments: find the runs, write the table and plots."""
    runs = find_runs(args.paths)
    logged = {k for r in runs for k in r.series}
    # a metric split by split_measurements is asked for by its plain name: every one of its columns
    metrics = [k for m in args.metric for k in sorted(logged) if k == m or k.startswith((m + "@", m + " "))] or \
        args.metric if args.metric else None
    missing = [m for m in metrics or [] if not any(m in r.series for r in runs)]
    if missing:
        raise FileError(f"--metric {', '.join(missing)}: no run logged it; they logged "
                        f"{', '.join(eval_metrics(runs)) or 'no eval/* metric'}")
    write_outputs(runs, metrics, args)
