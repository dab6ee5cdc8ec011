"""Evaluation that refuses wrong comparisons and states its uncertainty: reference metadata and its checks, the
sample-count floor, bootstrap standard deviations, images from files, reference files, and the sweep objective.

A tiny random TorchScript network (8-d features) stands in for Inception.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as evaluate_script
import generate as generate_script
from dmd2.config.errors import ConfigError, EvaluationError
from dmd2.config.validate import validate
from dmd2.eval.features import build_feature_network
from dmd2.eval.measure import count_label, evaluate_sampler, metric_name, score_features
from dmd2.eval.references import ReferenceStats, npz_stats, reference_statistics
from dmd2.eval.statistics import feature_statistics, frechet_distance, resample_statistics
from dmd2.io.loaded import load_generator
from dmd2.method.frechet import frechet_to_reference
from dmd2.train.context import logger_settings, wandb_project
from dmd2.train.evaluator import reference_from_config
from dmd2.train.objective import check_objective
from tests.conftest import SMOKE, compose_cfg, needs_sweeper, run_cli, train_eval_args


def tiny_net(featnet: Path, resize: str = "none"):
    return build_feature_network("torchscript", torch.device("cpu"), path=str(featnet), resize=resize)


class NeverSampled:
    """A sampler stand-in: refusing before sampling means ``__call__`` is never reached."""

    def __init__(self, resolution: int) -> None:
        self.resolution, self.num_classes, self.noise_steps, self.calls = resolution, 10, 1, 0

    def __call__(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        raise AssertionError("sampled although the evaluation should have been refused")


# ------------------------------------------------------------------------------------------------ item 1: references


def test_a_reference_of_another_resolution_network_or_resize_is_refused_before_sampling(featnet, tiny_data, tmp_path):
    net = tiny_net(featnet)
    ref = reference_statistics("folder", net, str(tmp_path / "stats"), folder=str(tiny_data))  # 32x32 images
    assert (ref.image_size, ref.num_images, ref.network, ref.resize) == (32, 20, net.identity, "none")
    assert ref.dataset == "tiny" and str(tiny_data) in ref.source
    sampler = NeverSampled(64)
    with pytest.raises(EvaluationError) as err:
        evaluate_sampler(sampler, net, ref, 100, 0, 10, "cpu")
    assert "the images measured are 64x64, the reference images (tiny) 32x32" in str(err.value)
    assert sampler.calls == 0
    # statistics made under another resize mode (or another network) name both sides
    other = ReferenceStats(ref.mu, ref.sigma, "x", "x.npz", 20, 32, network="inception_v3", resize="clean")
    with pytest.raises(EvaluationError) as err:
        evaluate_sampler(NeverSampled(32), net, other, 100, 0, 10, "cpu")
    message = str(err.value)
    assert f"this evaluation uses {net.identity}" in message and "made with inception_v3" in message
    assert "feature_network.resize=none" in message and "made with resize clean" in message


def test_a_file_without_metadata_takes_its_resolution_from_the_key_or_the_name_and_says_so(featnet, tmp_path, caplog):
    caplog.set_level("INFO")
    net = tiny_net(featnet)
    np.savez(tmp_path / "cifar10-32x32.npz", mu=np.zeros(8), sigma=np.eye(8))
    ref = npz_stats(str(tmp_path / "cifar10-32x32.npz"), net)
    assert (ref.image_size, ref.resolution_from, ref.network) == (32, "the file name", None)
    assert "taken as statistics of 32x32 images (the file name)" in caplog.text
    np.savez(tmp_path / "ref.npz", mu=np.zeros(8), sigma=np.eye(8))
    with pytest.raises(EvaluationError, match=r"resolution of their images is unknown.*reference.resolution=32"):
        evaluate_sampler(NeverSampled(32), net, npz_stats(str(tmp_path / "ref.npz"), net), 100, 0, 10, "cpu")
    stated = npz_stats(str(tmp_path / "ref.npz"), net, resolution=64)
    assert (stated.image_size, stated.resolution_from) == (64, "reference.resolution")


def test_the_default_reference_is_the_training_data_and_equals_its_folder_statistics(featnet, tiny_data, tmp_path):
    net = tiny_net(featnet)
    data = {"name": "image_folder", "root": str(tiny_data), "resolution": 32, "num_classes": 10}
    spec = {"name": "auto", "cache_dir": str(tmp_path / "stats"), "allow_download": False}
    auto = reference_from_config(spec, net, data=data)
    folder = reference_statistics("folder", net, str(tmp_path / "stats"), folder=str(tiny_data))
    np.testing.assert_allclose(auto.mu, folder.mu, rtol=1e-6)
    np.testing.assert_allclose(auto.sigma, folder.sigma, rtol=1e-5, atol=1e-8)
    assert (auto.dataset, auto.image_size, auto.num_images) == ("tiny", 32, 20)
    assert reference_from_config(spec, net, data=data).path == auto.path  # computed once, then read from the cache
    with pytest.raises(EvaluationError, match="reference.name=auto"):
        reference_from_config(spec, net, data=None)


def test_a_folder_and_the_training_data_read_back_from_their_cache_as_they_were_computed(featnet, tiny_data,
                                                                                          tmp_path):
    """Both are statistics of a set of images (dmd2.eval.references.image_set_stats): a cached file gives back
    what was computed (statistics, features, metadata, description), and a cached file whose metadata names
    another feature network is refused, whichever the source."""
    import dataclasses

    from dmd2.eval.references import write_reference

    net = tiny_net(featnet)
    # at 16 px the training data is the folder's images resized (at 32 px it would be the folder itself)
    data = {"name": "image_folder", "root": str(tiny_data), "resolution": 16, "num_classes": 10}
    for name, source in (("folder", {"folder": str(tiny_data)}), ("auto", {"data": data})):
        fresh = reference_statistics(name, net, str(tmp_path / "stats"), kid=True, **source)
        cached = reference_statistics(name, net, str(tmp_path / "stats"), kid=True, **source)
        assert (cached.path, cached.description, cached.meta()) == (fresh.path, fresh.description, fresh.meta())
        for a, b in ((cached.mu, fresh.mu), (cached.sigma, fresh.sigma), (cached.feats, fresh.feats)):
            np.testing.assert_array_equal(a, b)
        write_reference(cached.path, dataclasses.replace(cached, network="inception_v3"))
        with pytest.raises(EvaluationError, match="were made with inception_v3/none"):
            reference_statistics(name, net, str(tmp_path / "stats"), **source)


def test_an_edm_dataset_is_its_own_default_reference(featnet, tmp_path, caplog):
    from tests.test_imagenet64 import make_edm_dataset

    caplog.set_level("INFO")
    zip_path = make_edm_dataset(tmp_path / "imagenet-64x64.zip", n=12, num_classes=1000, size=64)
    data = {"name": "edm_dataset", "root": str(zip_path), "resolution": 64, "num_classes": 1000}
    spec = {"name": "auto", "cache_dir": str(tmp_path / "stats"), "allow_download": False}
    ref = reference_from_config(spec, tiny_net(featnet), data=data)
    assert (ref.dataset, ref.image_size, ref.num_images) == ("imagenet64", 64, 12)
    assert Path(ref.path).name.startswith("imagenet64-64px-") and "imagenet-64x64.zip" in ref.source
    with np.load(ref.path) as stored:  # EDM's keys and the metadata
        assert json.loads(str(stored["meta"]))["dataset"] == "imagenet64" and stored["mu"].shape == (8,)
    with pytest.raises(EvaluationError, match="the images measured are 32x32, the reference images"):
        evaluate_sampler(NeverSampled(32), tiny_net(featnet), ref, 100, 0, 10, "cpu")


def test_evaluate_logs_to_the_project_of_the_checkpoints_data():
    cfg = compose_cfg(["checkpoint=x.pt"], config_name="evaluate")
    assert cfg.logger.project is None
    training = {"wandb_group": None, "wandb_run_id": "abc", "data": {"name": "edm_dataset",
                                                                     "root": "datasets/imagenet-64x64.zip"}}
    assert evaluate_script.wandb_settings(cfg, training)["project"] == "dmd2-imagenet64"
    cfg = compose_cfg(["checkpoint=x.pt", "logger.project=mine"], config_name="evaluate")
    assert evaluate_script.wandb_settings(cfg, training)["project"] == "mine"


def test_wandb_project_and_reference_follow_the_dataset():
    assert wandb_project({"name": "cifar10", "root": "./data"}) == "dmd2-cifar10"
    assert wandb_project({"name": "edm_dataset", "root": "datasets/imagenet-64x64.zip"}) == "dmd2-imagenet64"
    # a folder named after its split is known by the folder above it: not every data set in one dmd2-train
    assert wandb_project({"name": "image_folder", "root": "data/cifar10-jpeg/train"}) == "dmd2-cifar10-jpeg"
    assert wandb_project({"name": "image_folder", "root": "/data/faces/val/"}) == "dmd2-faces"
    assert wandb_project({"name": "image_folder", "root": "data/faces"}) == "dmd2-faces"
    cfg = compose_cfg(["experiment=dmd2_imagenet64", "teacher_checkpoint=x.pt",
                       "data.root=datasets/imagenet-64x64.zip"])
    assert cfg.eval.reference.name == "auto" and cfg.data.resolution == 64
    assert logger_settings(cfg)["project"] == "dmd2-imagenet64"
    assert logger_settings(compose_cfg([]))["project"] == "dmd2-cifar10"
    # the old default (clean-fid's CIFAR-10 statistics, 32x32) is refused for the 64x64 preset before anything runs
    bad = compose_cfg(["experiment=dmd2_imagenet64", "teacher_checkpoint=x.pt", "eval.reference.name=cifar10_train"])
    with pytest.raises(ConfigError, match=r"'eval.reference.name' = 'cifar10_train' and 'data.resolution' = 64"):
        validate(bad)


# ------------------------------------------------------------------------------------------------ item 2: counts


def test_fewer_samples_than_the_feature_dimension_are_refused_unless_allowed(featnet, teacher_ckpt, tiny_data,
                                                                             tmp_path):
    net = tiny_net(featnet)
    ref = reference_statistics("folder", net, str(tmp_path / "stats"), folder=str(tiny_data))
    with pytest.raises(EvaluationError, match=r"'num_samples' = 8: fewer samples than the feature dimension \(8\)"):
        evaluate_sampler(NeverSampled(32), net, ref, 8, 0, 4, "cpu")
    sampler = load_generator(str(teacher_ckpt), "cpu", heun_steps=1).sampler
    numbers = evaluate_sampler(sampler, net, ref, 8, 0, 4, "cpu", allow_few_samples=True)
    assert numbers["num_samples"] == 8 and np.isfinite(numbers["value"])


def test_values_are_named_with_their_sample_count():
    assert [count_label(n) for n in (50000, 10000, 2500, 40, 1234)] == ["50k", "10k", "2.5k", "40", "1234"]
    assert metric_name("eval/fid", 10000) == "fid@10k"
    assert metric_name("eval/fd_tiny-featnet", 40) == "fd_tiny-featnet@40"


# ------------------------------------------------------------------------------------------------ item 3: uncertainty


def test_the_fast_distance_of_the_bootstrap_equals_clean_fids():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)), rng.normal(1.0, 2.0, size=(400, 16))
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    assert frechet_to_reference(mu2, s2)(mu1, s1) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-8)


def test_resample_statistics_equal_those_of_the_resampled_features():
    rng = np.random.default_rng(1)
    feats = (rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)) + 5).astype(np.float32)
    idx = rng.integers(0, 500, 500)
    mean = feats.mean(axis=0, dtype=np.float64)
    mu, cov = resample_statistics((feats - mean).astype(np.float32), mean, np.bincount(idx, minlength=500))
    mu_ref, cov_ref = feature_statistics(feats[idx].astype(np.float64))
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cov, cov_ref, rtol=1e-4, atol=1e-4)


def test_the_bootstrap_std_matches_the_spread_over_seeds(featnet, teacher_ckpt, tiny_data, tmp_path):
    """The standard deviation each evaluation reports (bootstrap over its generated samples) against the spread
    of the value over 12 evaluations of the same checkpoint with different seeds."""
    net = tiny_net(featnet)
    ref = reference_statistics("folder", net, str(tmp_path / "stats"), folder=str(tiny_data))
    sampler = load_generator(str(teacher_ckpt), "cpu", heun_steps=1).sampler
    runs = [evaluate_sampler(sampler, net, ref, 100, seed, 100, "cpu", resamples=50, progress=False)
            for seed in range(12)]
    values, stds = np.array([r["value"] for r in runs]), np.array([r["std"] for r in runs])
    spread = values.std(ddof=1)
    assert 0.5 < stds.mean() / spread < 2.0, (stds.mean(), spread, values)
    # the estimate is a function of the features: same seed, same std
    again = evaluate_sampler(sampler, net, ref, 100, 0, 50, "cpu", resamples=50, progress=False)
    assert again["std"] == pytest.approx(runs[0]["std"], rel=1e-6)


def test_kid_comes_with_its_std(featnet, tiny_data, tmp_path):
    net = tiny_net(featnet)
    ref = reference_statistics("folder", net, str(tmp_path / "stats"), folder=str(tiny_data), kid=True)
    feats = ref.feats + np.random.default_rng(0).normal(0, 0.1, ref.feats.shape).astype(np.float32)
    numbers = score_features(feats, ref, kid=True, resamples=5)
    assert numbers["kid"] is not None and numbers["kid_std"] > 0 and numbers["std"] > 0


# ------------------------------------------------------------------------------------------------ item 4: files


def test_generated_pngs_and_npz_give_the_checkpoints_value_and_a_written_reference_is_the_folders(
        featnet, teacher_ckpt, tiny_data, tmp_path):
    common = [f"feature_network.name=torchscript", f"feature_network.path={featnet}", "feature_network.resize=none",
              "reference.name=folder", f"reference.folder={tiny_data}", f"reference.cache_dir={tmp_path / 'stats'}",
              "batch_size=20", "num_workers=0", "logger=none", "uncertainty_resamples=10"]
    (ckpt_row,) = evaluate_script.evaluate(compose_cfg(
        [f"checkpoint={teacher_ckpt}", "num_samples=40", "sampler.steps=1", f"output_dir={tmp_path / 'c'}", *common],
        config_name="evaluate"))
    assert ckpt_row["name"] == "fd_tiny-featnet@40"
    for fmt in ("png", "npz"):
        generate_script.generate(compose_cfg([f"checkpoint={teacher_ckpt}", f"output_dir={tmp_path / fmt}",
                                              "seeds=0-39", f"format={fmt}", "sampler.steps=1", "device=cpu"],
                                             config_name="generate"))
    import shutil

    shutil.make_archive(str(tmp_path / "pngs"), "zip", tmp_path / "png")  # the folder as a .zip (EDM's fid.py calc)
    for source in (tmp_path / "png", tmp_path / "npz" / "samples.npz", tmp_path / "pngs.zip"):
        (row,) = evaluate_script.evaluate(compose_cfg([f"images={source}", f"output_dir={tmp_path / 'i'}", *common],
                                                      config_name="evaluate"))
        assert row["num_samples"] == 40 and row["name"] == ckpt_row["name"]
        assert row["value"] == pytest.approx(ckpt_row["value"], rel=1e-6), source
        # the classes come from the files (class folders, arr_1), so the bootstrap draws the same resamples
        assert row["std"] == pytest.approx(ckpt_row["std"], rel=1e-3), source  # float32 sums in another order
        assert json.loads((tmp_path / "i" / "results.json").read_text())[0]["value"] == row["value"]
    # a reference file written from the folder: EDM's keys plus the metadata, and the same distance
    out = tmp_path / "refs" / "tiny-32.npz"
    evaluate_script.evaluate(compose_cfg([f"write_reference={out}", *common], config_name="evaluate"))
    with np.load(out) as stats:
        assert {"mu", "sigma", "meta"} <= set(stats.files) and stats["sigma"].shape == (8, 8)
        meta = json.loads(str(stats["meta"]))
    assert (meta["image_size"], meta["num_images"], meta["resize"], meta["dataset"]) == (32, 20, "none", "tiny")
    by_file = [a for a in common if not a.startswith("reference.")] + ["reference.name=npz", f"reference.path={out}"]
    (row,) = evaluate_script.evaluate(compose_cfg([f"images={tmp_path / 'png'}", f"output_dir={tmp_path / 'f'}",
                                                   *by_file], config_name="evaluate"))
    assert row["value"] == pytest.approx(ckpt_row["value"], rel=1e-6)


def test_images_need_a_named_reference():
    with pytest.raises(ConfigError, match="'reference.name'"):
        evaluate_script.validate(compose_cfg(["images=.", "logger=none"], config_name="evaluate"))


# ------------------------------------------------------------------------------------------------ item 5: objective


def test_a_sweep_without_evaluation_or_with_a_metric_the_run_lacks_is_refused(featnet, tiny_data, tmp_path):
    base = [*SMOKE, "data=image_folder", f"data.root={tiny_data}"]
    with pytest.raises(ConfigError, match=r"'eval_every' = 0 and 'optimized_metric' = null in a sweep"):
        check_objective(compose_cfg(base), sweeping=True)
    check_objective(compose_cfg(base), sweeping=False)  # a single run needs no objective
    check_objective(compose_cfg(base + ["optimized_metric=train/loss"]), sweeping=True)  # named: allowed
    evaluated = base + train_eval_args(featnet, tiny_data, tmp_path / "stats")
    check_objective(compose_cfg(evaluated), sweeping=True)
    with pytest.raises(ConfigError, match=r"'optimized_metric' = 'eval/fid'.*eval/fd_tiny-featnet"):
        check_objective(compose_cfg(evaluated + ["optimized_metric=eval/fid"]), sweeping=False)
    with pytest.raises(ConfigError, match=r"'optimized_metric' = 'eval/fid', but 'eval_every' = 0"):
        check_objective(compose_cfg(base + ["optimized_metric=eval/fid"]), sweeping=False)


@needs_sweeper
def test_an_optuna_sweep_with_evaluation_off_stops_at_its_first_trial(teacher_ckpt, tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "hparams_search=distill_optuna", "hydra.sweeper.n_trials=2", *SMOKE,
                   "data=image_folder", f"data.root={tiny_data}", f"teacher_checkpoint={teacher_ckpt}",
                   "eval_every=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "'eval_every' = 0 and 'optimized_metric' = null in a sweep" in proc.stderr
    assert "alembic" not in proc.stdout + proc.stderr  # optuna's storage set-up stays quiet
    assert not list(sweep.glob("*/dmd2_final.pt"))
