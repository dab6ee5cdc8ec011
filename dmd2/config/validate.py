"""Config checks that run before any data loading or model building, plus small config helpers.

Every key is defined once, with its type, allowed values, default and meaning, in ``dmd2/config/settings.py``. Hydra
refuses unknown keys and wrong types while composing; ``check_settings`` refuses keys added with +key / ++key,
applies the rule every key shares (finite floats, 64-bit integers) and each key's own rule; the checks
below are the ones that involve several keys, files or the machine. Each failure names the key and what is
expected, so a typo costs seconds, not a crashed job hours later.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dmd2.config.errors import ConfigError, FileError
from dmd2.config.settings import DEFAULT_EMA, GENERATED_DATA, RAW_WEIGHTS, ema_name

# This module is on the config-composition path of the scripts (--help, tab completion): it imports torch only
# inside the functions that need it.


def fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def fail_file(key: str, value: Any, expected: str) -> None:
    """Like ``fail``, for a key naming a file or folder that is missing or of the wrong kind (exit status 3)."""
    raise FileError(f"config key '{key}' = {value!r}: expected {expected}")


INT64 = 2 ** 63  # integers must fit a 64-bit signed integer (tensors, RNG seeds, step counters)
FLOAT32_MAX = 3.4028234663852886e38  # floats meet float32 tensors: a larger value becomes inf there


def out_of_range(value: Any) -> str | None:
    """What is wrong with a value anywhere in ``value`` (lists included) under the rule every key shares: floats
    finite in float32 (no key documents inf or nan as meaningful), integers within 64 bits, text in UTF-8 (logs and
    file names are written in it); None when nothing is."""
    if isinstance(value, (list, tuple)):
        return next((w for w in (out_of_range(v) for v in value) if w is not None), None)
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        return "a finite number within float32's range, |value| <= 3.4e38 (inf and nan are accepted by no key)"
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        return "an integer within 64 bits (|value| < 2**63)"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 (a path from the shell): every log line would fail
            return "text in UTF-8 (it holds bytes that are not: rename the path)"
    return None


def check_resolvable(cfg: DictConfig) -> None:
    """ConfigError naming the key whose ${...} interpolation cannot be resolved (a missing environment variable,
    a key that refers to itself, an unknown key or resolver)."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': its value cannot be resolved ({str(err).splitlines()[0]})") from None


def check_settings(cfg: DictConfig, prefix: str = "") -> None:
    """Check every key of ``cfg`` against its schema (dmd2/config/settings.py), recursively; raise ConfigError naming the
    first bad key: a key the schema does not define (e.g. added with +key=... or ++key=...), a number out of the
    shared range (``out_of_range``), or a value its rule refuses. Types were already enforced by Hydra while
    composing. An untyped section (none today) would be free-form and is not checked."""
    if not prefix:
        check_resolvable(cfg)
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    fields = dataclasses.fields(schema)
    present = set(cfg.keys())  # type: ignore[arg-type]
    removed = [f.name for f in fields if f.name not in present]
    if removed:
        key = prefix + removed[0]
        raise ConfigError(f"config key '{key}' was removed (~{key}): every key of the schema takes a value; set it "
                          f"instead ({key}=...; python <script> --help lists the keys)")
    unknown = sorted(set(cfg.keys()) - {f.name for f in fields})  # type: ignore[operator]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}': the scripts read only the keys of their "
                          f"schema, so it would be ignored (the script's --help lists every key; Hydra's own "
                          f"settings are hydra.*)")
    for f in fields:
        key = prefix + f.name
        if OmegaConf.is_missing(cfg, f.name):
            if f.metadata.get("check") is not None:
                raise ConfigError(f"config key '{key}' is required but not set: pass {key}=... "
                                  f"({f.metadata['help']}; {f.metadata['check'].expected})")
            continue
        node = cfg._get_node(f.name)
        if isinstance(node, DictConfig):
            check_settings(node, key + ".")  # type: ignore[arg-type]
            continue
        rule = f.metadata.get("check")
        value = cfg[f.name]
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        problem = out_of_range(value)
        if problem is not None:
            fail(key, value, problem + (f"; this key takes {rule.expected}" if rule is not None else ""))
        if rule is not None and not rule(value):
            fail(key, value, rule.expected)
    section_rule = getattr(schema, "check_section", None)  # a combination of the section's keys (settings.py)
    if section_rule is not None:
        problem = section_rule(OmegaConf.to_container(cfg, resolve=True))
        if problem is not None:
            fail(prefix + problem[0], cfg[problem[0]], problem[1])


