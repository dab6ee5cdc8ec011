"""The losses of both stages as small pure functions over denoisers (callables x, sigma, labels -> x0 estimate):
EDM's denoising loss (the teacher, and the fake score network's ``fake_score_loss``), DMD's distribution matching
loss and the non-saturating GAN losses.

References: Yin et al., "One-step Diffusion with Distribution Matching Distillation" (DMD, 2024) and
"Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2, 2024).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dmd2.method.edm import Denoiser, edm_loss_weight


def denoising_loss(
    denoiser: Denoiser, x0: Tensor, sigma: Tensor, class_labels: Tensor, noise: Tensor,
    sigma_data: float = 0.5,
) -> Tensor:
    """EDM denoising score matching loss, averaged to a scalar.

    x0 [B,C,H,W] clean images, sigma [B], class_labels [B], noise [B,C,H,W] ~ N(0, I).
    Loss = mean_b( lambda(sigma_b) * mean_chw (D(x0 + sigma n; sigma) - x0)^2 ).
    """
    denoised = denoiser(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, class_labels)
    return fake_score_loss(denoised, x0, sigma, sigma_data)


def fake_score_loss(denoised: Tensor, x0: Tensor, sigma: Tensor, sigma_data: float = 0.5,
                    weighting: str = "edm") -> Tensor:
    """Denoising error of ``denoised`` against x0, both [B,C,H,W], at noise levels sigma [B]: the fake score
    network's loss on generator samples x0 (and, through ``denoising_loss``, the teacher's on data).

    weighting ``edm``: mean_b( lambda(sigma_b) * mean_chw (denoised - x0)^2 ), lambda = 1/sigma^2 + 1/sigma_data^2
    (EDM; the official DMD2). ``none``: the plain mean of (denoised - x0)^2 (FastGen's DMD2)."""
    per_sample = ((denoised - x0) ** 2).flatten(1).mean(1)
    if weighting == "none":
        return per_sample.mean()
    return (edm_loss_weight(sigma, sigma_data) * per_sample).mean()


def dm_gradient(x: Tensor, real_denoised: Tensor, fake_denoised: Tensor, eps: float = 0.0) -> Tensor:
    """DMD's distribution matching direction for generator samples x [B,C,H,W].

    With p_real = x - D_real(x_t) and p_fake = x - D_fake(x_t) (the denoisers' views of the noised
    sample x_t), the direction is (p_real - p_fake) / w, w = mean_chw |p_real| + eps per sample (DMD eq. 8's
    normaliser; the official DMD2 has eps = 0, FastGen 1e-6). Non-finite entries become 0. Moving x against it
    pulls x toward D_real, away from D_fake. Returns [B,C,H,W].
    """
    p_real = x - real_denoised
    p_fake = x - fake_denoised
    weight = p_real.abs().mean(dim=tuple(range(1, x.dim())), keepdim=True) + eps
    return torch.nan_to_num((p_real - p_fake) / weight)


def distribution_matching_loss(
    x: Tensor, real: Denoiser, fake: Denoiser, sigma: Tensor, class_labels: Tensor, noise: Tensor, eps: float = 0.0,
    flip: bool = False,
) -> tuple[Tensor, Tensor]:
    """DMD2 generator loss. x [B,C,H,W] generator samples (with grad), sigma [B], noise like x.

    The two denoisers run without gradient on x_t = x + sigma * noise. The loss is the surrogate
    0.5 * mean((x - (x - g).detach())^2) whose gradient w.r.t. x is g / x.numel(), g = ``dm_gradient``
    (-g with ``flip``: a deliberately broken control, the generator then climbs the KL it should descend).
    Returns (scalar loss, g [B,C,H,W]).
    """
    with torch.no_grad():
        x_t = x + sigma.view(-1, *([1] * (x.dim() - 1))) * noise
        grad = dm_gradient(x, real(x_t, sigma, class_labels), fake(x_t, sigma, class_labels), eps)
        if flip:
            grad = -grad
    loss = 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")
    return loss, grad


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN loss of the classifier: softplus(l_fake) + softplus(-l_real), each averaged over all its
    logits ([B], or [B,K] for K heads)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN loss of the generator: softplus(-l_fake), averaged. Logits [B] or [B,K]."""
    return F.softplus(-logits_fake).mean()


def r1_penalty(logits: Tensor, logits_perturbed: Tensor) -> Tensor:
    """Approximate R1 regulariser of a discriminator (FastGen's): the mean squared change of its logits on real
    images when the images are perturbed by alpha * noise; logits [B] or [B,K]."""
    return F.mse_loss(logits, logits_perturbed)
