"""The sample grids of a run: fixed noise and labels (one row per class), drawn from the seed alone, so the grids of
every step (and of a resumed run) show the same noise."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dmd2.io.sampler import grid_labels
from dmd2.method.randomness import GRID_NOISE_OFFSET, torch_generator
from dmd2.method.samplers import heun_nfe, heun_sample, heun_sampler_sigmas
from dmd2.train.logger import RunLogger


@torch.no_grad()
def teacher_samples(teacher: nn.Module, noise: Tensor, labels: Tensor, steps: int) -> Tensor:
    """Heun samples [B,3,R,R] in [-1, 1] of a teacher from fixed noise [B,3,R,R] and labels [B]."""
    return heun_sample(teacher, noise, labels, heun_sampler_sigmas(steps).to(noise.device))


class SampleGrids:
    """Noise z [S,N,3,R,R] (S = the generator's chain length; 1 for a teacher) and labels y [N] of the grids, and
    how they are logged (``per_class`` images per row)."""

    def __init__(self, seed: int, num_classes: int, resolution: int, per_class: int, num_chain: int,
                 classes: list[str] | None, device: torch.device) -> None:
        self.per_class, self.classes = per_class, classes
        self.y = grid_labels(num_classes, per_class, device)
        z = torch.randn(num_chain, len(self.y), 3, resolution, resolution, generator=torch_generator(seed + GRID_NOISE_OFFSET))
        self.z = z.to(device)

    def log(self, logger: RunLogger, key: str, images: Tensor, step: int, caption: str) -> None:
        logger.log_samples(key, images, self.y, self.classes, self.per_class, step, caption)

    def log_teacher(self, logger: RunLogger, key: str, teacher: nn.Module, steps: int, step: int, what: str) -> None:
        """Heun samples of ``teacher`` (``steps`` steps) from the first noise draw."""
        self.log(logger, key, teacher_samples(teacher, self.z[0], self.y, steps), step,
                 f"{what}, Heun {heun_nfe(steps)} NFE")
