"""EDM (Karras et al. 2022) noise schedule, preconditioning, training loss and Heun sampler.

Every network in this project (teacher, fake score, generator) is an EDM denoiser
``D(x; sigma, class) = c_skip * x + c_out * F(c_in * x; c_noise, class)`` that predicts the clean
image x0. Data live in [-1, 1] with ``sigma_data = 0.5``. All functions here are pure: randomness
comes in through explicit tensors or ``torch.Generator`` arguments.
"""
from __future__ import annotations

from typing import Callable, Sequence

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


def sample_edm_sigma(
    batch: int, p_mean: float = -1.2, p_std: float = 1.2, *, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """EDM training noise levels: ln(sigma) ~ N(p_mean, p_std^2). Returns [batch]."""
    return edm_sigma(torch.randn(batch, generator=generator, device=device), p_mean, p_std)


def edm_sigma(normal: Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """Standard normal draws [B] -> EDM training noise levels exp(p_mean + p_std * normal) [B]."""
    return (normal * p_std + p_mean).exp()


def denoising_loss(
    denoiser: Denoiser, x0: Tensor, sigma: Tensor, class_labels: Tensor, noise: Tensor,
    sigma_data: float = 0.5,
) -> Tensor:
    """EDM denoising score matching loss, averaged to a scalar.

    x0 [B,C,H,W] clean images, sigma [B], class_labels [B], noise [B,C,H,W] ~ N(0, I).
    Loss = mean_b( lambda(sigma_b) * mean_chw (D(x0 + sigma n; sigma) - x0)^2 ).
    """
    denoised = denoiser(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, class_labels)
    return weighted_denoising_error(denoised, x0, sigma, sigma_data)


def weighted_denoising_error(denoised: Tensor, x0: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """mean_b( lambda(sigma_b) * mean_chw (denoised - x0)^2 ) for denoised, x0 [B,C,H,W], sigma [B]."""
    per_sample = ((denoised - x0) ** 2).flatten(1).mean(1)
    return (edm_loss_weight(sigma, sigma_data) * per_sample).mean()


def heun_sampler_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """EDM sampling grid: ``steps`` Karras sigmas followed by a final 0. Returns float64 [steps + 1]."""
    return torch.cat([karras_sigmas(steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])


def heun_nfe(steps: int) -> int:
    """Network evaluations of the Heun sampler: one per step, plus a correction on all but the last."""
    return 2 * steps - 1


@torch.no_grad()
def heun_sample(denoiser: Denoiser, noise: Tensor, class_labels: Tensor, sigmas: Tensor) -> Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Algorithm 1, no churn).

    noise [B,C,H,W] ~ N(0, I); class_labels [B]; sigmas [N+1] descending, ending with 0
    (see ``heun_sampler_sigmas``). Returns samples [B,C,H,W]. Uses ``2N - 1`` evaluations; with
    N = 1 it is a single Euler step from sigma_max, i.e. ``D(noise * sigma_max)``.
    """
    sigmas = sigmas.to(torch.float64)
    x = noise.to(torch.float64) * sigmas[0]
    ones = torch.ones(noise.shape[0], dtype=torch.float64, device=noise.device)

    def d(x_cur: Tensor, s: Tensor) -> Tensor:
        return denoiser(x_cur.to(noise.dtype), (ones * s).to(noise.dtype), class_labels).to(torch.float64)

    levels = sigmas.tolist()  # read once on the host, not once per step
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        slope = (x - d(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * slope
        if levels[i + 1] > 0:
            slope_next = (x_next - d(x_next, s_next)) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (slope + slope_next)
        x = x_next
    return x.to(noise.dtype)


def to_uint8(images: Tensor) -> Tensor:
    """Map images in [-1, 1] [B,C,H,W] to uint8 in [0, 255] with rounding and clamping."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def gaussian_optimal_denoiser(mean: Tensor, std: Tensor) -> Denoiser:
    """The exact denoiser E[x0 | x] for data x0 ~ N(mean, diag(std^2)) [C,H,W], for tests and toy runs.

    D(x; sigma) = mean + std^2 / (std^2 + sigma^2) * (x - mean).
    """
    def denoise(x: Tensor, sigma: Tensor, class_labels: Tensor) -> Tensor:
        s2 = sigma.view(-1, *([1] * (x.dim() - 1))) ** 2
        return mean + std**2 / (std**2 + s2) * (x - mean)

    return denoise





def backward_simulation(
    generator: Denoiser, noise: Tensor, class_labels: Tensor, sigmas: Sequence[float], k: int
) -> Tensor:
    """The multi-step generator's output at step k of its own sampling chain (DMD2's backward simulation).

    noise [S,B,C,H,W]: S = len(sigmas) independent N(0, I) draws; sigmas: S levels, descending.
    Steps 0..k-1 run without gradient: x0 = G(x; sigma_i), then x = x0 + sigma_{i+1} * noise[i+1] (fresh noise
    at every re-noising). Step k runs with gradient (if enabled). Returns G's x0 prediction [B,C,H,W].
    With k = S - 1 this is the full sampler; with S = 1 it is the one-step generator G(z * sigma_0; sigma_0).
    """
    if not 0 <= k < len(sigmas) or noise.shape[0] < len(sigmas):
        raise ValueError(f"need 0 <= k < len(sigmas) = {len(sigmas)} and noise for every step, got k={k}, "
                         f"noise steps={noise.shape[0]}")
    batch = noise.shape[1]

    def level(i: int) -> Tensor:
        return torch.full((batch,), float(sigmas[i]), device=noise.device, dtype=noise.dtype)

    x = noise[0] * sigmas[0]
    with torch.no_grad():
        for i in range(k):
            x = generator(x, level(i), class_labels) + sigmas[i + 1] * noise[i + 1]
    return generator(x, level(k), class_labels)


def multistep_sample(generator: Denoiser, noise: Tensor, class_labels: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Sample a multi-step generator: the whole chain of ``backward_simulation``, len(sigmas) evaluations.

    noise [S,B,C,H,W] -> images [B,C,H,W].
    """
    with torch.no_grad():
        return backward_simulation(generator, noise, class_labels, sigmas, len(sigmas) - 1)


__all__ = [
    "Denoiser", "karras_sigmas", "dmd_timestep_sigmas", "edm_scalings", "edm_loss_weight", "sample_edm_sigma",
    "edm_sigma", "denoising_loss", "weighted_denoising_error", "heun_sampler_sigmas", "heun_nfe", "heun_sample",
    "to_uint8", "gaussian_optimal_denoiser", "backward_simulation", "multistep_sample",
]
