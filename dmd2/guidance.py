"""GuidanceModel: the frozen teacher (real score) and the trainable fake score network.

It owns the DMD2 timestep table and draws the noise levels of both of its losses.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dmd2.diffusion import dmd_timestep_sigmas
from dmd2.losses import distribution_matching_loss, fake_score_loss
from dmd2.networks import EDMPrecond


class GuidanceModel(nn.Module):
    """``real_unet``: the teacher, frozen (no gradients, eval mode). ``fake_unet``: a trainable copy of it.

    DM-loss timesteps are drawn from [min_step, max_step] = [int(min_pct * T), int(max_pct * T)] of the
    T-entry ascending Karras table; fake-score timesteps from all of it.
    """

    def __init__(
        self, teacher: EDMPrecond, num_train_timesteps: int = 1000, min_step_percent: float = 0.02,
        max_step_percent: float = 0.98, sigma_min: float = 0.002, sigma_max: float = 80.0,
    ) -> None:
        super().__init__()
        self.real_unet = teacher.eval().requires_grad_(False)
        self.fake_unet = copy.deepcopy(teacher).train().requires_grad_(True)
        self.sigma_data = teacher.sigma_data
        self.register_buffer("sigmas", dmd_timestep_sigmas(num_train_timesteps, sigma_min, sigma_max))
        self.min_step = int(min_step_percent * num_train_timesteps)
        self.max_step = min(int(max_step_percent * num_train_timesteps), num_train_timesteps - 1)

    def train(self, mode: bool = True) -> "GuidanceModel":
        super().train(mode)
        self.real_unet.eval()  # the teacher never leaves eval mode (no dropout)
        return self

    def dm_loss(self, x: Tensor, class_labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Distribution matching loss for generator samples x [B,C,H,W]; logs hold the timesteps and |grad|."""
        t = torch.randint(self.min_step, self.max_step + 1, (x.shape[0],), device=x.device)
        sigma = self.sigmas[t]
        loss, grad = distribution_matching_loss(
            x, self.real_unet, self.fake_unet, sigma, class_labels, torch.randn_like(x)
        )
        return loss, {"dm_timesteps": t, "dm_grad_norm": grad.flatten(1).norm(dim=1).mean()}

    def fake_loss(self, x: Tensor, class_labels: Tensor) -> Tensor:
        """Fake-score denoising loss on (detached) generator samples x [B,C,H,W]."""
        t = torch.randint(0, len(self.sigmas), (x.shape[0],), device=x.device)
        return fake_score_loss(self.fake_unet, x, self.sigmas[t], class_labels, torch.randn_like(x), self.sigma_data)
