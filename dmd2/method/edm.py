"""EDM (Karras et al. 2022) noise schedule, preconditioning, training loss and Heun sampler.

Every network in this project (teacher, fake score, generator) is an EDM denoiser
``D(x; sigma, class) = c_skip * x + c_out * F(c_in * x; c_noise, class)`` that predicts the clean
image x0. Data live in [-1, 1] with ``sigma_data = 0.5``. All functions here are pure: randomness
comes in through explicit tensors or ``torch.Generator`` arguments.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# A denoiser maps (x [B,C,H,W], sigma [B], class_labels [B]) -> x0 estimate [B,C,H,W].
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]

# EDM's noise range and schedule curvature (Karras et al. 2022, Table 1), used by every stage.
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def karras_sigmas(
    n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> Tensor:
    """Karras et al. (2022) eq. 5: ``n`` noise levels, descending from sigma_max to sigma_min.

    Returns a float64 tensor [n]; ``n == 1`` gives ``[sigma_max]``.
    """
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1, got {n}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    inv_rho = 1.0 / rho
    ramp = sigma_max**inv_rho + i / (n - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)
    return ramp**rho


def dmd_timestep_sigmas(
    num_timesteps: int = 1000, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> Tensor:
    """The DMD2 timestep table: Karras sigmas in ascending order, so index t=0 is sigma_min.

    Returns float32 [num_timesteps].
    """
    return karras_sigmas(num_timesteps, sigma_min, sigma_max, rho).flip(0).float()


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1) for noise levels ``sigma`` [...].

    Returns (c_skip, c_out, c_in, c_noise), each shaped like ``sigma``.
    """
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1.0 / (sigma**2 + sd2).sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2, shaped like ``sigma``.

    It equals ``1/sigma^2 + 1/sd^2``, the "snr + 1/sd^2" weight of DMD2's fake score loss.
    """
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_sigma(normal: Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """Standard normal draws [B] -> EDM training noise levels exp(p_mean + p_std * normal) [B]."""
    return (normal * p_std + p_mean).exp()


