"""evaluate.py and dmd2/eval/: distances, cached reference statistics, the CLI, W&B, offline failures.

A tiny random TorchScript network stands in for Inception (no weights download on a test machine).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from torch import nn

import evaluate as evaluate_script
from dmd2.config.errors import EVALUATION_ERROR, ConfigError, EvaluationError, FileError
from dmd2.eval.features import (INCEPTION_FILE, INCEPTION_URL, FeatureNetwork, batch_features, build_feature_network,
                                network_input)
from dmd2.eval.references import precomputed_cifar10_stats, reference_statistics
from dmd2.eval.statistics import feature_statistics, frechet_distance
from dmd2.train.logger import RunLogger
from tests.conftest import compose_cfg, run_cli

RESULT_FIELDS = {"metric", "name", "value", "std", "kid", "kid_std", "reference_meta", "num_samples", "nfe", "images_per_sec", "checkpoint", "step", "kind",
                 "sampler_steps", "weights", "seed", "feature_network", "resize", "protocol", "reference",
                 "reference_stats", "generation_seconds", "total_seconds", "device", "world_size",
                 "prdc", "prdc_k"}  # precision / recall / density / coverage: the folder reference keeps its features


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n,3,32,32]: random 4x4 colour fields upsampled, plus a little texture."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 200 + 28
    x = F.interpolate(low, size=32, mode="bilinear", align_corners=False) + torch.randn(n, 3, 32, 32, generator=g) * 10
    return x.clamp(0, 255).round().to(torch.uint8)


def distance_to(stats: tuple[np.ndarray, np.ndarray], images: torch.Tensor, net: FeatureNetwork) -> float:
    return frechet_distance(*feature_statistics(batch_features(images, net)), *stats)


def test_distance_is_zero_to_own_stats_and_grows_with_noise_and_colour_shift(featnet):
    net = build_feature_network("torchscript", torch.device("cpu"), path=str(featnet), resize="none")
    assert net.metric == "FD (tiny-featnet)" and net.wandb_key == "eval/fd_tiny-featnet"
    images = smooth_images(400)
    stats = feature_statistics(batch_features(images, net))
    assert stats[0].shape == (8,) and stats[1].shape == (8, 8)
    assert abs(distance_to(stats, images, net)) < 1e-8

    noisy = [distance_to(stats, (images.float() + torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
                                 * s).clamp(0, 255).round().to(torch.uint8), net) for s in (5, 15, 40, 80)]
    shifted = []
    for k in (10, 30, 60, 100):
        x = images.float()
        x[:, 0] += k
        x[:, 2] -= k
        shifted.append(distance_to(stats, x.clamp(0, 255).round().to(torch.uint8), net))
    for values in (noisy, shifted):
        assert values[0] > 1e-6 and all(a < b for a, b in zip(values, values[1:])), values


def test_folder_stats_are_cached_per_network_and_resize(featnet, tiny_data, tmp_path, caplog):
    caplog.set_level("INFO")
    cache = tmp_path / "stats"
    net = build_feature_network("torchscript", torch.device("cpu"), path=str(featnet), resize="none")
    first = reference_statistics("folder", net, str(cache), folder=str(tiny_data))
    assert first.num_images == 20 and first.image_size == 32 and Path(first.path).parent == cache
    mtime = Path(first.path).stat().st_mtime_ns
    again = reference_statistics("folder", net, str(cache), folder=str(tiny_data))
    assert again.path == first.path and Path(first.path).stat().st_mtime_ns == mtime
    assert "reusing cached reference statistics" in caplog.text
    np.testing.assert_array_equal(again.mu, first.mu)
    # another resize mode (clean-fid's 299 resize) never reuses the native-resolution statistics
    clean = reference_statistics("folder", build_feature_network("torchscript", torch.device("cpu"), path=str(featnet),
                                                                 resize="clean"), str(cache), folder=str(tiny_data))
    assert clean.path != first.path and not np.allclose(clean.mu, first.mu)
    assert "tiny-featnet" in Path(clean.path).name and "_clean" in Path(clean.path).name


def test_clean_resize_of_samples_matches_clean_fid_reading_png_files(tmp_path):
    from cleanfid.utils import ResizeDataset
    from PIL import Image

    images = smooth_images(2)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    dataset = ResizeDataset([str(tmp_path / f"{i}.png") for i in range(2)], mode="clean")
    resized = network_input(images, "clean")
    assert resized.shape == (2, 3, 299, 299) and resized.dtype == torch.float32
    torch.testing.assert_close(resized, torch.stack([dataset[i] for i in range(2)]))
    torch.testing.assert_close(network_input(images, "none"), images.float())


class FakeInceptionBase(nn.Module):
    """Stands in for inception-2015-12-05.pt (same interface: ``layers`` maps [B,3,299,299] -> 2048 features)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 2048, 1))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_inception_with_local_weights_and_precomputed_stats_is_named_fid(teacher_ckpt, tmp_path, monkeypatch):
    weights = tmp_path / "weights" / INCEPTION_FILE
    weights.parent.mkdir()
    torch.jit.script(FakeInceptionBase().eval()).save(str(weights))
    stats = tmp_path / "fid_stats"
    stats.mkdir()
    np.savez(stats / "cifar10_clean_train_32.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    # scipy's 2048x2048 matrix square root takes minutes on two busy cores; the wiring is what is tested here
    monkeypatch.setattr("dmd2.eval.statistics.gaussian_frechet_distance",
                        lambda mu1, s1, mu2, s2: float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)))
    cfg = compose_cfg([f"checkpoint={teacher_ckpt}", f"feature_network.inception_weights={weights}",
                       f"reference.cache_dir={stats}", "num_samples=6", "batch_size=3", "sampler.steps=1",
                       "allow_few_samples=true", "uncertainty_resamples=0", "reference.name=cifar10_train",
                       "logger=none", f"output_dir={tmp_path / 'out'}"], config_name="evaluate")
    (row,) = evaluate_script.evaluate(cfg)
    assert row["metric"] == "FID" and row["value"] > 0 and row["resize"] == "clean"
    assert row["feature_network"] == str(weights) and row["reference"] == "cifar10 train (clean-fid precomputed)"
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == [row]
    metrics = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["step"] == 4 and "eval/fid" in metrics


