"""GuidanceModel: the frozen teacher (real score), the trainable fake score network and the optional GAN head.

It owns the DMD2 timestep table and draws the noise levels of all of its losses.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from dmd2.method.losses import (distribution_matching_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss,
                                r1_penalty)
from dmd2.method.randomness import GLOBAL_RNG, BatchRNG

# The names of what the losses below log (the training loop logs each as train/<name>): scalars are averaged over a
# log interval, the timesteps (a vector) become a histogram.
LOSS_FAKE = "loss_fake"            # the fake score network's denoising loss (forward)
LOSS_CLS = "loss_cls"              # the GAN classifier's loss (forward, with the GAN head)
DM_GRAD_NORM = "dm_grad_norm"      # the mean per-sample norm of the DM gradient (dm_loss)
DM_TIMESTEPS = "dm_timesteps"      # the DM loss's timesteps (dm_loss; a histogram)
LOSS_R1 = "loss_r1"                # the discriminator's R1 penalty (forward, with r1_weight > 0)


def guidance_logs(gan: bool, r1: bool = False) -> tuple[str, ...]:
    """The scalars the guidance loss (``GuidanceModel.forward``) logs."""
    return (LOSS_FAKE,) + ((LOSS_CLS,) if gan else ()) + ((LOSS_R1,) if gan and r1 else ())


@dataclass(frozen=True)
class LossChoices:
    """How the guidance losses draw their noise and weigh their errors, where the official DMD2 and FastGen's
    recipe differ (official: fake_steps None, fake_weighting "edm", dm_eps 0, r1_weight 0)."""

    fake_steps: tuple[int, int] | None  # the fake score loss's timesteps, inclusive range; None: the whole table
    fake_weighting: str                 # "edm" (lambda(sigma)) | "none" (plain x0 MSE)
    dm_eps: float                       # added to the DM gradient's normaliser
    r1_weight: float                    # the discriminator's R1 penalty (teacher-feature discriminator only)
    r1_alpha: float                     # its perturbation of the real images
    flip_dm: bool = False               # a broken control: the DM gradient's sign flipped (dm_gradient_sign=-1)


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Temporarily stop the trainable parameters of ``modules`` from receiving gradients.

    Only parameters that were trainable are switched back on afterwards, so a frozen teacher stays frozen.
    """
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class GuidanceModel(nn.Module):
    """``real_unet``: the teacher, frozen (no gradients, eval mode). ``fake_unet``: a trainable copy of it.
    ``gan_head`` (optional): real/fake classifier on ``fake_unet``'s bottleneck features.

    DM-loss timesteps are drawn from [min_step, max_step] = [int(min_pct * T), int(max_pct * T)] of the
    T-entry ascending Karras table; fake-score timesteps from all of it; diffusion-GAN timesteps from
    [0, diffusion_gan_max_timestep) (or sigma_min without diffusion-GAN). Calling the module computes the
    guidance update's loss (``forward``); the generator's losses are ``dm_loss`` and ``generator_gan_loss``.
    Every draw comes from ``rng`` (the run's ``BatchRNG``: per-sample draws independent of the process count;
    by default the global RNG).
    """

    def __init__(self, real_unet: nn.Module, fake_unet: nn.Module, gan_head: nn.Module | None, sigmas: Tensor,
                 dm_steps: tuple[int, int], gan_max_timestep: int | None, cls_loss_weight: float,
                 sigma_data: float, choices: LossChoices, discriminator: nn.Module | None) -> None:
        """``real_unet``: the teacher (frozen here); ``fake_unet``: its trainable copy; ``gan_head``: the
        classifier on ``fake_unet``'s bottleneck, or None. ``sigmas`` [T]: the ascending timestep table;
        ``dm_steps`` = (min_step, max_step): the DM loss's timestep range, inclusive; ``gan_max_timestep``: the
        diffusion-GAN's timesteps [0, gan_max_timestep), None for clean images; ``cls_loss_weight``: the
        classifier loss's weight in the guidance loss; ``sigma_data``: the fake score loss's EDM weighting;
        ``choices``: see LossChoices. ``discriminator`` (FastGen's, instead of ``gan_head``): heads on the frozen
        teacher's encoder features at ``discriminator.resolutions``; real images are noised at an independent
        timestep of the DM range, fakes seen at the loss's own noisy input."""
        super().__init__()
        self.real_unet = real_unet.eval().requires_grad_(False)
        self.fake_unet = fake_unet.train().requires_grad_(True)
        self.gan_head = gan_head
        self.register_buffer("sigmas", sigmas)
        self.min_step, self.max_step = dm_steps
        self.diffusion_gan = gan_max_timestep is not None
        self.diffusion_gan_max_timestep = gan_max_timestep
        self.cls_loss_weight = cls_loss_weight
        self.sigma_data = sigma_data
        self.choices = choices
        self.discriminator = discriminator
        if gan_head is not None and discriminator is not None:
            raise ValueError("one GAN classifier: the fake score network's head or the teacher-feature discriminator")

    def train(self, mode: bool = True) -> "GuidanceModel":
        super().train(mode)
        self.real_unet.eval()  # the teacher never leaves eval mode (no dropout)
        return self

    def trainable(self) -> list[nn.Parameter]:
        """What the guidance optimizer updates: the fake score network and the GAN head (never the teacher); the
        discriminator's parameters are ``discriminator_params`` (their own learning rate)."""
        head = list(self.gan_head.parameters()) if self.gan_head is not None else []
        return list(self.fake_unet.parameters()) + head

    def discriminator_params(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters()) if self.discriminator is not None else []

    def dm_draw(self, x: Tensor, rng: BatchRNG = GLOBAL_RNG) -> tuple[Tensor, Tensor]:
        """The DM loss's timesteps t [B] ~ U{min_step .. max_step} and noise like x [B,C,H,W], in that order."""
        t = rng.randint(self.min_step, self.max_step + 1, x.shape[0]).to(x.device)
        return t, rng.randn_like(x)

    def dm_loss(self, x: Tensor, class_labels: Tensor, rng: BatchRNG = GLOBAL_RNG,
                draw: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Distribution matching loss for generator samples x [B,C,H,W] (at ``draw`` = (t, noise), by default a
        fresh ``dm_draw``); logs hold the timesteps and |grad|."""
        t, noise = draw if draw is not None else self.dm_draw(x, rng)
        loss, grad = distribution_matching_loss(
            x, self.real_unet, self.fake_unet, self.sigmas[t], class_labels, noise, self.choices.dm_eps,
            self.choices.flip_dm
        )
        return loss, {DM_TIMESTEPS: t, DM_GRAD_NORM: grad.flatten(1).norm(dim=1).mean()}

    def teacher_logits(self, x_t: Tensor, sigma: Tensor, class_labels: Tensor) -> Tensor:
        """The teacher-feature discriminator's logits [B,K] for noisy images x_t at sigma [B]."""
        assert self.discriminator is not None
        return self.discriminator(self.real_unet.features(x_t, sigma, class_labels, self.discriminator.resolutions))

    def feature_gan_generator_loss(self, x: Tensor, draw: tuple[Tensor, Tensor], class_labels: Tensor) -> Tensor:
        """The generator's GAN loss against the teacher-feature discriminator, at the DM loss's noisy input
        (``draw`` = (t, noise)); gradients reach x through the frozen teacher's encoder, never the discriminator."""
        t, noise = draw
        sigma = self.sigmas[t]
        with frozen(self.discriminator):
            return gan_generator_loss(self.teacher_logits(x + sigma.view(-1, 1, 1, 1) * noise, sigma, class_labels))

    def discriminator_loss(self, x_t: Tensor, sigma: Tensor, class_labels: Tensor, real: Tensor, real_labels: Tensor,
                           rng: BatchRNG) -> tuple[Tensor, dict[str, Tensor]]:
        """The teacher-feature discriminator's loss: fakes at the fake score loss's noisy input x_t [B,C,H,W]
        (sigma [B]), real images [B',C,H,W] at an independent DM-range timestep and noise; with ``r1_weight``, plus
        the approximate R1 penalty on the real images perturbed by ``r1_alpha`` noise. Draws: t, noise, (R1 noise)."""
        t_real = rng.randint(self.min_step, self.max_step + 1, real.shape[0]).to(real.device)
        s_real = self.sigmas[t_real]
        real_t = real + s_real.view(-1, 1, 1, 1) * rng.randn_like(real)
        with torch.no_grad():  # the teacher's features; gradients reach the discriminator only
            feats_real = self.real_unet.features(real_t, s_real, real_labels, self.discriminator.resolutions)
            feats_fake = self.real_unet.features(x_t, sigma, class_labels, self.discriminator.resolutions)
        logits_real = self.discriminator(feats_real)
        loss = gan_discriminator_loss(logits_real, self.discriminator(feats_fake))
        logs = {LOSS_CLS: loss.detach()}
        if self.choices.r1_weight > 0:
            perturbed = real + self.choices.r1_alpha * rng.randn_like(real)
            with torch.no_grad():
                feats_perturbed = self.real_unet.features(perturbed, s_real, real_labels, self.discriminator.resolutions)
            r1 = r1_penalty(logits_real, self.discriminator(feats_perturbed))
            logs[LOSS_R1] = r1.detach()
            loss = loss + self.choices.r1_weight * r1
        return loss, logs

    def gan_noise(self, x: Tensor, rng: BatchRNG = GLOBAL_RNG) -> tuple[Tensor, Tensor]:
        """The classifier's view of images x [B,C,H,W] and the noise level it is told, sigma [B]. Diffusion-GAN:
        (x + sigma * noise, sigma) with sigma = sigmas[t], t ~ U{0 .. diffusion_gan_max_timestep-1}. Without it:
        the clean images x, conditioned on sigmas[0] = sigma_min (the network's input needs a positive sigma)."""
        if not self.diffusion_gan:
            return x, self.sigmas[0].expand(x.shape[0])
        sigma = self.sigmas[rng.randint(0, self.diffusion_gan_max_timestep, x.shape[0]).to(x.device)]
        return x + sigma.view(-1, 1, 1, 1) * rng.randn_like(x), sigma

    def generator_gan_loss(self, x: Tensor, class_labels: Tensor, rng: BatchRNG = GLOBAL_RNG) -> Tensor:
        """Generator-side GAN loss; gradients reach x only, never the fake score network or the head."""
        assert self.gan_head is not None, "the generator GAN loss needs gan_classifier=true"
        x_t, sigma = self.gan_noise(x, rng)
        with frozen(self.fake_unet, self.gan_head):
            _, features = self.fake_unet.denoise_first(x_t, sigma, class_labels, 0)
            return gan_generator_loss(self.gan_head(features))

    def forward(self, x: Tensor, class_labels: Tensor, real: Tensor | None = None, real_labels: Tensor | None = None,
                rng: BatchRNG = GLOBAL_RNG) -> tuple[Tensor, dict[str, Tensor]]:
        """The guidance loss in one forward of ``fake_unet`` (one forward per backward, as DDP requires).

        x [B,C,H,W] generator samples (detached here), labels [B]. Fake-score denoising loss at t ~ U{0..T-1};
        with the GAN head, plus ``cls_loss_weight`` times the classifier loss on noised real images [B',C,H,W]
        and x, whose bottleneck features come from the same batched forward. Returns (loss, logs)."""
        x = x.detach()
        n = x.shape[0]
        lo, hi = self.choices.fake_steps or (0, len(self.sigmas) - 1)
        sigma = self.sigmas[rng.randint(lo, hi + 1, n).to(x.device)]
        noisy, sigmas, labels = [x + sigma.view(-1, 1, 1, 1) * rng.randn_like(x)], [sigma], [class_labels]
        if self.discriminator is not None:
            return self.teacher_feature_critic(x, noisy[0], sigma, class_labels, real, real_labels, rng)
        if self.gan_head is not None:
            if real is None or real_labels is None:
                raise ValueError("the GAN classifier needs real images and their labels")
            for images, y in ((real, real_labels), (x, class_labels)):
                images_t, s = self.gan_noise(images, rng)
                noisy.append(images_t), sigmas.append(s), labels.append(y)
        # the classifier needs only bottleneck features: the decoder runs on the first n (denoising) samples
        denoised, features = self.fake_unet.denoise_first(torch.cat(noisy), torch.cat(sigmas), torch.cat(labels), n)
        loss = fake_score_loss(denoised[:n], x, sigma, self.sigma_data, self.choices.fake_weighting)
        logs = {LOSS_FAKE: loss.detach()}
        if self.gan_head is not None:
            logits = self.gan_head(features[n:])
            cls = gan_discriminator_loss(logits[: real.shape[0]], logits[real.shape[0]:])  # type: ignore[union-attr]
            logs[LOSS_CLS] = cls.detach()
            loss = loss + self.cls_loss_weight * cls
        return loss, logs

    def teacher_feature_critic(self, x: Tensor, x_t: Tensor, sigma: Tensor, class_labels: Tensor,
                               real: Tensor | None, real_labels: Tensor | None, rng: BatchRNG
                               ) -> tuple[Tensor, dict[str, Tensor]]:
        """FastGen's critic loss: the fake score loss at x_t (sigma [B]) plus ``cls_loss_weight`` times the
        teacher-feature discriminator's loss, which sees the fakes at the same x_t."""
        if real is None or real_labels is None:
            raise ValueError("the GAN discriminator needs real images and their labels")
        denoised = self.fake_unet(x_t, sigma, class_labels)
        loss = fake_score_loss(denoised, x, sigma, self.sigma_data, self.choices.fake_weighting)
        disc, logs = self.discriminator_loss(x_t, sigma, class_labels, real, real_labels, rng)
        return loss + self.cls_loss_weight * disc, {LOSS_FAKE: loss.detach(), **logs}
