"""The layout of a checkpoint, its version, and the one step that brings older checkpoints to it.

``save_checkpoint`` writes ``format: CHECKPOINT_FORMAT``; ``load_checkpoint`` hands every file of an older layout
(no ``format`` key: everything written before checkpoints carried a version) to ``upgrade_checkpoint``, so the rest
of the code reads the current keys only. After loading, a checkpoint holds:

- every checkpoint: ``format``, ``kind``, ``step``, ``config`` (the resolved run config, {} when none was
  recorded), ``sigma_data``, ``class_names`` (None when unknown), ``wandb_run_id`` (None when none), and, when it
  has networks, ``arch`` (complete: every setting of its architecture, missing ones at their defaults),
  ``num_classes`` and ``resolution``;
- a training checkpoint (one with random states): ``rng``, ``rng_ranks`` (every rank's states), ``batch_rng``
  and ``evaluation`` (None when not recorded), ``metrics`` ({} when none);
- teacher: ``model`` and ``ema``; a trained one ``updater`` ({"optimizer": torch optimizer state, "skipped": int});
- dmd2: ``generator``, ``fake_unet``, ``denoising_sigmas``, ``conditioning_sigma``, ``teacher_checkpoint``,
  ``teacher_sha256`` (None when not recorded), ``generator_updater`` and ``guidance_updater`` (as ``updater``), and
  ``generator_ema`` whenever its config has a ``generator_ema_decay``, and ``generator_emas`` ({name: weights} of
  the EMAs of ``generator_ema_decays``, named by dmd2.config.settings.ema_name; written only when there are
  any, {} after loading when there are none). Files written before those EMAs existed read as having none: the
  key is optional within format 1.
"""
from __future__ import annotations

from typing import Any

from dmd2.config.errors import FormatError
from dmd2.config.settings import ARCH_SETTINGS
from dmd2.io.weights import complete_arch

CHECKPOINT_FORMAT = 1  # 0: the layouts before checkpoints carried a version
SIGMA_DATA = 0.5  # EDM's sigma_data, which every checkpoint without its own was trained with
UPDATERS = {"teacher": ("updater",), "dmd2": ("generator_updater", "guidance_updater")}
OLD_SCHEDULERS = ("scheduler", "generator_scheduler", "guidance_scheduler")  # the warm-up is a function of the step


def _updater_state(old: Any) -> Any:
    """An updater's state from the bare optimizer state written before the updater existed."""
    return {"optimizer": old, "skipped": 0} if isinstance(old, dict) and "param_groups" in old else old


def upgrade_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """Bring a checkpoint of an older layout (no ``format``) to the current one (see the module doc). Only what is
    missing is filled in; nothing present is checked here (the loaders check what they use)."""
    state.setdefault("config", {})
    config = state["config"] if isinstance(state["config"], dict) else {}
    state.setdefault("sigma_data", SIGMA_DATA)
    for key in ("class_names", "wandb_run_id"):
        state.setdefault(key, None)
    arch = state.get("arch")
    if isinstance(arch, dict) and arch.get("name") in ARCH_SETTINGS and all(isinstance(k, str) for k in arch):
        state["arch"] = complete_arch(arch)
    if "rng" in state:
        state.setdefault("rng_ranks", [state["rng"]])
        for key, empty in (("batch_rng", None), ("evaluation", None), ("metrics", {})):
            state.setdefault(key, empty)
    for name in UPDATERS[state["kind"]]:
        old = name.replace("updater", "optimizer")
        if old in state and name not in state:
            state[name] = _updater_state(state.pop(old))
    for key in OLD_SCHEDULERS:
        state.pop(key, None)
    if state["kind"] == "dmd2":
        state.setdefault("teacher_sha256", None)
        if "denoising_sigmas" not in state and "conditioning_sigma" in state:
            state["denoising_sigmas"] = [state["conditioning_sigma"]]
        if "generator_ema" not in state and "generator" in state and config.get("generator_ema_decay") is not None:
            state["generator_ema"] = state["generator"]
    state["format"] = CHECKPOINT_FORMAT
    return with_optional_keys(state)


def with_optional_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Fill in the keys a current checkpoint may leave out: a dmd2 checkpoint's ``generator_emas`` ({} = none)."""
    if state["kind"] == "dmd2":
        state.setdefault("generator_emas", {})
    return state


def current_layout(state: dict[str, Any], path: str) -> dict[str, Any]:
    """``state`` (a checkpoint just read, its ``kind`` checked) in the current layout: upgraded when older,
    refused when written by a newer version of this project."""
    version = state.get("format")
    if version is None:
        return upgrade_checkpoint(state)
    if version != CHECKPOINT_FORMAT:
        raise FormatError(f"{path}: checkpoint format {version!r}; this version of dmd2 reads format "
                              f"{CHECKPOINT_FORMAT} and upgrades older ones (a newer dmd2 wrote it?)")
    return with_optional_keys(state)
