"""Checkpoints: plain dicts of tensors, numbers and strings, written atomically, loaded safely.

Every checkpoint holds ``kind`` ("teacher" or "dmd2"), ``step``, ``config`` (the resolved run config)
and ``arch`` / ``num_classes`` / ``resolution``, so its networks can be rebuilt from the file alone.
Loading uses ``torch.load(weights_only=True)``: nothing stored in a file is ever executed.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from dmd2.networks import EDMPrecond, build_denoiser

KINDS = ("teacher", "dmd2")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or not of the expected kind."""


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint on the CPU; with ``kind``, refuse a file of another kind."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated, corrupted or not a checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("kind") not in KINDS:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'kind' in {KINDS})")
    if kind is not None and state["kind"] != kind:
        raise CheckpointError(f"{path} is a {state['kind']!r} checkpoint, expected a {kind!r} checkpoint")
    return state


def network_from_checkpoint(state: dict[str, Any], weights: str) -> EDMPrecond:
    """Rebuild a denoiser with the checkpoint's architecture and load ``state[weights]`` into it."""
    net = build_denoiser(state["arch"], state["num_classes"], state["resolution"], state.get("sigma_data", 0.5))
    net.load_state_dict(state[weights])
    return net
