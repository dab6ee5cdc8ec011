"""Samplers over denoisers: EDM's Heun sampler (the teacher) and the few-step generator's chain (DMD2's backward
simulation). Pure: the noise comes in as tensors."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from dmd2.method.edm import RHO, SIGMA_MAX, SIGMA_MIN, Denoiser, karras_sigmas


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
