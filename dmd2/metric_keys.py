"""The keys evaluations log under, known from the config alone (no torch): the config checks which metric a run
will produce (dmd2.config.check_objective) before anything is built."""
from __future__ import annotations

import os
import re

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
