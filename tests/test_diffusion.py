"""The EDM math: schedule, preconditioning, loss weight and the Heun sampler on a Gaussian with a known answer."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmd2.data.images import to_uint8
from dmd2.method.edm import dmd_timestep_sigmas, edm_loss_weight, edm_scalings, edm_sigma, karras_sigmas
from dmd2.method.mixture import gaussian_optimal_denoiser
from dmd2.method.samplers import heun_nfe, heun_sample, heun_sampler_sigmas, multistep_sample
from dmd2.networks.precond import EDMPrecond


def test_karras_sigmas_endpoints_and_order():
    s = karras_sigmas(18)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert torch.all(s[1:] < s[:-1])
    assert karras_sigmas(1).tolist() == [80.0]
    # rho = 1 gives a linear ramp
    assert torch.allclose(karras_sigmas(5, 1.0, 5.0, rho=1.0), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))


def test_dmd_timestep_table_is_ascending():
    t = dmd_timestep_sigmas(1000)
    assert t.shape == (1000,)
    assert t[0].item() == pytest.approx(0.002, rel=1e-5) and t[-1].item() == pytest.approx(80.0, rel=1e-5)
    assert torch.all(t[1:] > t[:-1])


def test_heun_grid_and_nfe():
    s = heun_sampler_sigmas(18)
    assert s.shape == (19,) and s[-1] == 0 and heun_nfe(18) == 35 and heun_nfe(1) == 1


def test_edm_scalings_identities():
    sd = 0.5
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sd)
    # Karras et al. (2022) App. B.6: the network input has unit variance, and the training target
    # (y - c_skip (y + sigma n)) / c_out has unit variance too, for y ~ (0, sd^2)
    assert torch.allclose(c_in**2 * (sd**2 + sigma**2), torch.ones(4, dtype=torch.float64))
    target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2
    assert torch.allclose(target_var, torch.ones(4, dtype=torch.float64))
    assert c_skip[0].item() == pytest.approx(1.0, abs=1e-4) and c_skip[-1].item() == pytest.approx(0.0, abs=1e-4)
    assert torch.allclose(c_noise, sigma.log() / 4)
    # the loss weight is 1 / c_out^2 and equals 1/sigma^2 + 1/sd^2
    w = edm_loss_weight(sigma, sd)
    assert torch.allclose(w, 1 / c_out**2) and torch.allclose(w, 1 / sigma**2 + 1 / sd**2)


def test_edm_sigma_is_lognormal():
    gen = torch.Generator().manual_seed(0)
    log_s = edm_sigma(torch.randn(200_000, generator=gen), -1.2, 1.2).log()
    assert log_s.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_s.std().item() == pytest.approx(1.2, abs=0.01)


class AnalyticRawNet(nn.Module):
    """The raw network F that makes EDMPrecond(F) equal the exact Gaussian denoiser: F = (D - c_skip x) / c_out."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, sd: float = 0.5) -> None:
        super().__init__()
        self.optimal = gaussian_optimal_denoiser(mean, std)
        self.sd = sd

    def forward(self, x_in, c_noise, class_labels):
        sigma = (4 * c_noise).exp()
        c_skip, c_out, c_in, _ = (c.view(-1, 1, 1, 1) for c in edm_scalings(sigma, self.sd))
        x = x_in / c_in
        return (self.optimal(x, sigma, class_labels) - c_skip * x) / c_out


MEAN = torch.tensor([0.3, -0.2, 0.0]).view(3, 1, 1).expand(3, 2, 2)
STD = torch.tensor([0.5, 0.2, 0.05]).view(3, 1, 1).expand(3, 2, 2)
SIGMA_DATA = 0.5  # EDM's, as AnalyticRawNet assumes by default


def test_preconditioning_reproduces_the_denoiser_it_wraps():
    denoiser = EDMPrecond(AnalyticRawNet(MEAN, STD), SIGMA_DATA)
    optimal = gaussian_optimal_denoiser(MEAN, STD)
    x = torch.randn(64, 3, 2, 2) * 3
    sigma = torch.logspace(-2.7, 1.9, 64)  # 0.002 .. 80
    labels = torch.zeros(64, dtype=torch.long)
    assert torch.allclose(denoiser(x, sigma, labels), optimal(x, sigma, labels), atol=1e-4)


@pytest.mark.parametrize("steps,rtol", [(64, 0.02), (18, 0.12)])
def test_heun_sampler_recovers_gaussian_data_through_preconditioning(steps, rtol):
    """Samples of the exact denoiser match the data's mean and std. The std tolerance is the sampler's
    discretisation error (measured: +0.5%..+2% at 64 steps, +5%..+11% at 18 steps for std 0.5..0.05)
    plus sampling noise of 20,000 samples (~0.5%)."""
    denoiser = EDMPrecond(AnalyticRawNet(MEAN, STD), SIGMA_DATA)
    n = 20_000
    noise = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    x = heun_sample(denoiser, noise, torch.zeros(n, dtype=torch.long), heun_sampler_sigmas(steps))
    assert torch.allclose(x.mean(0), MEAN, atol=4 * 0.5 / math.sqrt(n))
    assert torch.allclose(x.std(0), STD, rtol=rtol)


def test_one_euler_step_collapses_to_the_mean():
    """The 1-NFE teacher baseline: one Euler step from sigma_max returns ~D(x; 80), almost the data mean."""
    denoiser = EDMPrecond(AnalyticRawNet(MEAN, STD), SIGMA_DATA)
    noise = torch.randn(5000, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    one = heun_sample(denoiser, noise, torch.zeros(5000, dtype=torch.long), heun_sampler_sigmas(1))
    assert (one.std(0) / STD).max() < 0.05


def test_heun_sampler_uses_2n_minus_1_evaluations():
    calls = []

    def counting(x, sigma, labels):
        calls.append(sigma[0].item())
        return torch.zeros_like(x)

    heun_sample(counting, torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), heun_sampler_sigmas(5))
    assert len(calls) == heun_nfe(5) == 9
    assert calls[0] == pytest.approx(80.0)


def test_one_step_generator_feeds_scaled_noise_at_conditioning_sigma():
    seen = {}

    def spy(x, sigma, labels):
        seen["x"], seen["sigma"] = x, sigma
        return x * 0 + 1

    z = torch.randn(3, 3, 4, 4)
    out = multistep_sample(spy, z[None], torch.zeros(3, dtype=torch.long), [80.0])
    assert torch.equal(seen["x"], z * 80.0) and torch.all(seen["sigma"] == 80.0) and torch.all(out == 1)


def test_to_uint8_range_and_rounding():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]
