"""Every config group composes; the spec's keys exist with the spec's defaults; bad values are refused."""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dmd2.config.errors import ConfigError, FileError
from dmd2.config.settings import SCHEMAS, DistillSettings, TeacherSettings, describe
from dmd2.config.validate import validate
from dmd2.io.weights import build_denoiser
from dmd2.method.guidance import GuidanceModel
from dmd2.method.unified import UnifiedModel
from dmd2.train.distill import distill_model
from tests.conftest import CONF, compose_cfg, run_cli


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
    """A preset composes with its own stage; a distill preset forced onto the teacher stage is refused at
    composition, naming a key the teacher does not have (before, it composed into a mixed config)."""
    cfg = compose_cfg([f"experiment={option}"])
    assert cfg.stage in ("teacher", "distill")
    if cfg.stage == "distill" and any(k in cfg for k in ("gan_classifier", "generator_lr")):
        with pytest.raises(Exception, match="not in 'TeacherSettings'"):
            compose_cfg(["stage=teacher", f"experiment={option}"])


@pytest.mark.parametrize("option", group_options("debug"))
def test_every_debug_option_composes(option):
    for stage in ("teacher", "distill"):
        assert compose_cfg([f"stage={stage}", f"debug={option}"]).device == "cpu"


def test_the_smoke_distillation_updates_its_generator_after_step_0():
    """debug=smoke runs 4 steps; its distillation updates the generator every 2nd step (conf/debug_stage), so the
    update at step 2 is a real one (at step 0 the DM gradient is exactly zero). The command line still wins."""
    assert compose_cfg(["debug=smoke", "stage=distill"]).dfake_gen_update_ratio == 2
    assert compose_cfg(["debug=smoke", "stage=distill", "dfake_gen_update_ratio=3"]).dfake_gen_update_ratio == 3
    assert compose_cfg(["stage=distill"]).dfake_gen_update_ratio == 10
    assert compose_cfg(["experiment=dmd2_imagenet64"]).dfake_gen_update_ratio == 5  # a preset's own, without smoke
    assert "dfake_gen_update_ratio" not in compose_cfg(["debug=smoke", "stage=teacher"])


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
    assert cfg.output_dir == "./generated" and cfg.seeds is None and cfg.format == "png"
    assert OmegaConf.is_missing(cfg, "checkpoint")


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
    """A wrong type is refused while composing (Hydra, from the schema's type), a wrong value by validate
    (the schema's rule); both name the key."""
    with pytest.raises((ConfigError, ConfigCompositionException), match=rf"(?<![\w.]){re.escape(key)}\b"):
        validate(compose_cfg(["stage=teacher", "data=image_folder", f"data.root={tiny_data}", override]))


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


@pytest.mark.parametrize("override,key,expected", [
    ("+typo=1", "typo", "unknown config key"), ("++typo=1", "typo", "unknown config key"),
    ("+data.typo=1", "data.typo", "unknown config key"), ("++eval.reference.typo=1", "eval.reference.typo",
                                                          "unknown config key"),
    ("lr=inf", "lr", "finite"), ("lr=nan", "lr", "finite"), ("p_mean=-inf", "p_mean", "finite"),
    ("weight_decay=inf", "weight_decay", "finite"), ("lr=1e300", "lr", "float32"), ("adam_betas=[0.9,nan]", "adam_betas", "finite"),
    ("eval.feature_network.allow_download=true", None, None), ("seed=1180591620717411303424", "seed", "64 bits"),
    ("seed=1099511627776", "seed", "2\\*\\*40"), ("data.mixture_seed=-1", "data.mixture_seed", "seed"),
    ("eval.seed=1180591620717411303424", "eval.seed", "64 bits"),
    ("max_steps=1180591620717411303424", "max_steps", "64 bits"),
])
def test_one_rule_for_every_key(override, key, expected):
    """Keys added with +/++ are refused (they would be ignored); floats must be finite, integers fit 64 bits,
    seeds fit the random generators: at composition, naming the key."""
    cfg = compose_cfg(["stage=teacher", "debug=smoke", override])
    if key is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")) as err:
        validate(cfg)
    assert re.search(expected, str(err.value)), str(err.value)


