"""The layout of an export: its file names, its format tag, and the one writer and the one reader of its
metadata (config.json, repeated in the header of model.safetensors).

``export_metadata`` writes the metadata of every export (``python -m dmd2.export`` from a checkpoint through
``checkpoint_export_metadata``, ``python -m dmd2.import_dmd2`` from an official generator), so every export
carries the same fields. ``read_export_metadata`` reads it back for every reader (``dmd2.io.loaded``: loading,
sampling, ``source_info``): checked against sane bounds and against the weights' shapes in the safetensors
header before any tensor is read, and brought to the current layout (exports written before a field existed get
it, null or its default).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any, Sequence

from dmd2.config.errors import FileError, FormatError
from dmd2.data.datasets import default_class_names
from dmd2.io.files import file_sha256
from dmd2.io.sampler import CheckpointSampler, is_sigma
from dmd2.io.weights import check_weights_fit, complete_arch
from dmd2.version import __version__

EXPORT_FORMAT, EXPORT_FORMAT_VERSION = "dmd2-generator", 1
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
MAX_CONFIG_BYTES = 16 << 20  # an export's config.json (a few KB; class names and the training config included)
DEFAULT_HEUN_STEPS = 18  # a teacher export that records no Heun steps samples with EDM's 18
MAX_HEUN_STEPS, MAX_CHAIN = 1000, 64  # an export's sampler: Heun steps, one-step-generator chain length
# provenance fields that are null when the source did not record them; ``provenance.unknown`` lists those that are
UNKNOWABLE = ("checkpoint_sha256", "teacher_checkpoint", "teacher_sha256", "wandb_run_id")


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of a resolved training config (sorted JSON): equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unknown_fields(kind: str, provenance: dict[str, Any]) -> list[str]:
    """The provenance fields of an export that are null because its source did not record them (a teacher has no
    teacher: those fields do not apply to it)."""
    return [k for k in UNKNOWABLE if provenance.get(k) is None and not (kind == "teacher" and k.startswith("teacher"))]


def export_metadata(sampler: CheckpointSampler, *, arch: dict[str, Any], sigma_data: float,
                    class_names: Sequence[str] | None, checkpoint: str, checkpoint_sha256: str | None,
                    teacher_checkpoint: str | None = None, teacher_sha256: str | None = None,
                    imported_from: str | None = None, wandb_run_id: str | None = None,
                    training_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of an export sampled by ``sampler`` (its kind, weights, step, classes, resolution and
    sampler), written from ``checkpoint`` (a path: its file name is kept). A field the source did not record is
    null, and named in ``provenance.unknown``."""
    if sampler.kind == "teacher":
        how = {"heun_steps": sampler.heun_steps, "nfe": sampler.nfe}
    else:
        how = {"denoising_sigmas": list(sampler.denoising_sigmas), "nfe": sampler.nfe}
    config = training_config or {}
    provenance = {
        "checkpoint": os.path.basename(checkpoint),
        "checkpoint_sha256": checkpoint_sha256,
        "step": int(sampler.step),
        "teacher_checkpoint": teacher_checkpoint,
        "teacher_sha256": teacher_sha256,
        "imported_from": imported_from,
        "config_sha256": config_hash(config),
        "wandb_run_id": wandb_run_id,
        "dmd2_version": __version__,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    provenance["unknown"] = unknown_fields(sampler.kind, provenance)
    num_classes = int(sampler.num_classes)
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "kind": sampler.kind,
        "weights": sampler.weights, "arch": arch, "num_classes": num_classes, "resolution": int(sampler.resolution),
        "sigma_data": float(sigma_data), "sampler": how,
        "class_names": list(class_names) if class_names is not None else default_class_names(num_classes),
        "provenance": provenance, "training_config": config,
    }


def checkpoint_export_metadata(state: dict[str, Any], sampler: CheckpointSampler, checkpoint: str,
                               with_checksum: bool = True) -> dict[str, Any]:
    """The config.json of an export of checkpoint ``state`` (loaded by load_checkpoint: the current layout),
    sampled by ``sampler``; ``with_checksum``: hash the checkpoint file (else its SHA-256 is left unknown)."""
    dmd2 = state["kind"] == "dmd2"
    return export_metadata(
        sampler, arch=state["arch"], sigma_data=state["sigma_data"], class_names=state["class_names"],
        checkpoint=checkpoint, checkpoint_sha256=file_sha256(checkpoint) if with_checksum else None,
        teacher_checkpoint=state["teacher_checkpoint"] if dmd2 else None,
        teacher_sha256=state["teacher_sha256"] if dmd2 else None,
        imported_from=state["provenance"]["source"] if "provenance" in state else None,  # an imported teacher
        wandb_run_id=state["wandb_run_id"], training_config=state["config"])


# ------------------------------------------------------------------------------------------------ the reader