def eval_args(ckpt_or_dir: str, featnet: Path, tiny_data: Path, tmp_path: Path, out: str) -> list[str]:
    return [ckpt_or_dir, "feature_network.name=torchscript", f"feature_network.path={featnet}",
            "feature_network.resize=none", "reference.name=folder", f"reference.folder={tiny_data}",
            f"reference.cache_dir={tmp_path / 'fid_stats'}", "num_samples=40", "batch_size=20", "sampler.steps=1",
            "num_workers=0", "logger=none", f"output_dir={tmp_path / out}", f"hydra.run.dir={tmp_path / 'hydra'}"]


@pytest.mark.slow
def test_cli_checkpoint_and_checkpoint_dir(teacher_ckpt, tiny_data, featnet, tmp_path):
    proc = run_cli("evaluate.py", *eval_args(f"checkpoint={teacher_ckpt}", featnet, tiny_data, tmp_path, "one"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "one" / "results.json").read_text())
    assert set(row) == RESULT_FIELDS
    assert row["metric"] == "FD (tiny-featnet)" and row["value"] > 0 and row["kid"] is None
    assert (row["num_samples"], row["nfe"], row["kind"], row["step"], row["sampler_steps"], row["weights"]) == (
        40, 1, "teacher", 4, 1, "ema")
    assert row["images_per_sec"] > 0 and row["checkpoint"] == str(teacher_ckpt)
    assert "FD (tiny-featnet) =" in proc.stdout and "FID" not in proc.stdout
    stats_files = list((tmp_path / "fid_stats").glob("*.npz"))
    mtimes = {p: p.stat().st_mtime_ns for p in stats_files}

    proc = run_cli("evaluate.py", *eval_args(f"checkpoint_dir={teacher_ckpt.parent}", featnet, tiny_data, tmp_path,
                                             "dir"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "dir" / "results.json").read_text())
    assert [r["step"] for r in rows] == [2, 4] and all(set(r) == RESULT_FIELDS for r in rows)
    assert [Path(r["checkpoint"]).name for r in rows] == ["teacher_000002.pt", "teacher_final.pt"]
    assert rows[1]["value"] == pytest.approx(row["value"])  # same checkpoint, seed and statistics
    assert "reusing cached reference statistics" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "fid_stats").glob("*.npz")} == mtimes


