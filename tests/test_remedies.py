"""The convergence remedies' mathematics: learning-rate decay, the generator EMA warm-up over generator updates,
the fake-score warm-up, and the measurement of the DM gradient against its exact value on known-answer data."""
import math

import pytest
import torch

from dmd2.config.errors import ConfigError
from dmd2.config.validate import validate
from dmd2.method.mixture import (ExactDenoiser, FittedMixture, dm_gradient_errors, exact_denoise, fit_mixture,
                                 fitted_denoise, make_mixture, sample_mixture)
from dmd2.method.randomness import torch_generator
from dmd2.train.distill import generator_turn, generator_updates_before
from dmd2.train.optim import LRSchedule, ema_decay_at
from tests.conftest import SMOKE, compose_cfg


def test_constant_schedule_is_the_warm_up_alone():
    s = LRSchedule(4, "none", 0.0, 100)
    assert [s.lr(1.0, i) for i in (0, 1, 3, 50, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_runs_from_the_base_rate_after_warm_up_to_the_final_fraction_at_the_last_step(decay):
    s = LRSchedule(10, decay, 0.1, 111)                   # decays over iterations 10 .. 110
    rates = [s.lr(2.0, i) for i in range(111)]
    assert rates[4] == pytest.approx(1.0)                 # warm-up untouched
    assert rates[10] == pytest.approx(2.0)                # base rate at the end of the warm-up
    assert rates[110] == pytest.approx(0.2)               # final x base at the last iteration
    assert all(a >= b - 1e-12 for a, b in zip(rates[10:], rates[11:]))  # monotone decay
    mid = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * 0.5)) if decay == "cosine" else 0.5)
    assert rates[60] == pytest.approx(2.0 * mid)
    assert s.lr(2.0, 500) == pytest.approx(0.2)           # past the last iteration: clamped at the end value


def test_unknown_length_never_decays():
    assert LRSchedule(0, "cosine", 0.0, 0).lr(1.0, 10_000) == 1.0


@pytest.mark.parametrize("schedule", ["every", "alternate"])
@pytest.mark.parametrize("ratio,fake_warmup", [(1, 0), (5, 0), (5, 7), (3, 10)])
def test_generator_updates_before_counts_the_turns(schedule, ratio, fake_warmup):
    for step in range(60):
        turns = sum(generator_turn(i, ratio, schedule, fake_warmup) for i in range(step))
        assert generator_updates_before(step, ratio, schedule, fake_warmup) == turns


def test_fake_warmup_holds_the_generator_back():
    assert [s for s in range(20) if generator_turn(s, 5, "every", 8)] == [10, 15]
    assert [s for s in range(20) if generator_turn(s, 5, "every", 0)] == [0, 5, 10, 15]


def test_generator_ema_warmup_follows_the_generator_updates():
    """With ratio 5, iteration 50 is the 11th generator update: its decay is the teacher rule at n = 10."""
    n = generator_updates_before(50, 5, "every")
    assert n == 10 and ema_decay_at(n, 0.99) == pytest.approx(11 / 20)
    # the weight of the initial generator left in the EMA after 156 updates: a fixed 0.99 keeps 0.99^156 = 21 %,
    # the warmed-up one (0.1 at the first update) far less
    kept_warm = math.prod(ema_decay_at(i, 0.99) for i in range(156))
    assert ema_decay_at(0, 0.99) == pytest.approx(0.1) and kept_warm < 1e-6
    assert ema_decay_at(500, 0.99) < 0.99 == ema_decay_at(1000, 0.99) == ema_decay_at(10_000, 0.99)  # reached, then kept


@pytest.fixture(scope="module")
def mixture_and_samples():
    mix = make_mixture(2, 3, 8, 0.05, 0)
    labels = torch.arange(1200) % 2
    x, _ = sample_mixture(mix, labels, torch_generator(1))
    return mix, x, labels


def test_fit_recovers_the_true_mixture(mixture_and_samples):
    mix, x, labels = mixture_and_samples
    fit = fit_mixture(mix, x, labels, iterations=10)
    k = mix.num_components
    assert torch.allclose(fit.weights[:, :k], torch.full((2, k), 1 / k, dtype=torch.float64), atol=0.06)
    assert float(fit.weights[:, k].max()) < 1e-3          # nothing off the modes
    assert float((fit.means[:, :k] - mix.means.flatten(2).double()).abs().max()) < 0.05
    assert float(fit.variances[:, :k].mean()) == pytest.approx(mix.std ** 2, rel=0.1)


