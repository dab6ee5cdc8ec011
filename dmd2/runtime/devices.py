"""The device a run uses: ``device=auto|cpu|cuda[:N]``, checked before anything is built."""
from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from dmd2.config.errors import ConfigError

if TYPE_CHECKING:
    import torch


def check_device(cfg: DictConfig) -> None:
    import torch

    device = cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' = {device!r}: CUDA is not available on this machine")


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
