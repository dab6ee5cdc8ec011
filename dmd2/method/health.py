"""The math behind a distillation's health diagnostics, as pure functions (the runner, dmd2/train/health.py,
logs and alerts on them).

Gradient balance. The DM loss's surrogate 0.5 * mean((x - (x - g).detach())^2) has gradient g / x.numel() at the
generated images x [B,C,H,W] (g: ``dmd2.method.losses.dm_gradient``), and ``dm_grad_norm`` logs mean_b |g_b|. The
generator's GAN loss L_gan has gradient dL_gan/dx; scaled by the same x.numel() it is in the DM gradient's units,
so ``gan_grad_norm`` = mean_b |x.numel() * dL_gan/dx_b| and the balance ratio

    gan_dm_grad_ratio = gen_cls_loss_weight * gan_grad_norm / dm_grad_norm

says how large the GAN term's push on the images is against the DM term's (the weight included). The DMD2 authors'
calibration rule: weight the GAN loss so that its gradient is comparable to the DM gradient's.
"""
from __future__ import annotations

import torch
from torch import Tensor

GAN_GRAD_NORM = "gan_grad_norm"          # mean per-sample norm of the GAN loss's gradient at x, in DM units
GRAD_RATIO = "gan_dm_grad_ratio"         # gen_cls_loss_weight * gan_grad_norm / dm_grad_norm
SATURATED = "saturated_fraction"         # the fraction of generated pixels at +-1 after clamping


def per_sample_gradient_norms(loss: Tensor, x: Tensor) -> Tensor:
    """|x.numel() * d loss / d x_b| for every sample b of x [B,...] -> [B]: the gradient of ``loss`` (a scalar
    computed from x) at x, in the units of the DM gradient g (whose surrogate loss has gradient g / x.numel()).
    Nothing accumulates into any parameter's .grad and the graph is kept for the update's own backward."""
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
    return (grad.detach().float() * x.numel()).flatten(1).norm(dim=1)


def balance_ratio(weight: float, gan_norm: Tensor, dm_norm: Tensor) -> Tensor:
    """weight * gan_norm / dm_norm (scalars): the GAN term's gradient against the DM term's, the weight included.
    NaN (undefined, left out of the logged window means) where the DM gradient is exactly zero, as at the first
    update while the fake score network still equals the teacher."""
    gan = weight * gan_norm.float()
    dm = dm_norm.float()
    return torch.where(dm > 0, gan / dm.clamp_min(torch.finfo(dm.dtype).tiny), torch.full_like(gan, float("nan")))


@torch.no_grad()
def saturated_fraction(x: Tensor) -> Tensor:
    """The fraction of the entries of generated images x (any shape, in [-1, 1] once clamped) that sit at -1 or
    +1 after clamping, i.e. |x| >= 1 -> a scalar."""
    return (x.detach().abs() >= 1).float().mean()
