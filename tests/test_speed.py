"""Fast paths (the ``perf`` config node): each switch changes speed, not results."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from dmd2.config.errors import ConfigError
from dmd2.config.validate import validate
from dmd2.data.batches import CachedBatches, build_batches, build_loader
from dmd2.data.datasets import LabelsOnly, build_dataset
from dmd2.io.checkpoint import load_checkpoint
from dmd2.runtime.perf import cache_fits, fused_adamw
from tests.conftest import SMOKE, assert_trained_alike, compose_cfg, run_cli


def folder_dataset(root: Path):
    return build_dataset({"name": "image_folder", "root": str(root), "num_classes": 10, "resolution": 32})


@pytest.mark.parametrize("rank", [0, 1])
def test_cached_batches_match_the_loader_batch_for_batch(tiny_data, rank):
    ds = folder_dataset(tiny_data)
    loader = iter(build_loader(ds, 4, 0, seed=5, start_step=3, rank=rank, world_size=2))
    cached = iter(CachedBatches(ds, 4, seed=5, device=torch.device("cpu"), start_step=3, rank=rank, world_size=2))
    for _ in range(6):  # 20 images, global batch 8: crosses two epoch boundaries
        (x1, y1), (x2, y2) = next(loader), next(cached)
        assert torch.equal(y1, y2)
        assert x2.dtype == torch.float32 and x2.shape == (4, 3, 32, 32)
        torch.testing.assert_close(x1, x2, rtol=0, atol=1e-6)  # the same uint8 pixels, normalised alike


def test_labels_only_datasets_cache_labels_without_images(tiny_data):
    ds = LabelsOnly(folder_dataset(tiny_data))
    batches = build_batches(ds, 4, 0, torch.device("cpu"), {"cache_dataset": "auto", "cache_max_gb": 0.0}, 0)
    assert isinstance(batches, CachedBatches) and batches.images is None
    x, y = next(iter(batches))
    assert x.numel() == 0 and y.shape == (4,)


def test_cache_and_fused_adamw_switches():
    assert cache_fits("auto", 150_000_000, 2.0) and not cache_fits("auto", 3_000_000_000, 2.0)
    assert cache_fits(True, 10**12, 0.0) and not cache_fits(False, 1, 2.0)
    assert fused_adamw("auto", torch.device("cuda")) and not fused_adamw("auto", torch.device("cpu"))
    assert fused_adamw(True, torch.device("cpu"))


@pytest.mark.parametrize("key,value", [("perf.fused_adamw", "maybe"), ("perf.cache_dataset", "yes"),
                                       ("perf.channels_last", "maybe"), ("perf.cache_max_gb", -1)])
def test_bad_perf_values_are_refused_by_name(key, value):
    """By the schema's rule (validate) or, for a value of the wrong type, while composing."""
    with pytest.raises((ConfigError, ConfigCompositionException), match=key.replace(".", r"\.")):
        validate(compose_cfg(["stage=teacher", f"{key}={value}"]))


def train_teacher(tiny_data: Path, out: Path, *switches: str, fresh_process: bool = False) -> dict:
    """A short teacher run with ``switches``: in this process, or (``fresh_process``) through the CLI in a fresh one
    (torch.compile: its compiled code and caches stay out of the test process)."""
    args = [*SMOKE, "stage=teacher", "data=image_folder", f"data.root={tiny_data}", "arch.dropout=0", "lr=1e-3",
            f"output_dir={out}", *switches]
    if fresh_process:
        proc = run_cli("train.py", *args, f"hydra.run.dir={out / 'hydra'}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        from train import train

        train(compose_cfg(args))
    return load_checkpoint(str(out / "teacher_final.pt"))


@pytest.mark.slow
def test_cpu_fast_paths_train_like_the_plain_path(tiny_data, tmp_path):
    plain = train_teacher(tiny_data, tmp_path / "plain", "perf.cache_dataset=false", "perf.fused_adamw=false")
    fast = train_teacher(tiny_data, tmp_path / "fast", "perf.cache_dataset=true", "perf.fused_adamw=true",
                         "perf.channels_last=true")
    assert_trained_alike(plain["model"], fast["model"], 1e-3, "fast paths")
    assert fast["config"]["perf"]["channels_last"] is True  # stored with the run


@pytest.mark.slow
def test_compiled_networks_train_like_eager_ones(tiny_data, tmp_path):
    eager = train_teacher(tiny_data, tmp_path / "eager")
    compiled = train_teacher(tiny_data, tmp_path / "compiled", "perf.compile=true", fresh_process=True)
    assert_trained_alike(eager["model"], compiled["model"], 1e-3, "compile")
    assert list(compiled["model"]) == list(eager["model"])  # in-place compile: same state_dict keys