def check_fid(cfg: DictConfig, prefix: str = "") -> None:
    """The feature-network and reference keys under ``prefix`` together: files and combinations."""
    fn, ref = OmegaConf.select(cfg, prefix + "feature_network"), OmegaConf.select(cfg, prefix + "reference")
    if fn.name == "inception" and fn.resize == "none":
        fail(prefix + "feature_network.resize", fn.resize, "'clean' or 'legacy_tensorflow' for Inception (it takes "
             "299x299 inputs)")
    if fn.name in ("torchscript", "module") and fn.resize == "legacy_tensorflow":
        fail(prefix + "feature_network.resize", fn.resize, f"'clean' or 'none' for a {fn.name} network "
             "(legacy_tensorflow is Inception's own internal resize)")
    if fn.name == "module" and not (isinstance(fn.module, str) and ":" in fn.module):
        fail(prefix + "feature_network.module", fn.module, f"package.module:callable with {prefix}feature_network."
             "name=module (the code that builds the network its weights file fits)")
    if fn.name != "module" and fn.module is not None:
        fail(prefix + "feature_network.module", fn.module, f"null unless {prefix}feature_network.name=module")
    if fn.name == "module" and (fn.path is None or not os.path.isfile(fn.path)):
        fail_file(prefix + "feature_network.path", fn.path,
                  f"an existing weights file (a state dict) with {prefix}feature_network.name=module")
    if fn.name == "inception" and fn.path is not None:
        fail(prefix + "feature_network.path", fn.path, f"null with {prefix}feature_network.name=inception "
             f"(set {prefix}feature_network.name=torchscript to use this file)")
    if fn.name == "torchscript" and (fn.path is None or not os.path.isfile(fn.path)):
        fail_file(prefix + "feature_network.path", fn.path,
                  f"an existing TorchScript file with {prefix}feature_network.name=torchscript"
                  + (" (eval=featnet reads it from paths.featnet: set that in conf/local/default.yaml, see "
                     "conf/local/example.yaml)" if fn.path is None and prefix == "eval." else ""))
    if ref.name == "folder" and (ref.folder is None or not os.path.isdir(ref.folder)):
        fail_file(prefix + "reference.folder", ref.folder,
                  f"an existing image folder with {prefix}reference.name=folder")
    if ref.name != "folder" and ref.folder is not None:
        fail(prefix + "reference.folder", ref.folder, f"null with {prefix}reference.name={ref.name}; add "
             f"{prefix}reference.name=folder to use this folder")
    if ref.name != "npz" and ref.resolution is not None:
        fail(prefix + "reference.resolution", ref.resolution, f"null unless {prefix}reference.name=npz (the other "
             "references know their resolution)")
    if ref.name == "npz" and (ref.path is None or not os.path.isfile(ref.path)):
        fail_file(prefix + "reference.path", ref.path, f"an existing .npz file (mu, sigma) with "
                  f"{prefix}reference.name=npz")
    if ref.name != "npz" and ref.path is not None:
        fail(prefix + "reference.path", ref.path, f"null unless {prefix}reference.name=npz")
    if ref.name == "cifar10_train" and fn.name == "inception" and fn.resize != "clean":
        fail(prefix + "reference.name", ref.name, "'npz' or 'folder' with resize=legacy_tensorflow (clean-fid's "
             f"precomputed statistics use its clean resize); add {prefix}reference.name=npz {prefix}reference.path=...")
    if ref.name == "cifar10_train" and fn.name != "inception":
        fail(prefix + "reference.name", ref.name, "'folder' with a TorchScript feature network (clean-fid's "
             f"precomputed statistics are Inception features); add {prefix}reference.folder=<image folder>")


def check_file(cfg: DictConfig, key: str, what: str) -> None:
    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"config key '{key}' is required: pass {key}=path/to/{what}")
    path = cfg[key]
    if not isinstance(path, str) or not os.path.isfile(path):
        raise FileError(f"config key '{key}' = {path!r}: file not found (expected {what})")


SYNTHETIC_ROOT = "generated"  # the placeholder root of generated data (conf/data/synthetic.yaml, gaussian_mixture.yaml)


