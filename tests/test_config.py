"""Every config group composes; the spec's keys exist with the spec's defaults; bad values are refused."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dmd2.config import ConfigError, validate
from tests.conftest import CONF, compose_cfg


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


@pytest.mark.parametrize("stage", group_options("stage"))
@pytest.mark.parametrize("arch", group_options("arch"))
@pytest.mark.parametrize("data", group_options("data"))
@pytest.mark.parametrize("logger", group_options("logger"))
def test_every_group_combination_composes(stage, arch, data, logger):
    cfg = compose_cfg([f"stage={stage}", f"arch={arch}", f"data={data}", f"logger={logger}"])
    assert cfg.stage == stage and cfg.arch.name and cfg.data.name == data and cfg.logger.name == logger


@pytest.mark.parametrize("option", group_options("experiment"))
def test_every_experiment_composes(option):
    for stage in ("teacher", "distill"):
        assert compose_cfg([f"stage={stage}", f"experiment={option}"]).stage == stage


@pytest.mark.parametrize("option", group_options("debug"))
def test_every_debug_option_composes(option):
    for stage in ("teacher", "distill"):
        assert compose_cfg([f"stage={stage}", f"debug={option}"]).device == "cpu"


def test_spec_teacher_keys_and_defaults():
    cfg = compose_cfg(["stage=teacher"])
    assert (cfg.data_dir, cfg.batch_size, cfg.lr, cfg.num_epochs, cfg.save_every) == ("./data", 128, 1e-4, 100, 5000)
    assert "output_dir" in cfg


def test_spec_distill_keys_and_defaults():
    cfg = compose_cfg(["stage=distill"])
    expected = dict(batch_size=128, generator_lr=2e-6, guidance_lr=2e-6, num_epochs=50, dfake_gen_update_ratio=10,
                    save_every=5000, conditioning_sigma=80.0, min_step_percent=0.02, max_step_percent=0.98)
    assert {k: cfg[k] for k in expected} == expected
    assert OmegaConf.is_missing(cfg, "teacher_checkpoint") and cfg.data_dir == "./data"


def test_spec_overrides_work_at_top_level():
    assert compose_cfg(["stage=teacher", "lr=2e-4"]).lr == 2e-4
    assert compose_cfg(["stage=distill", "generator_lr=5e-6"]).generator_lr == 5e-6


def test_generate_config_has_spec_keys():
    cfg = compose_cfg([], config_name="generate")
    assert cfg.output_dir == "./generated" and cfg.num_samples == 16 and OmegaConf.is_missing(cfg, "checkpoint")


def test_unknown_key_is_refused_by_composition():
    with pytest.raises(Exception, match="lrr"):
        compose_cfg(["stage=teacher", "lrr=1e-4"])


@pytest.mark.parametrize("override,key", [
    ("lr=-1", "lr"), ("lr=0", "lr"), ("batch_size=0", "batch_size"), ("num_epochs=0", "num_epochs"),
    ("save_every=0", "save_every"), ("ema_decay=1.0", "ema_decay"), ("grad_clip=-1", "grad_clip"),
    ("batch_size=abc", "batch_size"), ("arch.name=resnet", "arch.name"), ("device=tpu", "device"),
    ("data.name=imagenet", "data.name"),
])
def test_bad_teacher_values_name_the_key(override, key, tiny_data):
    cfg = compose_cfg(["stage=teacher", "data=image_folder", f"data.root={tiny_data}", override])
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(cfg)


@pytest.mark.parametrize("override,key", [
    ("generator_lr=0", "generator_lr"), ("guidance_lr=-1e-6", "guidance_lr"),
    ("dfake_gen_update_ratio=0", "dfake_gen_update_ratio"), ("min_step_percent=1.5", "min_step_percent"),
    ("min_step_percent=0.9", "min_step_percent"), ("conditioning_sigma=0", "conditioning_sigma"),
])
def test_bad_distill_values_name_the_key(override, key, tiny_data, tmp_path):
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"x")
    cfg = compose_cfg(["stage=distill", "data=image_folder", f"data.root={tiny_data}", f"teacher_checkpoint={ckpt}",
                       "max_step_percent=0.5" if "min_step_percent=0.9" == override else "seed=0", override])
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(cfg)


def test_missing_teacher_checkpoint_and_data_folder(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="teacher_checkpoint"):
        validate(compose_cfg(["stage=distill", "data=image_folder", f"data.root={tiny_data}"]))
    with pytest.raises(ConfigError, match="teacher_checkpoint.*not found"):
        validate(compose_cfg(["stage=distill", "data=image_folder", f"data.root={tiny_data}",
                              f"teacher_checkpoint={tmp_path / 'nope.pt'}"]))
    with pytest.raises(ConfigError, match="data.root.*not found"):
        validate(compose_cfg(["stage=teacher", "data=image_folder", f"data.root={tmp_path / 'missing'}"]))


def test_valid_configs_pass(tiny_data):
    validate(compose_cfg(["stage=teacher", "data=image_folder", f"data.root={tiny_data}"]))
    validate(compose_cfg(["stage=teacher", "debug=smoke"]))  # cifar10 may be downloaded later: not checked here