def test_the_rule_holds_for_evaluate_and_generate():
    from dmd2.config.validate import check_settings

    for name, override in (("evaluate", "+typo=1"), ("evaluate", "num_samples=1180591620717411303424"),
                           ("generate", "++typo=1"), ("generate", "seeds=[0,1099511627776]"),
                           ("evaluate", "seed=1099511627776")):
        cfg = compose_cfg(["checkpoint=x.pt", override], config_name=name)
        with pytest.raises(ConfigError, match=re.escape(override.lstrip("+").split("=")[0])):
            check_settings(cfg)


def test_missing_teacher_checkpoint_and_data_folder(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="teacher_checkpoint"):
        validate(compose_cfg(["stage=distill", "data=image_folder", f"data.root={tiny_data}"]))
    with pytest.raises(FileError, match="teacher_checkpoint.*not found"):  # no ConfigError: a cause of its own
        validate(compose_cfg(["stage=distill", "data=image_folder", f"data.root={tiny_data}",
                              f"teacher_checkpoint={tmp_path / 'nope.pt'}"]))
    with pytest.raises(FileError, match="data.root.*not found"):
        validate(compose_cfg(["stage=teacher", "data=image_folder", f"data.root={tmp_path / 'missing'}"]))


def test_valid_configs_pass(tiny_data):
    validate(compose_cfg(["stage=teacher", "data=image_folder", f"data.root={tiny_data}"]))
    validate(compose_cfg(["stage=teacher"]))  # cifar10 may be downloaded later: not checked here
    validate(compose_cfg(["stage=teacher", "debug=smoke"]))  # generated data: nothing to check
    with pytest.raises(ConfigError, match="'data.root'.*data=synthetic.*data=edm_dataset"):  # a root it would ignore
        validate(compose_cfg(["experiment=dmd2_imagenet64", "debug=smoke", "data.root=imagenet.zip",
                              "teacher_checkpoint=x.pt"]))


def test_every_setting_has_one_definition_with_a_meaning():
    """dmd2/config/settings.py is the one place a setting is defined: each field carries a one-line meaning, and each
    leaf setting a rule (except free-form lists such as tags and class names)."""
    for node in SCHEMAS.values():
        for key, expected, meaning in describe(node):
            assert meaning and "\n" not in meaning, f"{node.__name__}.{key} has no one-line meaning"
            assert expected or key in ("tags", "class_names"), f"{node.__name__}.{key} has no rule"


def test_stage_files_hold_only_values():
    """The stage YAMLs define nothing: every key they set is a field of their schema."""
    for stage, schema in (("teacher", TeacherSettings), ("distill", DistillSettings)):
        raw = OmegaConf.load(Path(CONF) / "stage" / f"{stage}.yaml")
        fields = {f.name for f in dataclasses.fields(schema)}
        assert set(raw) - {"defaults"} <= fields


def test_help_lists_every_key_with_its_meaning():
    """train.py --help through the real CLI; evaluate.py's and generate.py's templates (the same mechanism)
    from Hydra's config store."""
    proc = run_cli("train.py", "--help")
    assert proc.returncode == 0, proc.stderr
    templates = {name: ConfigStore.instance().load(f"hydra/help/{name}.yaml").node.template
                 for name in ("dmd2_evaluate", "dmd2_generate")}
    for text, keys in [(proc.stdout, ["generator_lr:", "dfake_gen_update_ratio:", "lr:", "arch.model_channels:",
                                      "eval.num_samples:", "perf.compile:", "logger.mode:"]),
                       (templates["dmd2_evaluate"], ["num_samples:", "feature_network.name:", "reference.path:"]),
                       (templates["dmd2_generate"], ["seeds:", "classes:", "format:", "class_names:"])]:
        for key in keys:
            line = next((ln for ln in text.splitlines() if ln.strip().startswith(key)), None)
            assert line is not None and len(line.split(":", 1)[1].strip()) > 5, key
    assert "== This run's config" in proc.stdout and "-sc install=bash" in proc.stdout
    # each script lists the config groups it uses, with their options (no internal schema groups)
    groups = proc.stdout.split("== Keys")[0]
    assert "data: cifar10, edm_dataset, gaussian_mixture, image_folder, synthetic" in groups and "schema" not in groups
    assert "logger: none, wandb\nprotocol: edm\neval: featnet\nlocal: example" in templates["dmd2_evaluate"]
    assert "== Config groups ==\nlocal: example" in templates["dmd2_generate"]


