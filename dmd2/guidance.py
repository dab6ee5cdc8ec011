"""GuidanceModel: the frozen teacher (real score), the trainable fake score network and the optional GAN head.

It owns the DMD2 timestep table and draws the noise levels of all of its losses.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from dmd2.diffusion import SIGMA_MAX, SIGMA_MIN, dmd_timestep_sigmas, weighted_denoising_error
from dmd2.randomness import GLOBAL_RNG, BatchRNG
from dmd2.losses import distribution_matching_loss, gan_discriminator_loss, gan_generator_loss
from dmd2.networks import EDMPrecond, set_dropout
from dmd2.networks.gan_head import GANHead
from dmd2.settings import DistillSettings


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

    def __init__(self, teacher: EDMPrecond, settings: DistillSettings) -> None:
        """``settings``: the distill stage's (a composed config or a ``DistillSettings``); this reads
        num_train_timesteps, min/max_step_percent, gan_classifier, cls_loss_weight, diffusion_gan(_max_timestep)
        and dropout."""
        super().__init__()
        self.real_unet = teacher.eval().requires_grad_(False)
        self.fake_unet = copy.deepcopy(teacher).train().requires_grad_(True)
        if settings.dropout is not None:
            set_dropout(self.fake_unet, settings.dropout)
        self.sigma_data = teacher.sigma_data
        num_timesteps = settings.num_train_timesteps
        self.register_buffer("sigmas", dmd_timestep_sigmas(num_timesteps, SIGMA_MIN, SIGMA_MAX))
        self.min_step = int(settings.min_step_percent * num_timesteps)
        self.max_step = min(int(settings.max_step_percent * num_timesteps), num_timesteps - 1)
        net = teacher.net
        self.gan_head = (GANHead(net.bottleneck_channels, net.bottleneck_resolution) if settings.gan_classifier
                         else None)
        self.diffusion_gan = settings.diffusion_gan
        self.diffusion_gan_max_timestep = settings.diffusion_gan_max_timestep
        self.cls_loss_weight = settings.cls_loss_weight

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
        return loss, {"dm_timesteps": t, "dm_grad_norm": grad.flatten(1).norm(dim=1).mean()}

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
            _, features = self.fake_unet(x_t, sigma, class_labels, return_bottleneck=True, decode_first=0)
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
        denoised, features = self.fake_unet(torch.cat(noisy), torch.cat(sigmas), torch.cat(labels),
                                            return_bottleneck=True, decode_first=n)
        loss = weighted_denoising_error(denoised[:n], x, sigma, self.sigma_data)
        logs = {"loss_fake": loss.detach()}
        if self.gan_head is not None:
            logits = self.gan_head(features[n:])
            cls = gan_discriminator_loss(logits[: real.shape[0]], logits[real.shape[0]:])  # type: ignore[union-attr]
            logs["loss_cls"] = cls.detach()
            loss = loss + self.cls_loss_weight * cls
        return loss, logs
