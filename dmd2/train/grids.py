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
        self.teacher: tuple[Tensor, str] | None = None  # the teacher's grid (images, caption), once drawn
        self.y = grid_labels(num_classes, per_class, device)
        z = torch.randn(num_chain, len(self.y), 3, resolution, resolution, generator=torch_generator(seed + GRID_NOISE_OFFSET))
        self.z = z.to(device)

    def log(self, logger: RunLogger, key: str, images: Tensor, step: int, caption: str) -> None:
        logger.log_samples(key, images, self.y, self.classes, self.per_class, step, caption)

    def log_teacher(self, logger: RunLogger, key: str, teacher: nn.Module, steps: int, step: int, what: str) -> None:
        """Heun samples of ``teacher`` (``steps`` steps) from the first noise draw (kept for ``log_beside``)."""
        images = teacher_samples(teacher, self.z[0], self.y, steps)
        self.teacher = (images.detach().cpu(), f"{what}, Heun {heun_nfe(steps)} NFE")
        self.log(logger, key, images, step, self.teacher[1])

    def log_beside(self, logger: RunLogger, key: str, images: Tensor, step: int, caption: str) -> None:
        """The teacher's grid (drawn once, at the start) and ``images`` of the same noise and classes side by side
        in one picture, each titled; nothing before the teacher's grid is drawn."""
        if self.teacher is None or not logger.enabled:
            return
        from dmd2.data.images import to_uint8
        from dmd2.io.pictures import class_rows, labelled_grid, side_by_side

        panels = []
        for shown, title in ((self.teacher[0], self.teacher[1]), (images, f"{caption}, step {step}")):
            rows, names = class_rows(to_uint8(shown.detach().float()).cpu(), self.y.tolist(), self.classes,
                                     self.per_class)
            panels.append(labelled_grid(rows, names if not panels else None, title=title))
        logger.log_picture(key, side_by_side(panels), step, f"teacher | {caption}")
