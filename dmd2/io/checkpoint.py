"""Checkpoints: plain dicts of tensors, numbers and strings, written atomically, loaded safely.

Every checkpoint holds ``format`` (its layout's version), ``kind`` ("teacher" or "dmd2"), ``step``, ``config``
(the resolved run config) and ``arch`` / ``num_classes`` / ``resolution`` / ``sigma_data``, so its networks can be
rebuilt from the file alone; dmd2/io/checkpoint_format.py lists every key and upgrades older layouts on loading.
Loading uses ``torch.load(weights_only=True)``: nothing stored in a file is ever executed. Files are named
``<prefix>_NNNNNN.pt`` (periodic, by step) and ``<prefix>_final.pt`` (``checkpoint_name``, ``checkpoint_step``).
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import tempfile
import time
from typing import Any

import torch

from dmd2.config.errors import FileError, FormatError
from dmd2.io.checkpoint_format import CHECKPOINT_FORMAT, current_layout
from dmd2.io.files import atomic_write
from dmd2.io.weights import load_denoiser
from dmd2.networks.precond import EDMPrecond
from dmd2.runtime.distributed import Dist, barrier

log = logging.getLogger(__name__)

KINDS = ("teacher", "dmd2")
RESCUE_ENV = "DMD2_RESCUE_DIR"
FINAL = "final"
_NAME = re.compile(r"(.+)_([0-9]+|final)\.pt")


def checkpoint_name(prefix: str, step: int | str) -> str:
    """The file name of a checkpoint: ``<prefix>_NNNNNN.pt`` for a step, ``<prefix>_final.pt`` for "final"."""
    return f"{prefix}_{FINAL}.pt" if step == FINAL else f"{prefix}_{int(step):06d}.pt"


def checkpoint_step(name: str, prefix: str) -> int | str | None:
    """What a file name says of a checkpoint of ``prefix``: its step (``<prefix>_NNNNNN.pt``), "final"
    (``<prefix>_final.pt``), or None (another file)."""
    match = _NAME.fullmatch(name)
    if match is None or match.group(1) != prefix:
        return None
    return FINAL if match.group(2) == FINAL else int(match.group(2))


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file in the same folder, fsync, rename), tagged with
    the current layout's ``format``."""
    state = {**state, "format": CHECKPOINT_FORMAT}
    atomic_write(path, lambda f: torch.save(state, f), suffix=".pt")


