"""GuidanceModel: the frozen teacher (real score), the trainable fake score network and the optional GAN head.

It owns the DMD2 timestep table and draws the noise levels of all of its losses.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from dmd2.method.losses import distribution_matching_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss
from dmd2.method.randomness import GLOBAL_RNG, BatchRNG

# The names of what the losses below log (the training loop logs each as train/<name>): scalars are averaged over a
# log interval, the timesteps (a vector) become a histogram.
LOSS_FAKE = "loss_fake"            # the fake score network's denoising loss (forward)
LOSS_CLS = "loss_cls"              # the GAN classifier's loss (forward, with the GAN head)
DM_GRAD_NORM = "dm_grad_norm"      # the mean per-sample norm of the DM gradient (dm_loss)
DM_TIMESTEPS = "dm_timesteps"      # the DM loss's timesteps (dm_loss; a histogram)


def guidance_logs(gan: bool) -> tuple[str, ...]:
    """The scalars the guidance loss (``GuidanceModel.forward``) logs."""
    return (LOSS_FAKE, LOSS_CLS) if gan else (LOSS_FAKE,)


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
                 sigma_data: float) -> None:
        """``real_unet``: the teacher (frozen here); ``fake_unet``: its trainable copy; ``gan_head``: the
        classifier on ``fake_unet``'s bottleneck, or None. ``sigmas`` [T]: the ascending timestep table;
        ``dm_steps`` = (min_step, max_step): the DM loss's timestep range, inclusive; ``gan_max_timestep``: the
        diffusion-GAN's timesteps [0, gan_max_timestep), None for clean images; ``cls_loss_weight``: the
        classifier loss's weight in the guidance loss; ``sigma_data``: the fake score loss's EDM weighting."""
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

    def train(self, mode: bool = True) -> "GuidanceModel":
        super().train(mode)
        self.real_unet.eval()  # the teacher never leaves eval mode (no dropout)
        return self

    def trainable(self) -> list[nn.Parameter]:
        """What the guidance optimizer updates: the fake score network and the GAN head (never the teacher)."""
        head = list(self.gan_head.parameters()) if self.gan_head is not None else []
        return list(self.fake_unet.parameters()) + head

    def dm_loss(self, x: Tensor, class_labels: Tensor, rng: BatchRNG = GLOBAL_RNG) -> tuple[Tensor, dict[str, Tensor]]:
        """Distribution matching loss for generator samples x [B,C,H,W]; logs hold the timesteps and |grad|."""
        t = rng.randint(self.min_step, self.max_step + 1, x.shape[0]).to(x.device)
        loss, grad = distribution_matching_loss(
            x, self.real_unet, self.fake_unet, self.sigmas[t], class_labels, rng.randn_like(x)
        )
        return loss, {DM_TIMESTEPS: t, DM_GRAD_NORM: grad.flatten(1).norm(dim=1).mean()}

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
        sigma = self.sigmas[rng.randint(0, len(self.sigmas), n).to(x.device)]
        noisy, sigmas, labels = [x + sigma.view(-1, 1, 1, 1) * rng.randn_like(x)], [sigma], [class_labels]
        if self.gan_head is not None:
            if real is None or real_labels is None:
                raise ValueError("the GAN classifier needs real images and their labels")
            for images, y in ((real, real_labels), (x, class_labels)):
                images_t, s = self.gan_noise(images, rng)
                noisy.append(images_t), sigmas.append(s), labels.append(y)
        # the classifier needs only bottleneck features: the decoder runs on the first n (denoising) samples
        denoised, features = self.fake_unet.denoise_first(torch.cat(noisy), torch.cat(sigmas), torch.cat(labels), n)
        loss = fake_score_loss(denoised[:n], x, sigma, self.sigma_data)
        logs = {LOSS_FAKE: loss.detach()}
        if self.gan_head is not None:
            logits = self.gan_head(features[n:])
            cls = gan_discriminator_loss(logits[: real.shape[0]], logits[real.shape[0]:])  # type: ignore[union-attr]
            logs[LOSS_CLS] = cls.detach()
            loss = loss + self.cls_loss_weight * cls
        return loss, logs
