"""UnifiedModel: the generator and the guidance model, side by side, and the two DMD2 losses.

The runner's steps (dmd2/train/distill.py) call the generator, then ``generator_loss`` (on generator-update
steps) and the guidance model's loss (every step); they own the optimizers and the update schedule.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dmd2.method.guidance import DM_GRAD_NORM, GuidanceModel
from dmd2.method.health import GAN_GRAD_NORM, GRAD_RATIO, balance_ratio, per_sample_gradient_norms
from dmd2.method.randomness import GLOBAL_RNG, BatchRNG
from dmd2.method.samplers import backward_simulation, multistep_sample

LOSS_DM = "loss_dm"                # the distribution matching loss (generator_loss)
LOSS_GEN_GAN = "loss_gen_gan"      # the generator's GAN loss (generator_loss, with the GAN head)


def generator_logs(gan: bool) -> tuple[str, ...]:
    """The scalars the generator's loss (``UnifiedModel.generator_loss``) logs."""
    return (LOSS_DM, DM_GRAD_NORM, LOSS_GEN_GAN, GAN_GRAD_NORM, GRAD_RATIO) if gan else (LOSS_DM, DM_GRAD_NORM)


class UnifiedModel(nn.Module):
    """``generator``: a denoiser mapping noise to images in len(denoising_sigmas) steps (one step:
    x = G(z * sigma_c; sigma_c, class)), trained here. ``guidance``: see GuidanceModel. ``gen_cls_loss_weight``:
    the weight of the generator's GAN loss (used when the guidance model has a GAN head).
    """

    def __init__(self, generator: nn.Module, guidance: GuidanceModel, denoising_sigmas: Sequence[float],
                 gen_cls_loss_weight: float) -> None:
        super().__init__()
        self.generator = generator.train().requires_grad_(True)
        self.guidance = guidance
        self.denoising_sigmas = [float(s) for s in denoising_sigmas]
        self.gen_cls_loss_weight = gen_cls_loss_weight

    @property
    def num_steps(self) -> int:
        return len(self.denoising_sigmas)

    def generate(self, noise: Tensor, class_labels: Tensor, k: int = 0) -> Tensor:
        """noise [S,B,C,H,W] (S = num_steps), labels [B] -> the generator's output at step k [B,C,H,W]
        (backward simulation; only the last evaluation carries gradient, if enabled)."""
        return backward_simulation(self.generator, noise, class_labels, self.denoising_sigmas, k)

    def generator_loss(self, x: Tensor, class_labels: Tensor, rng: BatchRNG = GLOBAL_RNG
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """DM loss (+ weighted generator GAN loss when the GAN head or the teacher-feature discriminator exists).
        Returns (loss, logs)."""
        if self.guidance.discriminator is not None:  # FastGen: the GAN loss sees the DM loss's noisy input
            draw = self.guidance.dm_draw(x, rng)
            loss, logs = self.guidance.dm_loss(x, class_labels, rng, draw)
            logs[LOSS_DM] = loss.detach()
            gan = self.guidance.feature_gan_generator_loss(x, draw, class_labels)
            logs[LOSS_GEN_GAN] = gan.detach()
            logs.update(self.gradient_balance(gan, x, logs[DM_GRAD_NORM]))
            return loss + self.gen_cls_loss_weight * gan, logs
        loss, logs = self.guidance.dm_loss(x, class_labels, rng)
        logs[LOSS_DM] = loss.detach()
        if self.guidance.gan_head is not None:
            gan = self.guidance.generator_gan_loss(x, class_labels, rng)
            logs[LOSS_GEN_GAN] = gan.detach()
            logs.update(self.gradient_balance(gan, x, logs[DM_GRAD_NORM]))
            loss = loss + self.gen_cls_loss_weight * gan
        return loss, logs

    def gradient_balance(self, gan: Tensor, x: Tensor, dm_norm: Tensor) -> dict[str, Tensor]:
        """The GAN loss's gradient at the generated images x [B,C,H,W] in the DM gradient's units (its mean
        per-sample norm) and its ratio to ``dm_grad_norm``, the weight included (dmd2.method.health). Only when x
        carries a graph (a generator update); no random draw, no parameter gradient."""
        if not x.requires_grad:
            return {}
        gan_norm = per_sample_gradient_norms(gan, x).mean()
        return {GAN_GRAD_NORM: gan_norm, GRAD_RATIO: balance_ratio(self.gen_cls_loss_weight, gan_norm, dm_norm)}

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
