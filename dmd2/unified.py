"""UnifiedModel: the one-step generator and the guidance model, side by side.

The runner calls ``generate`` then ``generator_loss`` (on generator-update steps) and ``guidance_loss``
(every step); it owns the optimizers and the update schedule.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dmd2.diffusion import one_step_sample
from dmd2.guidance import GuidanceModel
from dmd2.networks import EDMPrecond


class UnifiedModel(nn.Module):
    """``generator``: a copy of the teacher used as x = G(z * sigma_c; sigma_c, class). ``guidance``: see GuidanceModel."""

    def __init__(self, teacher: EDMPrecond, conditioning_sigma: float = 80.0, **guidance_kwargs: float) -> None:
        super().__init__()
        self.generator = copy.deepcopy(teacher).train().requires_grad_(True)
        self.guidance = GuidanceModel(teacher, **guidance_kwargs)
        self.conditioning_sigma = conditioning_sigma

    def generate(self, noise: Tensor, class_labels: Tensor) -> Tensor:
        """noise [B,C,H,W] ~ N(0, I), class_labels [B] -> images [B,C,H,W] (grad flows if enabled)."""
        return one_step_sample(self.generator, noise, class_labels, self.conditioning_sigma)

    def generator_loss(self, x: Tensor, class_labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.guidance.dm_loss(x, class_labels)

    def guidance_loss(self, x: Tensor, class_labels: Tensor) -> Tensor:
        return self.guidance.fake_loss(x.detach(), class_labels)

    @torch.no_grad()
    def sample(self, noise: Tensor, class_labels: Tensor) -> Tensor:
        """Generator samples in eval mode (no dropout), restoring the previous mode afterwards."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.generate(noise, class_labels)
        finally:
            self.generator.train(was_training)
