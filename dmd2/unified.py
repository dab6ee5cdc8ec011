"""UnifiedModel: the generator and the guidance model, side by side, and the two DMD2 losses.

The runner's steps (dmd2/runners/distill.py) call the generator, then ``generator_loss`` (on generator-update
steps) and the guidance model's loss (every step); they own the optimizers and the update schedule.
"""
from __future__ import annotations

import copy
import torch
from torch import Tensor, nn

from dmd2.diffusion import backward_simulation, multistep_sample
from dmd2.randomness import GLOBAL_RNG, BatchRNG
from dmd2.guidance import GuidanceModel
from dmd2.networks import EDMPrecond, set_dropout
from dmd2.settings import DistillSettings


class UnifiedModel(nn.Module):
    """``generator``: a copy of the teacher mapping noise to images in len(denoising_sigmas) steps
    (one step: x = G(z * sigma_c; sigma_c, class)). ``guidance``: see GuidanceModel. ``settings``: the distill
    stage's (a composed config or a ``DistillSettings``): denoising_sigmas / conditioning_sigma,
    gen_cls_loss_weight, dropout (of the generator and the fake score network; None keeps the teacher's, which
    itself always runs without) and the guidance model's.
    """

    def __init__(self, teacher: EDMPrecond, settings: DistillSettings) -> None:
        super().__init__()
        self.generator = copy.deepcopy(teacher).train().requires_grad_(True)
        if settings.dropout is not None:
            set_dropout(self.generator, settings.dropout)
        self.guidance = GuidanceModel(teacher, settings)
        self.denoising_sigmas = [float(s) for s in (settings.denoising_sigmas or [settings.conditioning_sigma])]
        self.gen_cls_loss_weight = settings.gen_cls_loss_weight

    @property
    def num_steps(self) -> int:
        return len(self.denoising_sigmas)

    def generate(self, noise: Tensor, class_labels: Tensor, k: int = 0) -> Tensor:
        """noise [S,B,C,H,W] (S = num_steps), labels [B] -> the generator's output at step k [B,C,H,W]
        (backward simulation; only the last evaluation carries gradient, if enabled)."""
        return backward_simulation(self.generator, noise, class_labels, self.denoising_sigmas, k)

    def generator_loss(self, x: Tensor, class_labels: Tensor, rng: BatchRNG = GLOBAL_RNG
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """DM loss (+ weighted generator GAN loss when the GAN head exists). Returns (loss, logs)."""
        loss, logs = self.guidance.dm_loss(x, class_labels, rng)
        logs["loss_dm"] = loss.detach()
        if self.guidance.gan_head is not None:
            gan = self.guidance.generator_gan_loss(x, class_labels, rng)
            logs["loss_gen_gan"] = gan.detach()
            loss = loss + self.gen_cls_loss_weight * gan
        return loss, logs

    @torch.no_grad()
    def sample(self, noise: Tensor, class_labels: Tensor, generator: nn.Module | None = None) -> Tensor:
        """Full-chain samples in eval mode (no dropout) from ``generator`` (default: the trained one)."""
        net = generator if generator is not None else self.generator
        was_training = net.training
        net.eval()
        try:
            return multistep_sample(net, noise, class_labels, self.denoising_sigmas)
        finally:
            net.train(was_training)
