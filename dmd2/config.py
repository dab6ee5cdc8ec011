"""Config checks that run before any data loading or model building, plus small config helpers.

Unknown keys are already refused by Hydra (the composed config is in struct mode). Here every
value a runner reads is checked for type and range, and each failure names the key and what is
expected, so a typo costs seconds, not a crashed job hours later.
"""
from __future__ import annotations

import os
from numbers import Real
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from dmd2.networks import ARCHITECTURES


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def positive_int(v: Any) -> bool:
    return _is_int(v) and v >= 1


def nonneg_int(v: Any) -> bool:
    return _is_int(v) and v >= 0


def positive(v: Any) -> bool:
    return _is_num(v) and v > 0


def nonneg(v: Any) -> bool:
    return _is_num(v) and v >= 0


def fraction(v: Any) -> bool:
    return _is_num(v) and 0 <= v <= 1


def optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or rule(v)


Rule = tuple[str, Callable[[Any], bool], str]

COMMON_RULES: list[Rule] = [
    ("seed", nonneg_int, "an integer >= 0"),
    ("batch_size", positive_int, "an integer >= 1"),
    ("num_epochs", positive_int, "an integer >= 1"),
    ("max_steps", optional(positive_int), "null or an integer >= 1"),
    ("save_every", positive_int, "an integer >= 1 (steps between checkpoints)"),
    ("log_every", positive_int, "an integer >= 1"),
    ("sample_every", nonneg_int, "an integer >= 0 (0 = only at the end)"),
    ("samples_per_class", positive_int, "an integer >= 1"),
    ("sample_steps", positive_int, "an integer >= 1 (Heun steps)"),
    ("warmup_steps", nonneg_int, "an integer >= 0"),
    ("grad_clip", optional(positive), "null or a number > 0"),
    ("weight_decay", nonneg, "a number >= 0"),
    ("adam_betas", lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(fraction(b) for b in v),
     "two numbers in [0, 1]"),
    ("data.num_classes", positive_int, "an integer >= 1"),
    ("data.resolution", positive_int, "an integer >= 1"),
    ("data.num_workers", nonneg_int, "an integer >= 0"),
    ("precision", lambda v: v in ("fp32", "bf16"), "'fp32' or 'bf16' (bf16 autocast on CUDA only)"),
    ("keep_last", optional(positive_int), "null (keep all) or an integer >= 1"),
    ("on_nonfinite", lambda v: v in ("stop", "skip"), "'stop' or 'skip'"),
    ("resume", optional(lambda v: isinstance(v, str) and len(v) > 0), "null, 'auto' or a checkpoint path"),
    ("resume_allow_changes", lambda v: isinstance(v, bool), "true or false"),
    ("perf.tf32", lambda v: isinstance(v, bool), "true or false"),
    ("perf.cudnn_benchmark", lambda v: isinstance(v, bool), "true or false"),
    ("perf.channels_last", lambda v: isinstance(v, bool), "true or false"),
    ("perf.compile", lambda v: isinstance(v, bool), "true or false"),
    ("perf.fused_adamw", lambda v: v == "auto" or isinstance(v, bool), "'auto', true or false"),
    ("perf.cache_dataset", lambda v: v == "auto" or isinstance(v, bool), "'auto', true or false"),
    ("perf.cache_max_gb", nonneg, "a number >= 0 (GB)"),
    ("eval_every", nonneg_int, "an integer >= 0 (steps between FID/FD evaluations; 0 = off)"),
    ("optimized_metric", optional(lambda v: isinstance(v, str) and v.startswith(("train/", "eval/"))),
     "null or a metric key such as eval/fid or train/loss_fake"),
]

EVAL_RULES: list[Rule] = [
    ("eval.num_samples", lambda v: positive_int(v) and v >= 2, "an integer >= 2 (samples per evaluation)"),
    ("eval.batch_size", positive_int, "an integer >= 1"),
    ("eval.seed", nonneg_int, "an integer >= 0"),
    ("eval.sampler_steps", positive_int, "an integer >= 1 (Heun steps of the teacher's samples)"),
]