def check_data(cfg: DictConfig) -> None:
    root = cfg.data.root
    if cfg.data.name in GENERATED_DATA and root != SYNTHETIC_ROOT:
        raise ConfigError(f"config key 'data.root' = {root!r}, but data={cfg.data.name} is generated and reads no "
                          "files, so it would ignore it: name the data it holds, e.g. data=image_folder or "
                          "data=edm_dataset")
    if cfg.data.name == "gaussian_mixture" and cfg.data.hflip:
        raise ConfigError("config key 'data.hflip' = true, but data=gaussian_mixture has no augmentations: a flipped "
                          "mean image is another mode, so flips would change the distribution being learned "
                          "(and its exact scores); set data.hflip=false")
    if cfg.get("exact_teacher") and cfg.data.name != "gaussian_mixture":
        raise ConfigError(f"config key 'exact_teacher' = true needs data=gaussian_mixture (the only data whose exact "
                          f"denoiser is known), got data={cfg.data.name}")
    if cfg.data.name == "edm_dataset" and not os.path.exists(root):
        raise FileError(f"config key 'data.root' = {root!r}: not found (expected EDM's dataset: a .zip or a folder "
                        f"with dataset.json, as dataset_tool.py writes it)")
    if cfg.data.name == "image_folder" and not os.path.isdir(root):
        raise FileError(
            f"config key 'data.root' = {root!r}: folder not found (expected a class-folder tree root/<class>/<image>)"
        )


def check_emas(cfg: DictConfig) -> None:
    """The extra generator EMAs differ from the default one, and eval_weights names an EMA the run keeps."""
    decays = [float(d) for d in cfg.generator_ema_decays]
    if cfg.generator_ema_decay is not None and float(cfg.generator_ema_decay) in decays:
        fail("generator_ema_decays", list(decays), f"decays other than generator_ema_decay = "
             f"{cfg.generator_ema_decay} (that EMA is kept as 'ema' already)")
    names = [ema_name(d) for d in decays]
    if cfg.eval_weights not in (DEFAULT_EMA, RAW_WEIGHTS) and cfg.eval_weights not in names:
        kept = ", ".join(names) or "none"
        fail("eval_weights", cfg.eval_weights, f"ema, raw or an EMA of generator_ema_decays ({kept})")


def validate(cfg: DictConfig) -> None:
    """Check a composed training config; raise ConfigError naming the first bad key."""
    check_settings(cfg)
    if cfg.eval_every > 0 and cfg.data.name != "gaussian_mixture":  # the mixture is scored exactly, no features
        check_fid(cfg, "eval.")
        if cfg.eval.reference.name == "cifar10_train" and cfg.data.resolution != 32:
            raise ConfigError(
                f"config keys 'eval.reference.name' = 'cifar10_train' and 'data.resolution' = {cfg.data.resolution}: "
                f"the reference is CIFAR-10 train at 32x32, the run's images are "
                f"{cfg.data.resolution}x{cfg.data.resolution}; measure against the training data "
                f"(eval.reference.name=auto) or a reference of that resolution")
    check_data(cfg)
    if cfg.lr_decay == "none" and cfg.lr_final != 0:
        fail("lr_final", cfg.lr_final, "0 with lr_decay=none (a constant rate has no final value; "
             "lr_decay=cosine or linear decays to it)")
    if cfg.resume not in (None, "auto") and not os.path.isfile(cfg.resume):
        raise FileError(f"config key 'resume' = {cfg.resume!r}: file not found (expected null, auto or a checkpoint)")
    if cfg.resume == "auto" and not cfg.output_dir:
        raise ConfigError("config key 'resume' = 'auto' needs output_dir=<the folder of the run to continue>")
    if cfg.stage == "distill":
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
        if cfg.r1_weight > 0 and not (cfg.gan_classifier and cfg.gan_features == "teacher"):
            fail("r1_weight", cfg.r1_weight, "0 unless gan_classifier=true gan_features=teacher (the R1 penalty is "
                 "the teacher-feature discriminator's)")
        if cfg.diffusion_gan_max_timestep > cfg.num_train_timesteps:
            fail("diffusion_gan_max_timestep", cfg.diffusion_gan_max_timestep,
                 f"an integer <= num_train_timesteps ({cfg.num_train_timesteps})")
        check_emas(cfg)
        check_file(cfg, "teacher_checkpoint", "teacher_final.pt")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python data (stored with every run and checkpoint)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