def check_export_metadata(meta: Any, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """FormatError naming ``source`` unless the metadata of an export is what this project writes, within sane
    bounds, and its arch is exactly the network of the weights present (``shapes``: name -> shape, from the
    safetensors header): nothing a crafted config.json says makes the loader allocate beyond the weights."""
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{source}: metadata format {got!r}, expected {EXPORT_FORMAT!r}")
    how, sigma_data, provenance = meta.get("sampler"), meta.get("sigma_data"), meta.get("provenance")
    steps = how.get("heun_steps", DEFAULT_HEUN_STEPS) if isinstance(how, dict) else None
    chain = how.get("denoising_sigmas", []) if isinstance(how, dict) else None
    problems = {
        "kind": meta.get("kind") not in ("teacher", "dmd2"),
        "sigma_data": not isinstance(sigma_data, (int, float)) or not 0 < sigma_data < float("inf"),
        "sampler.heun_steps": isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_HEUN_STEPS,
        "sampler.denoising_sigmas": not isinstance(chain, list) or len(chain) > MAX_CHAIN or not all(
            is_sigma(x) for x in chain),
        "provenance.step": not isinstance(provenance, dict) or not isinstance(provenance.get("step"), int),
        "training_config": meta.get("training_config") is not None and not isinstance(meta["training_config"], dict),
    }
    bad = [k for k, wrong in problems.items() if wrong]
    if bad:
        raise FormatError(f"{source}: metadata field {bad[0]} is missing or out of bounds (at most "
                             f"{MAX_HEUN_STEPS} Heun steps, {MAX_CHAIN} chain sigmas)")
    try:
        check_weights_fit(meta.get("arch"), meta.get("num_classes"), meta.get("resolution"), shapes, sigma_data)
    except FormatError as err:
        raise FormatError(f"{source}: {err}") from None
    names = meta.get("class_names")
    if names is not None and meta["num_classes"] and (not isinstance(names, list) or len(names) != meta["num_classes"]
                                                      or not all(isinstance(n, str) for n in names)):
        raise FormatError(f"{source}: class_names is not a list of {meta['num_classes']} names")


def current_export_layout(meta: dict[str, Any]) -> dict[str, Any]:
    """Checked metadata (``check_export_metadata``) in the current layout: the arch complete (every setting, missing
    ones at their defaults), class names (the default ones when none are recorded), every provenance field (null
    when the export predates it), the sampler's Heun steps (a teacher) or chain (a generator)."""
    meta["arch"] = complete_arch(meta["arch"])
    meta["class_names"] = list(meta.get("class_names") or default_class_names(meta["num_classes"]))
    meta["training_config"] = meta.get("training_config") or {}
    provenance = meta["provenance"]
    for key in (*UNKNOWABLE, "imported_from"):
        provenance.setdefault(key, None)
    provenance.setdefault("unknown", unknown_fields(meta["kind"], provenance))
    if meta["kind"] == "teacher":
        meta["sampler"].setdefault("heun_steps", DEFAULT_HEUN_STEPS)
    else:
        meta["sampler"].setdefault("denoising_sigmas", [])  # refused when sampled: a generator needs its chain
    return meta


def export_weights_file(folder_or_file: str) -> str:
    """The model.safetensors of an export folder, or the .safetensors file named; FileError when absent."""
    path = os.path.join(folder_or_file, WEIGHTS_FILE) if os.path.isdir(folder_or_file) else folder_or_file
    if not os.path.isfile(path):
        raise FileError(f"{folder_or_file}: no {WEIGHTS_FILE} (an export folder holds {CONFIG_FILE} and "
                             f"{WEIGHTS_FILE}; write one with python -m dmd2.export)")
    return path


def read_export_metadata(folder_or_file: str) -> tuple[dict[str, Any], str, dict[str, tuple[int, ...]]]:
    """(metadata in the current layout, weights file, name -> shape of its tensors) of an export: a folder with
    config.json + model.safetensors, or the .safetensors file alone (its header carries the metadata). Only the
    header of the weights file is read; the metadata is checked against its shapes (``check_export_metadata``)."""
    from safetensors import safe_open

    path = export_weights_file(folder_or_file)
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise FormatError(f"{path}: not a readable safetensors file ({err})") from err
    config_path = os.path.join(os.path.dirname(path), CONFIG_FILE)
    try:
        if os.path.isfile(config_path):
            with open(config_path, "rb") as f:
                text = f.read(MAX_CONFIG_BYTES + 1)
            if len(text) > MAX_CONFIG_BYTES:
                raise FormatError(f"{config_path}: larger than {MAX_CONFIG_BYTES} bytes (not an export's config)")
            metadata, source = json.loads(text.decode("utf-8")), config_path
        elif "dmd2" in header:
            metadata, source = json.loads(header["dmd2"]), path
        else:
            raise FormatError(f"{path}: no {CONFIG_FILE} next to it and no dmd2 metadata in its header: not an "
                                 "export of this project")
    except OSError as err:
        raise FileError(f"{config_path}: cannot be read ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError) as err:
        if isinstance(err, FormatError):
            raise
        raise FormatError(f"{folder_or_file}: its metadata is not readable JSON ({err})") from err
    check_export_metadata(metadata, shapes, source)
    if source == config_path and "dmd2" in header:  # the pair moved into place one after the other: one export?
        try:
            stamped = json.loads(header["dmd2"]).get("provenance")
        except (ValueError, AttributeError):
            stamped = None
        if stamped != metadata["provenance"]:
            raise FormatError(f"{folder_or_file}: {CONFIG_FILE} and {os.path.basename(path)} are of different "
                              "exports (their provenance differs: a write interrupted between their moves?); export "
                              "the checkpoint again")
    return current_export_layout(metadata), path, shapes
