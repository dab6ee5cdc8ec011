"""Names known from a config alone, without torch: the keys evaluations log under (the config checks which metric a
run will produce, dmd2.config.validate.check_objective, before anything is built) and the short name of a data set (W&B
projects, cached reference statistics)."""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

from dmd2.config.policy import names_a_run  # overrides that only place or name a run are left out

BEST_STEP = "eval/best_step"  # the step of a run's best evaluation


def mixture_key(score: str) -> str:
    """The key of one of the known-answer mixture's exact scores (dmd2.method.mixture.SCORES): eval/mixture_<score>."""
    return f"eval/mixture_{score}"


MIXTURE_KEY = mixture_key("fd")  # data=gaussian_mixture's distance; eval/mixture_coverage, _near, _weight_tv beside it
MIXTURE_METRIC = "pixel FD to the exact mixture"

# Which way an eval metric improves: distances (eval/fid, eval/fd_*, eval/kid, eval/mixture_fd, _weight_tv) are
# better lower; these scores are better higher. Used wherever a run's best value is picked (python -m dmd2.compare).
# Precision, recall, density and coverage (dmd2.eval.prdc) and the classifier's class entropy and label agreement
# are scores too (density is about 1 when the distributions agree; above 1 only when samples crowd the data's modes).
HIGHER_IS_BETTER = ("eval/mixture_coverage", "eval/mixture_near", "eval/is", "eval/inception_score",
                    "eval/precision", "eval/recall", "eval/density", "eval/coverage", "eval/class_entropy",
                    "eval/label_agreement")


def higher_is_better(key: str) -> bool:
    """Whether a larger value of the metric ``key`` is better (scores); False for distances and losses. A key
    named with its measurement (python -m dmd2.compare's 'eval/fid@1k ref=...') is its metric's."""
    return key.split("@")[0].split(" ")[0] in HIGHER_IS_BETTER


def count_label(num: int) -> str:
    """A sample count as it appears in metric names: 50000 -> '50k', 10000 -> '10k', 2500 -> '2.5k', 40 -> '40'."""
    if num >= 1000 and num % 100 == 0:
        return f"{num / 1000:g}k"
    return str(num)


def network_stem(path: str) -> str:
    """File name without its model suffixes: 'nets/cifar10-featnet-dev.ts.pt' -> 'cifar10-featnet-dev'."""
    name = os.path.basename(path)
    while True:
        stem, ext = os.path.splitext(name)
        if ext.lower() not in (".pt", ".pth", ".ts", ".jit", ".torchscript") or not stem:
            return name
        name = stem


def metric_key(name: str, resize: str, path: str | None = None) -> str:
    """The W&B key of a feature network's distance, known from the config alone: inception -> eval/fid (clean)
    or eval/fid_tf (legacy_tensorflow); torchscript -> eval/fd_<file stem>."""
    if name == "inception":
        return "eval/fid" if resize == "clean" else "eval/fid_tf"
    return "eval/fd_" + re.sub(r"[^A-Za-z0-9_.-]", "_", network_stem(path or ""))


SPLITS = ("train", "training", "val", "valid", "validation", "test", "testing")  # folders named after a split


def dataset_label(data: Mapping[str, Any]) -> str:
    """A short name of the data a ``data`` config reads, for W&B project names and reference statistics:
    cifar10, synthetic, mixture, or the stem of ``root`` with its 'NxN' folded in (datasets/imagenet-64x64.zip ->
    imagenet64, data/faces -> faces); a folder named after a split is known by the folder above it
    (data/cifar10-jpeg/train -> cifar10-jpeg)."""
    if data["name"] in ("cifar10", "synthetic"):
        return data["name"]
    if data["name"] == "gaussian_mixture":
        return "mixture"
    root = os.path.normpath(str(data["root"]))
    stem = os.path.basename(root)
    if stem.lower() in SPLITS and os.path.basename(os.path.dirname(os.path.abspath(root))):
        stem = os.path.basename(os.path.dirname(os.path.abspath(root)))
    stem = stem[:-4] if stem.lower().endswith(".zip") else stem
    stem = re.sub(r"[-_]?(\d+)x\1$", r"\1", stem)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or data["name"]


NAME_ITEMS = 5  # overrides shown in a single run's name (after stage and experiment)


def override_key(override: str) -> str:
    """The key of a command-line override: '+data.root=x' -> 'data.root', 'lr=1e-4' -> 'lr'."""
    return override.split("=", 1)[0].lstrip("+~")


def short_value(value: str) -> str:
    """A run name's form of an override's value: a path becomes its file or folder stem
    ('runs/teacher/teacher_final.pt' -> 'teacher_final'), a long number three significant digits."""
    if "/" in value or os.sep in value or re.search(r"\.(pt|pth|pkl|ckpt|npz|zip)$", value):
        return network_stem(os.path.basename(os.path.normpath(value))).rsplit(".", 1)[0] or value
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.3g}" if len(value) > 6 and not value.isdigit() else value


def run_name(overrides: list[str], swept: list[str] | None = None, stage: str | None = None) -> str | None:
    """A W&B run name from a job's command-line overrides. In a sweep (``swept``: the keys whose values vary across
    it) only those, e.g. 'generator_lr=5e-06,seed=1'; else the stage, the experiment and the first few other
    overrides that shape the run, paths reduced to their stem, e.g.
    'distill,dmd2_cifar10,teacher_checkpoint=edm_cond_vp,max_steps=2000'. None when there is nothing to say."""
    pairs = [(override_key(o), o.split("=", 1)[1] if "=" in o else "") for o in overrides]
    if swept:
        items = [f"{k}={short_value(v)}" for k, v in pairs if k in swept]
        if items:
            return ",".join(items)
    values = dict(pairs)
    head = [v for v in (values.get("stage", stage), values.get("experiment")) if v and v != "null"]
    rest = [f"{k}={short_value(v)}" for k, v in pairs if k not in ("stage", "experiment") and names_a_run(k)]
    items = head + rest[:NAME_ITEMS] + ([f"+{len(rest) - NAME_ITEMS} more"] if len(rest) > NAME_ITEMS else [])
    return ",".join(items) or None