def load_checkpoint(path: str, kind: str | None = None, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint on the CPU in the current layout (an older one is upgraded: dmd2.io.checkpoint_format);
    with ``kind``, refuse a file of another kind. ``mmap``: map the tensors' bytes instead of reading them (for
    reading a checkpoint's fields only)."""
    if not os.path.isfile(path):
        raise FileError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise FormatError(f"cannot read checkpoint {path}: {load_failure(err)}") from err
    if not isinstance(state, dict) or state.get("kind") not in KINDS:
        raise FormatError(f"{path} is not a checkpoint of this project (no 'kind' in {KINDS})")
    if kind is not None and state["kind"] != kind:
        raise FileError(f"{path} is a {state['kind']!r} checkpoint, expected a {kind!r} checkpoint")
    return current_layout(state, path)


EXPECTED = ("expected a checkpoint of this project: a teacher_*.pt or dmd2_*.pt written by train.py, or a teacher "
            "imported with python -m dmd2.import_edm (tensors, numbers and strings only)")


def load_failure(err: Exception, expected: str = EXPECTED) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in this project's words. A file holding pickled Python objects
    is named as such and never loaded (torch's advice to retry with weights_only=False, which would run code from
    the file, is left out)."""
    text = str(err)
    if "weights_only" in text or "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"global[: ]+'?([\w.]+)", text)
        what = f" (e.g. {found.group(1)})" if found else ""
        return f"it holds pickled Python objects{what}, which are never loaded; {expected}"
    return f"truncated, corrupted or not a checkpoint ({text.splitlines()[0] if text else type(err).__name__}); {expected}"


def network_from_checkpoint(state: dict[str, Any], weights: str, entry: str | None = None) -> EDMPrecond:
    """Rebuild a denoiser with the checkpoint's architecture and load ``state[weights]`` (with ``entry``:
    ``state[weights][entry]``, e.g. one of ``generator_emas``) into it, through
    ``dmd2.io.weights.load_denoiser``: the recorded architecture must first describe exactly the shapes of
    those weights (checked on the meta device), so a crafted arch cannot make this allocate more than the
    weights the file holds."""
    tensors = state.get(weights)
    if entry is not None:
        tensors = tensors.get(entry) if isinstance(tensors, dict) else None
        weights = f"{weights}/{entry}"
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise FormatError(f"the checkpoint has no '{weights}' weights (a dict of tensors)")
    try:
        return load_denoiser(state.get("arch"), state.get("num_classes"), state.get("resolution"),
                             state["sigma_data"], tensors)
    except FormatError as err:
        raise FormatError(f"the checkpoint's '{weights}' weights: {err}") from None


def periodic_checkpoints(folder: str, prefix: str) -> list[str]:
    """Paths of ``<prefix>_NNNNNN.pt`` in ``folder``, newest (highest step) first."""
    if not os.path.isdir(folder):
        return []
    steps = {n: checkpoint_step(n, prefix) for n in os.listdir(folder)}
    periodic = [n for n, step in steps.items() if isinstance(step, int)]
    return [os.path.join(folder, n) for n in sorted(periodic, key=lambda n: steps[n], reverse=True)]


def latest_valid_checkpoint(folder: str, prefix: str, kind: str) -> tuple[str, dict[str, Any]] | None:
    """The newest loadable checkpoint of a run folder: ``<prefix>_final.pt`` first, then periodic ones by step.

    A truncated or corrupted file is skipped with a warning naming it. Returns (path, state) or None.
    """
    final = os.path.join(folder, checkpoint_name(prefix, FINAL))
    candidates = ([final] if os.path.isfile(final) else []) + periodic_checkpoints(folder, prefix)
    for path in candidates:
        try:
            return path, load_checkpoint(path, kind=kind)
        except (FileError, FormatError) as err:
            log.warning(f"[resume] WARNING: skipping {path}: {err}; falling back to the previous checkpoint")
    return None


def prune_checkpoints(folder: str, prefix: str, keep_last: int | None, upto: int | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` periodic checkpoints (``*_final.pt`` is never touched). With
    ``upto`` (the step just saved) only checkpoints of earlier steps count: a file of a later step is not the
    running timeline's and is never deleted in its place."""
    if not keep_last:
        return []
    found = periodic_checkpoints(folder, prefix)
    if upto is not None:
        found = [p for p in found if checkpoint_step(os.path.basename(p), prefix) <= upto]
    stale = found[keep_last:]
    for path in stale:
        os.remove(path)
    return stale


def rng_state() -> dict[str, Any]:
    """The global CPU and CUDA random states (plain tensors), for exact resumption."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rescue_dir() -> str:
    """Where a checkpoint goes when its own folder cannot take it: $DMD2_RESCUE_DIR, else <tmp>/dmd2-rescue."""
    return os.environ.get(RESCUE_ENV) or os.path.join(tempfile.gettempdir(), "dmd2-rescue")


def save_final(state: dict[str, Any], path: str, d: Dist) -> str:
    """Write a checkpoint that must not be lost (the final one, or one on a stop signal): rank 0 writes, the
    others wait. A failed write is tried once more; if that fails too the weights go to ``rescue_dir()`` and
    FileError names both paths (the run ends with an error, its weights kept). Returns the path."""
    if d.is_main:
        error: Exception | None = None
        for attempt in range(2):
            try:
                save_checkpoint(state, path)
                break
            except Exception as err:  # noqa: BLE001 - any failure: OSError, torch.save's RuntimeError, ...
                error = err
                log.error(f"[checkpoint] ERROR: writing {path} failed ({err}){'; trying again' if not attempt else ''}")
                time.sleep(1.0)
        else:
            rescue = os.path.join(rescue_dir(), f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}-"
                                                f"{os.path.basename(path)}")
            save_checkpoint(state, rescue)
            raise FileError(f"could not write {path} ({error}); the checkpoint (step {state.get('step')}) "
                            f"was saved to the rescue path {rescue} instead: copy it back to continue")
    barrier(d)
    return path


def save_periodic(state: dict[str, Any], folder: str, prefix: str, step: int, keep_last: int | None, d: Dist) -> None:
    """Write ``<prefix>_NNNNNN.pt`` and prune old ones (rank 0 only). A failed write (disk full, ...) is
    reported and training goes on: the previous checkpoints are untouched, and the next save tries again."""
    if not d.is_main:
        return
    name = checkpoint_name(prefix, step)
    try:
        save_checkpoint(state, os.path.join(folder, name))
    except Exception as err:  # noqa: BLE001 - a full disk raises OSError, or RuntimeError from torch.save
        log.error(f"[checkpoint] ERROR: writing {name} failed ({err}); the previous checkpoints are "
                  "intact, training continues")
        return
    prune_checkpoints(folder, prefix, keep_last, upto=step)