class FakeConfig(dict):
    def update(self, values: dict[str, Any], allow_val_change: bool = False) -> None:  # type: ignore[override]
        for key, value in values.items():
            self.setdefault(key, {}).update(value) if isinstance(value, dict) else self.__setitem__(key, value)


class FakeRun:
    """Records what RunLogger sends to W&B."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, Any], int]] = []
        self.defined: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {}
        self.finished = False
        self.offline = True
        self.config = FakeConfig()

    def log(self, data: dict[str, Any], step: int) -> None:
        self.logged.append((data, step))

    def define_metric(self, key: str, **kwargs: Any) -> None:
        self.defined[key] = kwargs

    def finish(self, exit_code: int = 0) -> None:
        self.finished = True


def test_checkpoint_dir_logs_the_curve_and_summary_to_wandb(teacher_ckpt, tiny_data, featnet, tmp_path, monkeypatch):
    run = FakeRun()
    monkeypatch.setattr(RunLogger, "_start_wandb", lambda self, *args: run)
    args = eval_args(f"checkpoint_dir={teacher_ckpt.parent}", featnet, tiny_data, tmp_path, "out")
    cfg = compose_cfg([a for a in args if not a.startswith(("hydra.", "logger="))] + ["kid=true", "num_samples=10"],
                      config_name="evaluate")
    assert cfg.logger.name == "wandb"
    rows = evaluate_script.evaluate(cfg)
    assert [step for _, step in run.logged] == [2, 4] == [r["step"] for r in rows]
    assert all(r["kid"] is not None for r in rows)
    min_by_step = {"summary": "min", "step_metric": "step"}  # every eval/* series on the training-step axis
    assert run.defined["eval/fd_tiny-featnet"] == min_by_step and run.defined["eval/kid"] == min_by_step
    assert run.defined["eval/*"] == {"step_metric": "step"} and all(data["step"] == s for data, s in run.logged)
    # each checkpoint measured is recorded as an input of the evaluation run
    assert {"checkpoint_000002", "checkpoint_000004"} <= set(run.config["inputs"])
    assert {"eval/fd_tiny-featnet", "eval/kid", "eval/nfe", "eval/images_per_sec"} <= set(run.logged[0][0])
    best = min(rows, key=lambda r: r["value"])
    assert run.summary["eval/fd_tiny-featnet"] == best["value"] and run.summary["eval/step"] == best["step"]
    assert {"eval/num_samples", "eval/nfe", "eval/images_per_sec", "eval/checkpoint", "eval/metric"} <= set(run.summary)
    assert run.finished


def test_missing_inception_weights_fail_before_any_sampling(teacher_ckpt, tmp_path):
    proc = run_cli("evaluate.py", f"checkpoint={teacher_ckpt}", "logger=none", f"output_dir={tmp_path / 'out'}",
                   f"feature_network.inception_weights={tmp_path / 'nowhere' / INCEPTION_FILE}",
                   f"hydra.run.dir={tmp_path / 'hydra'}")
    assert proc.returncode == EVALUATION_ERROR, proc.stderr[-3000:]
    assert "[evaluate]" not in proc.stdout + proc.stderr  # no checkpoint was loaded or sampled
    assert INCEPTION_FILE in proc.stderr and INCEPTION_URL in proc.stderr
    assert "feature_network.inception_weights" in proc.stderr and "feature_network.allow_download" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_precomputed_stats_fail_offline(tmp_path, monkeypatch):
    import cleanfid

    monkeypatch.setattr(cleanfid, "__file__", str(tmp_path / "cleanfid" / "__init__.py"))  # an empty stats folder
    inception = FeatureNetwork("inception_v3", "FID", "eval/fid", "clean", lambda x: x, torch.device("cpu"), "-")
    with pytest.raises(EvaluationError, match="reference.folder=") as err:
        precomputed_cifar10_stats(inception, str(tmp_path / "fid_stats"), allow_download=False)
    assert "cifar10_clean_train_32.npz" in str(err.value) and "allow_download" in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    ([], "'checkpoint' and 'checkpoint_dir'"),
    (["checkpoint=CKPT", "num_samples=1"], "'num_samples'"),
    (["checkpoint=CKPT", "feature_network.resize=none"], "'feature_network.resize'"),
    (["checkpoint=CKPT", "feature_network.name=torchscript"], "'feature_network.path'"),
    (["checkpoint=CKPT", "reference.name=folder"], "'reference.folder'"),
    (["checkpoint=CKPT", "reference.folder=."], "'reference.folder'"),
    (["checkpoint=CKPT", "sampler.steps=0"], "'sampler.steps'"),
    (["checkpoint=CKPT", "kid=maybe"], "override kid=maybe"),  # a wrong type: refused while composing
])
def test_bad_config_values_name_the_key(overrides, message, tmp_path):
    ckpt = tmp_path / "x.pt"
    ckpt.touch()
    # a path key without its file is a FileError (no longer a kind of ConfigError)
    with pytest.raises((ConfigError, FileError, ConfigCompositionException), match=message):
        evaluate_script.validate(compose_cfg([o.replace("CKPT", str(ckpt)) for o in overrides] + ["logger=none"],
                                             config_name="evaluate"))


def test_evaluate_defaults():
    cfg = compose_cfg(["logger=none"], config_name="evaluate")
    assert (cfg.num_samples, cfg.sampler.steps, cfg.kid, cfg.feature_network.name, cfg.reference.cache_dir) == (
        50000, 18, False, "inception", "./fid_stats")
    assert cfg.reference.allow_download is False and OmegaConf.select(cfg, "feature_network.inception_weights") is None


def test_evaluate_and_generate_take_train_pys_eval_and_local_groups():
    from dmd2.config.cli import eval_group_overrides

    argv = eval_group_overrides(["evaluate.py", "checkpoint=x.pt", "eval=featnet", "paths.featnet=/nets/f.ts.pt"])
    assert argv[2] == "eval@_global_=featnet"  # evaluate.py's command line says eval=featnet, as train.py's does
    cfg = compose_cfg(argv[1:], config_name="evaluate")
    train = compose_cfg(["eval=featnet", "paths.featnet=/nets/f.ts.pt"])
    assert OmegaConf.to_container(cfg.feature_network, resolve=True) == OmegaConf.to_container(
        train.eval.feature_network, resolve=True)  # one group file, the same network in both scripts
    assert cfg.feature_network.path == "/nets/f.ts.pt" and cfg.reference.name == "auto"
    # the machine's paths (conf/local/default.yaml) are keys of all three scripts
    assert compose_cfg(["checkpoint=x.pt", "paths.featnet=/n.pt"], config_name="generate").paths.featnet == "/n.pt"


def test_one_statistics_cache_per_set_of_images_whatever_asked_for_it(featnet, tiny_data, tmp_path, caplog):
    """The training data of data=image_folder (reference.name=auto: train.py's eval, evaluate.py on its
    checkpoints) whose files already have data.resolution is the folder: reference.name=folder reuses its cache."""
    caplog.set_level("INFO")
    cache = tmp_path / "stats"
    net = build_feature_network("torchscript", torch.device("cpu"), path=str(featnet), resize="none")
    data = {"name": "image_folder", "root": str(tiny_data), "resolution": 32, "num_classes": 10}
    auto = reference_statistics("auto", net, str(cache), data=data)
    caplog.clear()
    folder = reference_statistics("folder", net, str(cache), folder=str(tiny_data) + "/")  # another spelling
    assert folder.path == auto.path and "reusing cached reference statistics" in caplog.text
    np.testing.assert_array_equal(folder.mu, auto.mu)
    assert len(list(cache.glob("*.npz"))) == 2  # the statistics and their features: one set
    # at another resolution the model sees resized images: statistics of their own
    other = reference_statistics("auto", net, str(cache), data={**data, "resolution": 16})
    assert other.path != auto.path