def test_models_read_the_stage_settings_and_keep_no_defaults():
    """UnifiedModel / GuidanceModel take plain arguments without defaults; distill_model builds them from the
    stage settings (a composed config or the DistillSettings object), where every default lives."""
    for cls in (UnifiedModel, GuidanceModel):
        params = inspect.signature(cls.__init__).parameters
        assert all(p.default is inspect.Parameter.empty for n, p in params.items() if n != "self"), cls
    teacher = build_denoiser({"name": "simple_unet", "channels": [8, 16], "emb_dim": 16, "noise_emb_dim": 8,
                              "groups": 4}, 10, 8, 0.5)
    cfg = compose_cfg(["stage=distill", "min_step_percent=0.1", "max_step_percent=0.5", "num_train_timesteps=100",
                       "denoising_sigmas=[80.0,1.0]", "gan_classifier=true"])
    model = distill_model(teacher, cfg)
    assert (model.guidance.min_step, model.guidance.max_step, len(model.guidance.sigmas)) == (10, 50, 100)
    assert model.denoising_sigmas == [80.0, 1.0] and model.guidance.gan_head is not None
    same = distill_model(teacher, DistillSettings(min_step_percent=0.1, max_step_percent=0.5, num_train_timesteps=100,
                                                 denoising_sigmas=[80.0, 1.0], gan_classifier=True))
    assert (same.guidance.min_step, same.guidance.max_step, same.denoising_sigmas) == (10, 50, [80.0, 1.0])


@pytest.mark.parametrize("override, key, expected", [
    ("adam_betas=[1.0,1.0]", "adam_betas", "two numbers in [0, 1)"),
    ("samples_per_class=100000", "samples_per_class", "an integer in [1, 64]"),
    ("eval.num_samples=1000000000", "eval.num_samples", "an integer in [2, 10000000]"),
    ("data.resolution=100000", "data.resolution", "an integer in [1, 1024]"),
    ("arch.channels=[]", "arch.channels", "a non-empty list"),
    ("arch.groups=3", "arch.groups", "a divisor of every entry of channels"),
    ("lr=3e38", "lr", "a number in (0, 1]"),
])
def test_values_that_cannot_work_are_refused_at_composition(override, key, expected):
    from dmd2.config.validate import check_settings

    cfg = compose_cfg(["debug=smoke", "arch=simple_unet", override])
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' = ") + ".*" + re.escape(expected)):
        check_settings(cfg)


@pytest.mark.parametrize("override, message", [
    ("~lr", r"config key 'lr' was removed \(~lr\)"),
    ("seed=${oc.env:DMD2_NO_SUCH_VARIABLE}", r"config key 'seed': its value cannot be resolved .*DMD2_NO_SUCH_VARIABLE"),
    ("lr=${lr}", r"config key 'lr': its value cannot be resolved \(Recursive interpolation"),
])
def test_a_removed_key_or_an_unresolvable_interpolation_is_a_config_error(override, message, monkeypatch):
    from dmd2.config.validate import check_settings

    monkeypatch.delenv("DMD2_NO_SUCH_VARIABLE", raising=False)
    with pytest.raises(ConfigError, match=message):
        check_settings(compose_cfg(["debug=smoke", override]))


def test_a_path_that_is_not_utf8_is_refused_before_any_log_line():
    """A shell path with non-UTF-8 bytes (decoded with surrogate escapes) made every log line naming it a logging
    traceback; the rule every key shares refuses it, naming the key."""
    from dmd2.config.validate import check_settings

    with pytest.raises(ConfigError, match=r"'output_dir' = .*expected text in UTF-8"):
        check_settings(compose_cfg(["debug=smoke", "output_dir='/tmp/o\udcff'"]))