STAGE_RULES: dict[str, list[Rule]] = {
    "teacher": [
        ("lr", positive, "a number > 0"),
        ("ema_decay", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("sigma_data", positive, "a number > 0"),
        ("p_std", positive, "a number > 0"),
        ("p_mean", _is_num, "a number"),
        ("arch.name", lambda v: v in ARCHITECTURES, f"one of {sorted(ARCHITECTURES)}"),
    ],
    "distill": [
        ("generator_lr", positive, "a number > 0"),
        ("guidance_lr", positive, "a number > 0"),
        ("dfake_gen_update_ratio", positive_int, "an integer >= 1 (generator update every N steps)"),
        ("conditioning_sigma", positive, "a number > 0"),
        ("min_step_percent", fraction, "a number in [0, 1]"),
        ("max_step_percent", fraction, "a number in [0, 1]"),
        ("num_train_timesteps", lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
        ("arch.name", lambda v: v in ARCHITECTURES or v == "from_teacher",
         f"'from_teacher' or one of {sorted(ARCHITECTURES)}"),
        ("denoising_sigmas", optional(lambda v: isinstance(v, list) and len(v) >= 1 and all(positive(s) for s in v)
                                      and all(a > b for a, b in zip(v, v[1:]))),
         "null or a non-empty list of positive sigmas in strictly descending order, e.g. [80.0, 2.5, 0.6, 0.1]"),
        ("generator_ema_decay", optional(lambda v: _is_num(v) and 0 <= v < 1), "null or a number in [0, 1)"),
        ("gan_classifier", lambda v: isinstance(v, bool), "true or false"),
        ("cls_loss_weight", nonneg, "a number >= 0"),
        ("gen_cls_loss_weight", nonneg, "a number >= 0"),
        ("diffusion_gan", lambda v: isinstance(v, bool), "true or false"),
        ("diffusion_gan_max_timestep", positive_int, "an integer >= 1"),
        ("dropout", optional(fraction), "null (the teacher's) or a number in [0, 1]"),
    ],
}


FEATURE_NETWORKS = ("inception", "torchscript")
RESIZE_MODES = ("clean", "none")
REFERENCES = ("cifar10_train", "folder")


def one_of(options: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in options


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def is_path(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def fid_rules(prefix: str = "") -> list[Rule]:
    """Rules of the feature network and reference keys (conf/fid/default.yaml), under ``prefix`` ("" for
    evaluate.py, "eval." for the evaluation inside training)."""
    return [(prefix + key, rule, expected) for key, rule, expected in [
        ("feature_network.name", one_of(FEATURE_NETWORKS), f"one of {list(FEATURE_NETWORKS)}"),
        ("feature_network.path", optional(is_path), "null or a TorchScript file"),
        ("feature_network.resize", one_of(RESIZE_MODES), f"one of {list(RESIZE_MODES)}"),
        ("feature_network.inception_weights", optional(is_path), "null or the path of inception-2015-12-05.pt"),
        ("feature_network.allow_download", is_bool, "true or false"),
        ("reference.name", one_of(REFERENCES), f"one of {list(REFERENCES)}"),
        ("reference.folder", optional(is_path), "null or an image folder"),
        ("reference.cache_dir", is_path, "a folder for cached statistics"),
        ("reference.allow_download", is_bool, "true or false"),
    ]]


def check_fid(cfg: DictConfig, prefix: str = "") -> None:
    """The feature-network and reference keys under ``prefix``: values, files and their combinations."""
    check_rules(cfg, fid_rules(prefix))
    fn, ref = OmegaConf.select(cfg, prefix + "feature_network"), OmegaConf.select(cfg, prefix + "reference")
    if fn.name == "inception" and fn.resize != "clean":
        fail(prefix + "feature_network.resize", fn.resize, "'clean' for Inception (it takes 299x299 inputs)")
    if fn.name == "inception" and fn.path is not None:
        fail(prefix + "feature_network.path", fn.path, f"null with {prefix}feature_network.name=inception "
             f"(set {prefix}feature_network.name=torchscript to use this file)")
    if fn.name == "torchscript" and (fn.path is None or not os.path.isfile(fn.path)):
        fail(prefix + "feature_network.path", fn.path,
             f"an existing TorchScript file with {prefix}feature_network.name=torchscript")
    if ref.name == "folder" and (ref.folder is None or not os.path.isdir(ref.folder)):
        fail(prefix + "reference.folder", ref.folder, f"an existing image folder with {prefix}reference.name=folder")
    if ref.name == "cifar10_train" and ref.folder is not None:
        fail(prefix + "reference.folder", ref.folder, f"null with {prefix}reference.name=cifar10_train (clean-fid's "
             f"precomputed statistics); add {prefix}reference.name=folder to use this folder")
    if ref.name == "cifar10_train" and fn.name != "inception":
        fail(prefix + "reference.name", ref.name, "'folder' with a TorchScript feature network (clean-fid's "
             f"precomputed statistics are Inception features); add {prefix}reference.folder=<image folder>")


def fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def check_rules(cfg: DictConfig, rules: list[Rule]) -> None:
    for key, rule, expected in rules:
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"config key '{key}' is required but not set: expected {expected}")
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig) or OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        if not rule(value):
            fail(key, value, expected)


def check_file(cfg: DictConfig, key: str, what: str) -> None:
    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"config key '{key}' is required: pass {key}=path/to/{what}")
    path = cfg[key]
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ConfigError(f"config key '{key}' = {path!r}: file not found (expected {what})")


def check_data(cfg: DictConfig) -> None:
    name = cfg.data.get("name")
    if name not in ("cifar10", "image_folder"):
        fail("data.name", name, "'cifar10' or 'image_folder'")
    root = cfg.data.root
    if name == "image_folder" and (not isinstance(root, str) or not os.path.isdir(root)):
        raise ConfigError(
            f"config key 'data.root' = {root!r}: folder not found (expected a class-folder tree root/<class>/<image>)"
        )


def check_device(cfg: DictConfig) -> None:
    device = cfg.device
    if device == "auto" or device == "cpu":
        return
    if not (isinstance(device, str) and device.split(":")[0] == "cuda"):
        fail("device", device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' = {device!r}: CUDA is not available on this machine")


def validate(cfg: DictConfig) -> None:
    """Check a composed training config; raise ConfigError naming the first bad key."""
    stage = cfg.get("stage")
    if stage not in STAGE_RULES:
        fail("stage", stage, f"one of {sorted(STAGE_RULES)}")
    check_rules(cfg, COMMON_RULES + STAGE_RULES[stage])
    if cfg.eval_every > 0:
        check_rules(cfg, EVAL_RULES)
        check_fid(cfg, "eval.")
    check_device(cfg)
    check_data(cfg)
    if cfg.resume not in (None, "auto") and not os.path.isfile(cfg.resume):
        raise ConfigError(f"config key 'resume' = {cfg.resume!r}: file not found (expected null, auto or a checkpoint)")
    if cfg.resume == "auto" and not cfg.output_dir:
        raise ConfigError("config key 'resume' = 'auto' needs output_dir=<the folder of the run to continue>")
    if stage == "distill":
        if cfg.min_step_percent >= cfg.max_step_percent:
            raise ConfigError(
                f"config keys 'min_step_percent' = {cfg.min_step_percent} and 'max_step_percent' = "
                f"{cfg.max_step_percent}: expected min_step_percent < max_step_percent"
            )
        if cfg.denoising_sigmas is not None and cfg.denoising_sigmas[0] != cfg.conditioning_sigma:
            raise ConfigError(
                f"config key 'denoising_sigmas' = {list(cfg.denoising_sigmas)}: its first sigma must equal "
                f"conditioning_sigma = {cfg.conditioning_sigma} (the generator starts from pure noise at that level)"
            )
        if cfg.diffusion_gan_max_timestep > cfg.num_train_timesteps:
            fail("diffusion_gan_max_timestep", cfg.diffusion_gan_max_timestep,
                 f"an integer <= num_train_timesteps ({cfg.num_train_timesteps})")
        check_file(cfg, "teacher_checkpoint", "teacher_final.pt")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python data (stored with every run and checkpoint)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
