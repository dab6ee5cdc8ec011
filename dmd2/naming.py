"""Names known from a config alone, without torch: the keys evaluations log under (the config checks which metric a
run will produce, dmd2.config.check_objective, before anything is built) and the short name of a data set (W&B
projects, cached reference statistics)."""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

MIXTURE_KEY = "eval/mixture_fd"  # data=gaussian_mixture; eval/mixture_coverage, _near, _weight_tv beside it
MIXTURE_METRIC = "pixel FD to the exact mixture"


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


def dataset_label(data: Mapping[str, Any]) -> str:
    """A short name of the data a ``data`` config reads, for W&B project names and reference statistics:
    cifar10, synthetic, mixture, or the stem of ``root`` with its 'NxN' folded in (datasets/imagenet-64x64.zip ->
    imagenet64, data/faces -> faces)."""
    if data["name"] in ("cifar10", "synthetic"):
        return data["name"]
    if data["name"] == "gaussian_mixture":
        return "mixture"
    stem = os.path.basename(os.path.normpath(str(data["root"])))
    stem = stem[:-4] if stem.lower().endswith(".zip") else stem
    stem = re.sub(r"[-_]?(\d+)x\1$", r"\1", stem)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or data["name"]


TRAIN_KEYS = ("train/epoch", "train/global_batch_size", "train/images_per_sec")  # both stages
TEACHER_KEYS = ("train/loss", "train/lr", "train/grad_norm", "train/skipped_steps")
DISTILL_KEYS = ("train/loss_dm", "train/dm_grad_norm", "train/loss_fake", "train/generator_grad_norm",
                "train/guidance_grad_norm", "train/generator_lr", "train/guidance_lr", "train/generator_skipped_steps",
                "train/guidance_skipped_steps")
GAN_KEYS = ("train/loss_gen_gan", "train/loss_cls")  # distillation with gan_classifier=true


def train_metric_keys(stage: str, gan_classifier: bool = False) -> list[str]:
    """The train/ scalars a run of ``stage`` logs (dmd2/runners/), known from its config: what optimized_metric
    may name besides the eval/ metrics."""
    own = TEACHER_KEYS if stage == "teacher" else DISTILL_KEYS + (GAN_KEYS if gan_classifier else ())
    return sorted(TRAIN_KEYS + own)
