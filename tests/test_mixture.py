"""data=gaussian_mixture: the mixture, its exact moments, exact denoiser and exact scores (fast, no training)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_cfg

from dmd2.config.errors import ConfigError
from dmd2.config.validate import validate
from dmd2.data.datasets import build_dataset
from dmd2.data.images import to_uint8
from dmd2.method.frechet import frechet_to_reference
from dmd2.method.mixture import (ExactDenoiser, class_moments, exact_denoise, gaussian_optimal_denoiser, make_mixture,
                                 mixture_scores, quantize, reference_scores, sample_mixture)
from dmd2.method.samplers import heun_sample, heun_sampler_sigmas


@pytest.fixture(scope="module")
def mix():
    return make_mixture(num_classes=4, components=3, resolution=8, std=0.05, seed=0)


def test_mixture_is_a_function_of_its_keys(mix):
    again = make_mixture(4, 3, 8, 0.05, 0)
    assert torch.equal(mix.means, again.means)
    assert not torch.equal(mix.means, make_mixture(4, 3, 8, 0.05, 1).means)
    assert mix.means.shape == (4, 3, 3, 8, 8) and mix.means.abs().max() <= 0.75
    # smooth: neighbouring pixels differ far less than pixels paired at random
    flat = mix.means.flatten(2)
    shuffled = flat[..., torch.randperm(flat.shape[-1], generator=torch.Generator().manual_seed(0))]
    neighbours = (mix.means[..., 1:] - mix.means[..., :-1]).abs().mean()
    assert neighbours < 0.5 * (flat - shuffled).abs().mean()


def test_class_moments_match_many_draws(mix):
    labels = torch.full((60000,), 2)
    x, _ = sample_mixture(mix, labels, torch.Generator().manual_seed(0))
    m, cov = class_moments(mix)
    flat = x.flatten(1).double()
    assert torch.allclose(flat.mean(0), m[2], atol=0.01)
    assert torch.allclose(torch.cov(flat.T), cov[2], atol=0.01)


def bayes_posterior_mean(mix, x, sigma, c):
    """E[x0 | x] by Bayes' rule written out for one sample, in numpy (an independent implementation)."""
    mu = mix.means[c].flatten(1).double().numpy()
    v = mix.std ** 2 + sigma ** 2
    logp = np.array([-((x - m) ** 2).sum() / (2 * v) for m in mu])
    w = np.exp(logp - logp.max())
    w /= w.sum()
    return sum(wk * (m + mix.std ** 2 / v * (x - m)) for wk, m in zip(w, mu))


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 80.0])
def test_exact_denoiser_is_the_posterior_mean(mix, sigma):
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 3])
    x0, _ = sample_mixture(mix, labels, gen)
    x = x0 + sigma * torch.randn(x0.shape, generator=gen)
    out = exact_denoise(mix, x, torch.full((4,), sigma), labels)
    for i, c in enumerate(labels.tolist()):
        want = bayes_posterior_mean(mix, x[i].flatten().double().numpy(), sigma, c)
        np.testing.assert_allclose(out[i].flatten().double().numpy(), want, atol=1e-5)


def test_one_component_is_the_gaussian_denoiser():
    one = make_mixture(1, 1, 8, 0.1, 3)
    x, sigma = torch.randn(5, 3, 8, 8), torch.tensor([0.1, 0.5, 1.0, 5.0, 80.0])
    want = gaussian_optimal_denoiser(one.means[0, 0], torch.tensor(0.1))(x, sigma, torch.zeros(5))
    assert torch.allclose(ExactDenoiser(one)(x, sigma, torch.zeros(5, dtype=torch.long)), want, atol=1e-6)


