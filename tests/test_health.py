"""Health diagnostics of a distillation: the gradient balance and saturated pixels (dmd2.method.health), the
alerts (dmd2.train.health) and the denoiser panels; none of them changes what training computes."""
from __future__ import annotations

import math

import pytest
import torch

from dmd2.config.settings import DistillSettings
from dmd2.io.weights import build_denoiser
from dmd2.method.guidance import DM_GRAD_NORM
from dmd2.method.health import (GAN_GRAD_NORM, GRAD_RATIO, balance_ratio, per_sample_gradient_norms,
                                saturated_fraction)
from dmd2.method.randomness import BatchRNG
from dmd2.train.distill import distill_model
from tests.test_full_method import TINY_ARCH


def test_per_sample_gradient_norms_are_in_the_dm_gradients_units():
    x0 = torch.randn(4, 3, 2, 2)
    w = torch.randn(4, 3, 2, 2)
    x = x0.clone().requires_grad_(True)
    y = x * 2.0
    loss = (w * y).sum(dim=(1, 2, 3)).mean()  # d loss / d x_b = 2 w_b / B
    norms = per_sample_gradient_norms(loss, y)
    torch.testing.assert_close(norms, (w / 4 * y.numel()).flatten(1).norm(dim=1))
    # the DM surrogate: its gradient in these units is g itself
    g = torch.randn_like(x0)
    xs = x0.clone().requires_grad_(True)
    dm = 0.5 * torch.nn.functional.mse_loss(xs, (xs - g).detach())
    torch.testing.assert_close(per_sample_gradient_norms(dm, xs), g.flatten(1).norm(dim=1))
    assert x.grad is None  # nothing accumulated


def test_balance_ratio_and_saturation():
    assert balance_ratio(0.5, torch.tensor(4.0), torch.tensor(2.0)).item() == 1.0
    assert balance_ratio(1.0, torch.tensor(0.0), torch.tensor(0.0)).item() == 0.0
    assert math.isinf(balance_ratio(1.0, torch.tensor(1.0), torch.tensor(0.0)).item())
    x = torch.tensor([-1.5, -1.0, -0.99, 0.0, 0.5, 1.0, 2.0, 0.3])
    assert saturated_fraction(x).item() == pytest.approx(4 / 8)


def test_generator_loss_logs_the_gradient_balance_and_leaves_the_update_unchanged():
    def model_and_inputs():
        torch.manual_seed(0)
        teacher = build_denoiser(TINY_ARCH, 10, 16, 0.5)
        model = distill_model(teacher, DistillSettings(gan_classifier=True, gen_cls_loss_weight=0.3))
        with torch.no_grad():  # a fake score network unlike the teacher: a non-zero DM gradient
            for p in model.guidance.fake_unet.parameters():
                p.add_(0.01 * torch.randn_like(p))
        z, y = torch.randn(1, 4, 3, 16, 16), torch.arange(4)
        return model, z, y

    grads = []
    for with_balance in (True, False):
        model, z, y = model_and_inputs()
        if not with_balance:
            model.gradient_balance = lambda *args: {}
        x = model.generate(z, y)
        loss, logs = model.generator_loss(x, y, BatchRNG(3))
        loss.backward()
        grads.append([p.grad.clone() for p in model.generator.parameters()])
        if with_balance:
            assert logs[GAN_GRAD_NORM] > 0 and logs[DM_GRAD_NORM] > 0
            ratio = 0.3 * logs[GAN_GRAD_NORM] / logs[DM_GRAD_NORM]
            torch.testing.assert_close(logs[GRAD_RATIO], ratio)
            for net in (model.guidance.fake_unet, model.guidance.gan_head):
                assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # bitwise: the diagnostic does not touch the update
