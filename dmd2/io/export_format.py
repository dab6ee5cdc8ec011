"""The layout of an export (written by ``dmd2.io.export``, read by ``dmd2.io.loaded``): file names, format tag and
the metadata (config.json) of a checkpoint's sampling weights."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any

from dmd2.data.datasets import default_class_names
from dmd2.io.files import file_sha256
from dmd2.io.sampler import CheckpointSampler
from dmd2.version import __version__

EXPORT_FORMAT = "dmd2-generator"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of a resolved training config (sorted JSON): equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def export_metadata(state: dict[str, Any], sampler: CheckpointSampler, checkpoint: str,
                    with_checksum: bool = True) -> dict[str, Any]:
    """The config.json of an export of checkpoint ``state`` (sampled by ``sampler``)."""
    num_classes = int(state["num_classes"])
    names = state.get("class_names")
    if sampler.kind == "teacher":
        how = {"heun_steps": sampler.heun_steps, "nfe": sampler.nfe}
    else:
        how = {"denoising_sigmas": list(sampler.denoising_sigmas), "nfe": sampler.nfe}
    config = state.get("config") or {}
    provenance = {
        "checkpoint": os.path.basename(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint) if with_checksum else None,
        "step": int(state["step"]),
        "teacher_checkpoint": state.get("teacher_checkpoint"),
        "teacher_sha256": state.get("teacher_sha256"),
        "imported_from": (state.get("provenance") or {}).get("source"),
        "config_sha256": config_hash(config),
        "wandb_run_id": state.get("wandb_run_id"),
        "dmd2_version": __version__,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return {
        "format": EXPORT_FORMAT, "format_version": 1, "kind": state["kind"], "weights": sampler.weights,
        "arch": state["arch"], "num_classes": num_classes, "resolution": int(state["resolution"]),
        "sigma_data": float(state.get("sigma_data", 0.5)), "sampler": how,
        "class_names": list(names) if names is not None else default_class_names(num_classes),
        "provenance": provenance, "training_config": config,
    }