def test_frechet_distance_with_a_singular_sample_covariance():
    """Fewer samples than dimensions: the eigendecomposition form still equals the definition, computed here
    from the exact square root of the reference's covariance."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 30))  # rank 9 < 30
    ref_sigma = np.diag(rng.uniform(0.5, 2, 30))
    sigma = np.cov(a, rowvar=False)
    root = np.diag(np.sqrt(np.diag(ref_sigma)))
    inner = np.linalg.eigvalsh(root @ sigma @ root)
    want = (a.mean(0) ** 2).sum() + np.trace(sigma) + np.trace(ref_sigma) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    assert frechet_to_reference(np.zeros(30), ref_sigma)(a.mean(0), sigma) == pytest.approx(want, rel=1e-10)


def test_scores_of_true_samples_blur_and_a_single_mode(mix):
    floor = reference_scores(mix, 2000)
    assert floor["coverage"] == 1.0 and floor["near"] == 1.0 and floor["weight_tv"] < 0.08
    labels = torch.arange(2000) % 4
    blur = mixture_scores(mix, mix.means.mean(1)[labels], labels)  # every sample the average of its modes
    assert blur["near"] == 0.0 and blur["coverage"] == 0.0 and blur["fd"] > 20 * floor["fd"]
    gen = torch.Generator().manual_seed(5)
    one_mode = mix.means[labels, 0] + mix.std * torch.randn(2000, 3, 8, 8, generator=gen)  # mode collapse
    collapsed = mixture_scores(mix, quantize(one_mode), labels)
    assert collapsed["near"] == 1.0 and collapsed["coverage"] == pytest.approx(1 / 3)
    assert collapsed["weight_tv"] == pytest.approx(2 / 3) and collapsed["fd"] > 10 * floor["fd"]
    # uint8 images score as their float values
    assert mixture_scores(mix, to_uint8(one_mode), labels) == pytest.approx(collapsed)


def test_exact_denoiser_with_heun_lands_on_the_mixture(mix):
    """The sampler and the exact denoiser together: 35 NFE reach the floor, one Euler step is the blur."""
    labels = torch.arange(1000) % 4
    z = torch.randn(1000, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    floor = reference_scores(mix, 1000)
    good = mixture_scores(mix, to_uint8(heun_sample(ExactDenoiser(mix), z, labels, heun_sampler_sigmas(18))), labels)
    assert good["coverage"] == 1.0 and good["near"] >= 0.99 and good["fd"] < 1.3 * floor["fd"]
    one = mixture_scores(mix, to_uint8(heun_sample(ExactDenoiser(mix), z, labels, heun_sampler_sigmas(1))), labels)
    assert one["near"] == 0.0 and one["fd"] > 20 * floor["fd"]


def test_dataset_draws_are_fixed_and_unflipped():
    cfg = compose_cfg(["data=gaussian_mixture", "data.num_classes=2", "data.synthetic_per_class=50"])
    a, b = build_dataset(cfg.data), build_dataset(cfg.data)
    assert len(a) == 100 and a.class_names == ["class_000", "class_001"]
    assert torch.equal(a.images, b.images) and [a[i][1] for i in range(4)] == [0, 1, 0, 1]
    assert torch.equal(a.images, quantize(a.images))  # on the 256 levels every image has
    mix = a.mixture
    near = mixture_scores(mix, a.images, torch.tensor(a.targets))
    assert near["near"] == 1.0 and near["coverage"] == 1.0


@pytest.mark.parametrize("overrides, words", [
    (["data.hflip=true"], "a flipped mean image is another mode"),
    (["data.root=somewhere"], "data=gaussian_mixture is generated"),
])
def test_refused_mixture_settings(overrides, words):
    cfg = compose_cfg(["data=gaussian_mixture", "device=cpu", *overrides])
    with pytest.raises(ConfigError, match=words):
        validate(cfg)


def test_exact_teacher_needs_the_mixture(tmp_path):
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"x")
    cfg = compose_cfg(["stage=distill", f"teacher_checkpoint={ckpt}", "exact_teacher=true", "data=synthetic",
                       "device=cpu"])
    with pytest.raises(ConfigError, match="'exact_teacher' = true needs data=gaussian_mixture"):
        validate(cfg)


def test_teacher_and_student_are_scored_exactly_in_training_and_by_evaluate(tmp_path):
    """A few steps of each stage on the mixture: in-training evaluation logs the exact scores (with the floor in
    the summary), evaluate.py gives the same value for the same samples and, for the teacher, its denoising error
    against the exact denoiser at every noise level."""
    import evaluate as evaluate_script
    from train import train

    quick = ["debug=smoke", "logger=none", "data=gaussian_mixture", "data.num_classes=2",
             "data.synthetic_per_class=64", "eval_every=4", "eval.num_samples=40", "eval.sampler_steps=2"]
    result = train(compose_cfg([*quick, f"output_dir={tmp_path / 't'}"]))
    assert set(result["metrics"]) >= {"eval/mixture_fd", "eval/mixture_near", "eval/mixture_coverage",
                                      "eval/mixture_weight_tv", "eval/mixture_fd_best"}
    assert result["objective_key"] == "eval/mixture_fd_best"
    teacher = tmp_path / "t" / "teacher_final.pt"
    distilled = train(compose_cfg([*quick, "stage=distill", f"teacher_checkpoint={teacher}", "exact_teacher=true",
                                   f"output_dir={tmp_path / 'd'}"]))
    assert 0 <= distilled["metrics"]["eval/mixture_near"] <= 1

    rows = evaluate_script.evaluate(compose_cfg(
        ["logger=none", f"checkpoint={teacher}", "num_samples=40", "sampler.steps=2", "device=cpu",
         f"output_dir={tmp_path / 'e'}"], config_name="evaluate"))
    (row,) = rows
    assert row["value"] == pytest.approx(result["metrics"]["eval/mixture_fd"], rel=1e-9)
    assert row["mixture_scores"]["fd"] == row["value"] and row["mixture_floor"]["near"] == 1.0
    errors = row["denoising_error"]
    assert [e["sigma"] for e in errors] == sorted(e["sigma"] for e in errors) and len(errors) >= 8
    assert all(e["mse"] >= 0 and e["mse_x0"] > 0 for e in errors)
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    assert saved[0]["denoising_error"] == errors
    # ... and plotted against the bound no denoiser can beat
    plot = tmp_path / "e" / f"denoising_error_{row['step']:06d}.png"
    assert saved[0]["denoising_plot"] == str(plot) and plot.read_bytes().startswith(b"\x89PNG")


def test_exact_denoiser_has_no_denoising_error(mix):
    from dmd2.method.mixture import DENOISING_SIGMAS, denoising_errors

    rows = denoising_errors(ExactDenoiser(mix), mix, DENOISING_SIGMAS, num=200)
    assert all(r["mse"] < 1e-10 for r in rows)
    # the irreducible error grows with the noise: from ~0 to the mixture's per-pixel variance
    assert rows[0]["mse_x0"] < 1e-5 < rows[-1]["mse_x0"]