def test_fitted_denoiser_of_the_true_parameters_is_the_exact_denoiser(mixture_and_samples):
    mix, x, labels = mixture_and_samples
    k, d = mix.num_components, mix.dim
    truth = FittedMixture(torch.full((2, k), 1 / k, dtype=torch.float64), mix.means.flatten(2).double(),
                          torch.full((2, k, d), mix.std ** 2, dtype=torch.float64))
    for sigma in (0.01, 0.3, 5.0, 80.0):
        xt = x[:64] + sigma * torch.randn(x[:64].shape, generator=torch_generator(2))
        s = torch.full((64,), sigma)
        assert torch.allclose(fitted_denoise(truth, xt, s, labels[:64]), exact_denoise(mix, xt, s, labels[:64]),
                              atol=1e-5)


def test_dm_gradient_errors_vanish_for_exact_networks_and_see_a_biased_real_score(mixture_and_samples):
    mix, x, labels = mixture_and_samples
    x, labels = x[:200], labels[:200]
    fit = fit_mixture(mix, x, labels, iterations=5)
    exact = ExactDenoiser(mix)

    class FittedNet(torch.nn.Module):
        def forward(self, xt, sigma, class_labels):
            return fitted_denoise(fit, xt, sigma, class_labels).float()

    class Biased(torch.nn.Module):  # the exact real score shifted by a constant: a wrong class mean
        def forward(self, xt, sigma, class_labels):
            return exact(xt, sigma, class_labels) + 0.1

    ideal = dm_gradient_errors(x, labels, exact, FittedNet(), mix, fit, [0.1, 5.0])
    assert all(r["fake_mse"] < 1e-10 and r["real_mse"] < 1e-10 and r["error"] < 1e-10 for r in ideal)
    biased = dm_gradient_errors(x, labels, Biased(), FittedNet(), mix, fit, [0.1, 5.0])
    assert all(r["real_mse"] == pytest.approx(0.01, rel=1e-3) and r["error"] == pytest.approx(0.01, rel=1e-3)
               for r in biased)


def test_fake_warmup_and_ema_warmup_in_a_distillation_step():
    """With fake_warmup_steps=6 the generator and its EMA stay at the teacher's weights on iterations 0-5 while
    the fake score network trains; the first generator update (iteration 10 at ratio 5) then moves the EMA by the
    warmed-up decay min(0.99, 1/10), not by 1 - 0.99."""
    import copy
    from contextlib import nullcontext

    from dmd2.config.settings import DistillSettings
    from dmd2.io.weights import build_denoiser
    from dmd2.method.randomness import BatchRNG
    from dmd2.train.distill import Batch, DistillState, build_updaters, distill_model, distill_step

    tiny = {"name": "simple_unet", "channels": [8, 16], "emb_dim": 16, "noise_emb_dim": 8, "groups": 4,
            "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    torch.manual_seed(0)
    cfg = DistillSettings(dfake_gen_update_ratio=5, fake_warmup_steps=6, generator_ema_decay=0.99,
                          generator_ema_warmup=True, warmup_steps=0, generator_lr=1e-3, guidance_lr=1e-3)
    model = distill_model(build_denoiser(tiny, 2, 8, 0.5), cfg)
    ema = copy.deepcopy(model.generator).requires_grad_(False)
    upds = build_updaters(model, ema, cfg, fused=False)
    s = DistillState(model, model.generator, model.guidance, upds, BatchRNG(), nullcontext, 5, "every", 6)
    start = [p.detach().clone() for p in model.generator.parameters()]
    fake0 = [p.detach().clone() for p in model.guidance.fake_unet.parameters()]
    batch = Batch(torch.randint(0, 2, (4,)), torch.randn(1, 4, 3, 8, 8), 0, None)
    for step in range(10):
        distill_step(s, batch, step)
    assert all(torch.equal(a, b) for a, b in zip(start, model.generator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(start, ema.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(fake0, model.guidance.fake_unet.parameters()))
    distill_step(s, batch, 10)  # the first generator update: n = 0 updates before it, decay min(0.99, 1/10)
    for e, g, g0 in zip(ema.parameters(), model.generator.parameters(), start):
        assert torch.allclose(e, 0.1 * g0 + 0.9 * g, atol=1e-6)


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_a_final_rate_without_a_decay_is_refused(stage):
    """lr_final sets where lr_decay ends; with a constant rate it would be silently ignored."""
    base = [*SMOKE, f"stage={stage}"] + ([f"teacher_checkpoint={__file__}"] if stage == "distill" else [])
    with pytest.raises(ConfigError, match="config key 'lr_final' = 0.1: expected 0 with lr_decay=none"):
        validate(compose_cfg(base + ["lr_final=0.1"]))
    validate(compose_cfg(base + ["lr_final=0.1", "lr_decay=cosine"]))
    validate(compose_cfg(base))
