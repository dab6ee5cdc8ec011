"""GuidanceModel: the frozen teacher (real score), the trainable fake score network and the optional GAN head.

It owns the DMD2 timestep table and draws the noise levels of all of its losses.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from dmd2.diffusion import dmd_timestep_sigmas
from dmd2.losses import distribution_matching_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss
from dmd2.networks import EDMPrecond
from dmd2.networks.gan_head import GANHead


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
    [0, diffusion_gan_max_timestep) (or sigma_min without diffusion-GAN).
    """

    def __init__(
        self, teacher: EDMPrecond, num_train_timesteps: int = 1000, min_step_percent: float = 0.02,
        max_step_percent: float = 0.98, gan_classifier: bool = False, diffusion_gan: bool = True,
        diffusion_gan_max_timestep: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0,
    ) -> None:
        super().__init__()
        self.real_unet = teacher.eval().requires_grad_(False)
        self.fake_unet = copy.deepcopy(teacher).train().requires_grad_(True)
        self.sigma_data = teacher.sigma_data
        self.register_buffer("sigmas", dmd_timestep_sigmas(num_train_timesteps, sigma_min, sigma_max))
        self.min_step = int(min_step_percent * num_train_timesteps)
        self.max_step = min(int(max_step_percent * num_train_timesteps), num_train_timesteps - 1)
        net = teacher.net
        self.gan_head = GANHead(net.bottleneck_channels, net.bottleneck_resolution) if gan_classifier else None
        self.diffusion_gan = diffusion_gan
        self.diffusion_gan_max_timestep = diffusion_gan_max_timestep

    def train(self, mode: bool = True) -> "GuidanceModel":
        super().train(mode)
        self.real_unet.eval()  # the teacher never leaves eval mode (no dropout)
        return self

    def trainable(self) -> list[nn.Parameter]:
        """What the guidance optimizer updates: the fake score network and the GAN head (never the teacher)."""
        head = list(self.gan_head.parameters()) if self.gan_head is not None else []
        return list(self.fake_unet.parameters()) + head

    def dm_loss(self, x: Tensor, class_labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Distribution matching loss for generator samples x [B,C,H,W]; logs hold the timesteps and |grad|."""
        t = torch.randint(self.min_step, self.max_step + 1, (x.shape[0],), device=x.device)
        loss, grad = distribution_matching_loss(
            x, self.real_unet, self.fake_unet, self.sigmas[t], class_labels, torch.randn_like(x)
        )
        return loss, {"dm_timesteps": t, "dm_grad_norm": grad.flatten(1).norm(dim=1).mean()}

    def fake_loss(self, x: Tensor, class_labels: Tensor) -> Tensor:
        """Fake-score denoising loss on (detached) generator samples x [B,C,H,W]."""
        t = torch.randint(0, len(self.sigmas), (x.shape[0],), device=x.device)
        return fake_score_loss(self.fake_unet, x, self.sigmas[t], class_labels, torch.randn_like(x), self.sigma_data)

    def gan_logits(self, x: Tensor, class_labels: Tensor) -> Tensor:
        """Classifier logits [B] for images x [B,C,H,W], noised first when diffusion-GAN is on."""
        assert self.gan_head is not None, "gan_logits needs gan_classifier=true"
        if self.diffusion_gan:
            t = torch.randint(0, self.diffusion_gan_max_timestep, (x.shape[0],), device=x.device)
        else:
            t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        sigma = self.sigmas[t]
        _, features = self.fake_unet(x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x), sigma, class_labels,
                                     return_bottleneck=True)
        return self.gan_head(features)

    def generator_gan_loss(self, x: Tensor, class_labels: Tensor) -> Tensor:
        """Generator-side GAN loss; gradients reach x only, never the fake score network or the head."""
        with frozen(self.fake_unet, self.gan_head):
            return gan_generator_loss(self.gan_logits(x, class_labels))

    def classifier_loss(self, fake: Tensor, real: Tensor, class_labels: Tensor, real_labels: Tensor) -> Tensor:
        """Classifier loss on detached generator samples and dataset images (one batched forward)."""
        logits = self.gan_logits(torch.cat([real, fake.detach()]), torch.cat([real_labels, class_labels]))
        return gan_discriminator_loss(logits[: real.shape[0]], logits[real.shape[0]:])
