"""Every setting of train.py, evaluate.py and generate.py, defined once: its type, allowed values, default and
one-line meaning.

The dataclasses below are Hydra structured configs, registered as ``schema/...`` nodes. The YAML files under
``conf/`` start from them and hold only values (a stage's own values, an architecture's widths, presets), so:

- Hydra refuses an unknown key or a value of the wrong type while composing (``batch_size=abc``);
- ``dmd2.config.validate`` checks every ``check`` rule below (ranges, choices) and the rule all keys share
  (no keys added with +key, finite floats, 64-bit integers), naming the key;
- ``--help`` lists every key with its meaning (``help_template``);
- library code reads settings from these objects instead of keeping its own defaults.

A setting is declared as ``name: type = setting(default, "meaning", rule)``.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from dmd2.config.errors import ConfigError
from dmd2.config.seeds import MAX_SEEDS, count_seeds, seed_ranges


@dataclass(frozen=True)
class Rule:
    """A check of one value and the words that describe what it accepts (used in error messages)."""
    test: Callable[[Any], bool]
    expected: str

    def __call__(self, value: Any) -> bool:
        return bool(self.test(value))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def int_at_least(low: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}")


def int_in(low: int, high: int) -> Rule:
    return Rule(lambda v: _is_int(v) and low <= v <= high, f"an integer in [{low}, {high}]")


def number(low: float | None = None, high: float | None = None, *, above: float | None = None,
           below: float | None = None) -> Rule:
    """A number in [low, high] (``above`` / ``below``: strict bounds)."""
    def test(v: Any) -> bool:
        return (_is_num(v) and (low is None or v >= low) and (high is None or v <= high)
                and (above is None or v > above) and (below is None or v < below))
    lo = f"[{low}" if low is not None else (f"({above}" if above is not None else "(-inf")
    hi = f"{high}]" if high is not None else (f"{below})" if below is not None else "inf)")
    words = {("(0", "inf)"): "a number > 0", ("[0", "inf)"): "a number >= 0", ("(-inf", "inf)"): "a number"}
    return Rule(test, words.get((lo, hi), f"a number in {lo}, {hi}"))


def one_of(*options: Any) -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


def optional(rule: Rule, none_means: str = "") -> Rule:
    null = f"null ({none_means})" if none_means else "null"
    return Rule(lambda v: v is None or rule(v), f"{null} or {rule.expected}")


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
TEXT = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
POSITIVE_INT = int_at_least(1)
NONNEG_INT = int_at_least(0)
POSITIVE = number(above=0)
NONNEG = number(low=0)
FRACTION = number(0, 1)
DECAY = number(0, below=1)
# Seeds become torch generator seeds as seed * 1_000_003 + index (dmd2.method.randomness.derived_seed), which must fit in
# 64 bits: 2**40 leaves room for any index.
SEED_LIMIT = 2 ** 40
SEED = Rule(lambda v: _is_int(v) and 0 <= v < SEED_LIMIT, "an integer seed in [0, 2**40)")
INT_LIST = Rule(lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) and x >= 1 for x in v),
                "a list of integers >= 1")
# Bounds of values that cannot work beyond them (a network, a data set or a sample count no machine holds); the
# same limits bound architectures read from files (dmd2.io.weights).
MAX_RESOLUTION = 1024  # image side in pixels
MAX_WIDTH = 1 << 16  # channels of a layer
MAX_SAMPLES = 10_000_000  # images generated for one evaluation (published FIDs use 50,000)
RESOLUTION = int_in(1, MAX_RESOLUTION)
WIDTHS = Rule(lambda v: isinstance(v, (list, tuple)) and len(v) >= 1 and all(_is_int(x) and 1 <= x <= MAX_WIDTH
                                                                             for x in v),
              f"a non-empty list of integers in [1, {MAX_WIDTH}]")
LEARNING_RATE = number(above=0, high=1)  # AdamW's update is about lr per step: beyond 1 it only diverges
ADAM_BETAS = Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                  and all(_is_num(b) and 0 <= b < 1 for b in v),
                  "two numbers in [0, 1) (a beta of 1 divides by zero in AdamW's bias correction)")
OPEN_DECAY = number(above=0, below=1)
DISTINCT_DECAYS = Rule(lambda v: isinstance(v, (list, tuple)) and all(OPEN_DECAY(d) for d in v)
                       and len({float(d) for d in v}) == len(v),
                       "a list of distinct EMA decays, each in (0, 1), e.g. [0.99995, 0.9996]")
MAX_SIGMA = 1e5  # a noise level: EDM's largest is 80 (VE models a few hundred); x = sigma * z must stay finite
DESCENDING_SIGMAS = Rule(
    lambda v: isinstance(v, (list, tuple)) and len(v) >= 1 and all(_is_num(s) and 0 < s <= MAX_SIGMA for s in v)
    and all(a > b for a, b in zip(v, v[1:])),
    f"a non-empty list of sigmas in (0, {MAX_SIGMA:g}] in strictly descending order, e.g. [80.0, 2.5, 0.6, 0.1]")


DEFAULT_EMA = "ema"  # the generator EMA of generator_ema_decay (saved as generator_ema)
RAW_WEIGHTS = "raw"  # the generator's own weights


def ema_name(decay: float) -> str:
    """The name of the extra generator EMA of ``decay`` (generator_ema_decays): 'ema_' and the decay's shortest
    exact decimal, e.g. 0.99995 -> 'ema_0.99995'. Checkpoints key it by this name; every weights choice uses it."""
    return f"{DEFAULT_EMA}_{float(decay)!r}"


def is_ema_name(value: Any) -> bool:
    """Whether ``value`` has the form of an extra EMA's name (ema_<decay>, the decay in [0, 1))."""
    if not isinstance(value, str) or not value.startswith(f"{DEFAULT_EMA}_"):
        return False
    try:
        decay = float(value[len(DEFAULT_EMA) + 1:])
    except ValueError:
        return False
    return OPEN_DECAY(decay) and ema_name(decay) == value


def ema_decays(default: float | None, extra: Any) -> dict[str, float]:
    """Every generator EMA of a distillation, name -> decay: 'ema' for ``default`` (generator_ema_decay, when set),
    then ``ema_name(d)`` for each decay d of ``extra`` (generator_ema_decays), in their order."""
    named = {DEFAULT_EMA: float(default)} if default is not None else {}
    return {**named, **{ema_name(d): float(d) for d in extra}}


GENERATOR_WEIGHTS = Rule(lambda v: v in (DEFAULT_EMA, RAW_WEIGHTS) or is_ema_name(v),
                         "ema, raw or the name of an extra EMA (ema_<decay>, e.g. ema_0.99995)")


@dataclass(frozen=True)
class Policy:
    """How the code that compares, names and resumes runs treats a key (read by ``dmd2.config.policy``). A flag
    left None is the enclosing section's (a section's flags hold for every key inside it); at the top level the
    default, ``DEFAULT_POLICY``, holds."""
    resume_safe: bool | None = None  # may differ when a run is resumed: takes effect from the resumed step
    names_run: bool | None = None  # a command-line override of it goes into the run's name (W&B)
    splits_compare: bool | None = None  # runs that differ in it are different groups in python -m dmd2.compare


DEFAULT_POLICY = Policy(resume_safe=False, names_run=True, splits_compare=True)  # a key that shapes the run
# where a run reads, writes, runs and logs, and what it is called: never what it computes
PLACEMENT = Policy(resume_safe=True, names_run=False, splits_compare=False)
# how long, how often, how fast or at which learning rate a run goes on: a resumed run may change it
ADJUSTABLE = Policy(resume_safe=True)
# runs that differ only in it repeat one setting (a seed; a path, whose file may be the same: the teacher's
# content is compared by teacher_sha256)
REPEATS = Policy(splits_compare=False)


def setting(default: Any, help: str, check: Rule | None = None, policy: Policy = Policy()) -> Any:
    """A dataclass field carrying its meaning, its rule and its policy (``MISSING`` = required, ``???`` in
    YAML)."""
    metadata = {"help": help, "check": check, "policy": policy}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def group(node: type, help: str, policy: Policy = Policy()) -> Any:
    """A nested section whose keys are defined by ``node``; ``policy`` holds for all of them (unless a key sets
    its own)."""
    return field(default_factory=node, metadata={"help": help, "check": None, "policy": policy})


def chosen(help: str, policy: Policy = Policy()) -> Any:
    """A section filled by a config group (arch, data, logger, ...): its schema is the chosen option's (the
    ``SCHEMAS`` of the group named like the field); ``policy`` holds for all its keys."""
    return field(default=MISSING, metadata={"help": help, "check": None, "policy": policy, "chosen": True})


# ---------------------------------------------------------------------------------------------- architectures


@dataclass
class SimpleUNetArch:
    """The spec's SimpleUNet for 32x32 RGB images (about 21M parameters at these widths)."""
    name: str = setting("simple_unet", "architecture", one_of("simple_unet"))
    channels: List[int] = setting([64, 128, 256, 512], "stem width, then one entry per 2x-downsampling stage",
                                  WIDTHS)
    num_res_blocks: int = setting(1, "ResBlocks per stage", POSITIVE_INT)
    attn_resolutions: List[int] = setting([], "extra self-attention at these resolutions (the middle always has one)",
                                          INT_LIST)
    noise_emb_dim: int = setting(128, "sinusoidal noise-embedding width", POSITIVE_INT)
    emb_dim: int = setting(512, "conditioning (noise + class) embedding width", POSITIVE_INT)
    dropout: float = setting(0.1, "dropout in the residual blocks", FRACTION)
    groups: int = setting(8, "GroupNorm groups (must divide every entry of channels)", POSITIVE_INT)

    @staticmethod
    def check_section(arch: dict[str, Any]) -> tuple[str, str] | None:
        """(key, expected) of a combination of this section's keys that cannot build, else None."""
        odd = [c for c in arch["channels"] if c % arch["groups"]]
        return ("groups", f"a divisor of every entry of channels {arch['channels']} (not of {odd[0]})") if odd \
            else None


@dataclass
class EDMUNetArch:
    """EDM's DDPM++ / NCSN++ UNet ("SongUNet"); defaults: the class-conditional CIFAR-10 DDPM++ of EDM."""
    name: str = setting("edm_unet", "architecture", one_of("edm_unet"))
    in_channels: int = setting(3, "image channels (in = out)", POSITIVE_INT)
    model_channels: int = setting(128, "base width", POSITIVE_INT)
    channel_mult: List[int] = setting([2, 2, 2], "width multiplier per level; level l runs at resolution R / 2^l",
                                      INT_LIST)
    channel_mult_emb: int = setting(4, "conditioning-embedding width = channel_mult_emb * model_channels",
                                    POSITIVE_INT)
    channel_mult_noise: int = setting(1, "noise-embedding width = channel_mult_noise * model_channels (NCSN++: 2)",
                                      POSITIVE_INT)
    num_blocks: int = setting(4, "residual blocks per level (encoder; the decoder has num_blocks + 1)",
                              POSITIVE_INT)
    attn_resolutions: List[int] = setting([16], "self-attention at these resolutions", INT_LIST)
    num_heads: int = setting(1, "attention heads", POSITIVE_INT)
    dropout: float = setting(0.13, "dropout in the residual blocks (EDM's CIFAR-10 value)", FRACTION)
    label_dropout: float = setting(0.0, "class-label dropout in training (classifier-free guidance); EDM: 0",
                                   FRACTION)
    augment_dim: int = setting(0, "augmentation-label input (EDM: 9 with its augment pipe); 0 = none", NONNEG_INT)
    embedding_type: str = setting("positional", "noise embedding: positional (DDPM++) | fourier (NCSN++)",
                                  one_of("positional", "fourier"))
    max_positions: int = setting(10000, "positional embedding: frequencies 1 .. 1/max_positions", POSITIVE_INT)
    encoder_type: str = setting("standard", "standard (DDPM++) | skip | residual (NCSN++)",
                                one_of("standard", "skip", "residual"))
    decoder_type: str = setting("standard", "standard | skip", one_of("standard", "skip"))
    resample_filter: List[int] = setting([1, 1], "2x resampling filter taps: [1, 1] box (DDPM++), [1, 3, 3, 1] "
                                         "(NCSN++)", INT_LIST)
    skip_scale: float = setting(0.7071067811865476, "residual sums are scaled by this (1/sqrt(2))", POSITIVE)
    norm_eps: float = setting(1e-6, "GroupNorm epsilon", POSITIVE)
    norm_max_groups: int = setting(32, "GroupNorm groups: min(norm_max_groups, channels / 4)", POSITIVE_INT)


@dataclass
class ADMArch:
    """ADM (Dhariwal & Nichol 2021) as EDM re-implemented it ("DhariwalUNet"); defaults: EDM's class-conditional
    ImageNet 64x64 network (edm-imagenet-64x64-cond-adm, 296M parameters), the official DMD2 teacher."""
    name: str = setting("adm", "architecture", one_of("adm"))
    in_channels: int = setting(3, "image channels (in = out)", POSITIVE_INT)
    model_channels: int = setting(192, "base width", POSITIVE_INT)
    channel_mult: List[int] = setting([1, 2, 3, 4], "width multiplier per level; level l runs at resolution R / 2^l",
                                      INT_LIST)
    channel_mult_emb: int = setting(4, "conditioning-embedding width = channel_mult_emb * model_channels",
                                    POSITIVE_INT)
    num_blocks: int = setting(3, "residual blocks per level (encoder; the decoder has num_blocks + 1)",
                              POSITIVE_INT)
    attn_resolutions: List[int] = setting([32, 16, 8], "self-attention at these resolutions", INT_LIST)
    dropout: float = setting(0.10, "dropout in the residual blocks", FRACTION)
    label_dropout: float = setting(0.0, "class-label dropout in training (classifier-free guidance)", FRACTION)
    augment_dim: int = setting(0, "augmentation-label input; 0 = none", NONNEG_INT)
    channels_per_head: int = setting(64, "attention heads = block width / channels_per_head", POSITIVE_INT)


@dataclass
class FromTeacherArch:
    """Distillation: rebuild the networks with the architecture stored in the teacher checkpoint."""
    name: str = setting("from_teacher", "the teacher checkpoint's architecture", one_of("from_teacher"))


ARCH_SETTINGS: dict[str, type] = {"simple_unet": SimpleUNetArch, "edm_unet": EDMUNetArch, "adm": ADMArch}


def arch_settings(name: str, **values: Any) -> dict[str, Any]:
    """The full arch dict of architecture ``name``: its defaults, updated with ``values``."""
    if name not in ARCH_SETTINGS:
        raise ValueError(f"arch.name: unknown architecture {name!r}; expected one of {sorted(ARCH_SETTINGS)}")
    return {**dataclasses.asdict(ARCH_SETTINGS[name]()), **values, "name": name}


# ---------------------------------------------------------------------------------------------- data, logger


DATA_KINDS = ("cifar10", "image_folder", "edm_dataset", "synthetic", "gaussian_mixture")
GENERATED_DATA = ("synthetic", "gaussian_mixture")  # made on the fly: data.root is a placeholder


@dataclass
class DataSettings:
    name: str = setting("cifar10", "cifar10 (torchvision) | image_folder (any class-folder tree) | edm_dataset (EDM's "
                        "dataset_tool.py output: a .zip or folder with dataset.json) | synthetic (generated coloured "
                        "squares: smoke runs with no data) | gaussian_mixture (a known-answer mixture of Gaussians, "
                        "scored exactly: dmd2/method/mixture.py)",
                        one_of(*DATA_KINDS))
    root: str = setting("${data_dir}", "dataset folder (image_folder: root/<class>/<image>) or edm_dataset's .zip",
                        TEXT, policy=REPEATS)
    max_unreadable: float = setting(0.001, "image_folder / edm_dataset: the fraction of images that may be "
                                    "unreadable (truncated, corrupted): each is skipped with a warning naming it and "
                                    "the next image read in its place; one more stops the run (0 = none)", FRACTION,
                                    policy=ADJUSTABLE)
    num_classes: int = setting(10, "number of classes (labels 0 .. num_classes - 1); 0 = unconditional (labels "
                                "ignored, e.g. EDM's -uncond- models)", NONNEG_INT)
    resolution: int = setting(32, "image side in pixels (image_folder: resized and center-cropped)", RESOLUTION)
    hflip: bool = setting(True, "random horizontal flips (teacher training augmentation)", BOOL)
    num_workers: int = setting(2, "DataLoader worker processes", NONNEG_INT, policy=PLACEMENT)
    synthetic_per_class: int = setting(64, "data=synthetic / gaussian_mixture: images per class", POSITIVE_INT)
    mixture_components: int = setting(3, "data=gaussian_mixture: Gaussian components (modes) per class, equally "
                                      "weighted", POSITIVE_INT)
    mixture_std: float = setting(0.05, "data=gaussian_mixture: per-pixel standard deviation of each component "
                                 "(pixels in [-1, 1])", number(above=0, high=0.2))
    mixture_seed: int = setting(0, "data=gaussian_mixture: seed of the mean images and of the data set's draws",
                                SEED)


@dataclass
class WandbLogger:
    """Weights & Biases; offline by default (no account needed; `wandb sync` uploads later)."""
    name: str = setting("wandb", "logger", one_of("wandb"))
    project: Optional[str] = setting(None, "W&B project; null = dmd2-<data set> (dmd2-cifar10, dmd2-imagenet64, "
                                     "...: train.py from data.*, evaluate.py from the checkpoint's training data)",
                                     optional(TEXT))
    entity: Optional[str] = setting(None, "W&B entity (user or team); null = your default", optional(TEXT))
    mode: str = setting("offline", "offline | online | disabled", one_of("offline", "online", "disabled"))
    group: Optional[str] = setting(None, "W&B group; null = none for single runs, the sweep folder in sweeps; "
                                   "evaluate.py: the training run's group (or its run id)", optional(TEXT))
    tags: List[str] = setting([], "W&B tags")
    log_checkpoints: bool = setting(False, "log final checkpoints (and a distillation's generator export) as W&B "
                                    "artifacts, and link the teacher / checkpoint a run consumed (offline: copies "
                                    "the files into W&B's staging area until `wandb sync`)", BOOL)


@dataclass
class NoLogger:
    """No W&B: scalars still go to <output_dir>/metrics.jsonl, sample grids to <output_dir>/samples/."""
    name: str = setting("none", "logger", one_of("none"))


# ---------------------------------------------------------------------------------------------- FID / FD


FEATURE_NETWORKS = ("inception", "torchscript", "module")
RESIZE_MODES = ("clean", "legacy_tensorflow", "none")
REFERENCES = ("auto", "cifar10_train", "folder", "npz")


@dataclass
class FeatureNetwork:
    name: str = setting("inception", "inception (clean-fid's; reported as FID) | torchscript (a file; reported as "
                        "FD (<name>)) | module (plain weights plus the Python code that builds the network; "
                        "reported as FD (<name>))", one_of(*FEATURE_NETWORKS))
    path: Optional[str] = setting(None, "torchscript: the .pt file, float images [B,3,H,W] in [0,255] -> "
                                  "features [B,D] | module: the weights file (a state dict, .pt or .safetensors)",
                                  optional(TEXT))
    module: Optional[str] = setting(None, "name=module: what builds the network, package.module:callable (called "
                                    "without arguments; it must return an nn.Module mapping float images "
                                    "[B,3,H,W] in [0,255] to features [B,D]); path's weights are loaded into it",
                                    optional(TEXT))
    classifier: Optional[str] = setting(None, "a submodule of the network mapping its features [B,D] to class "
                                        "logits [B,C], by dotted name (net.head for cifar10-featnet-dev): adds the "
                                        "generated class histogram, its entropy and the label agreement per class",
                                        optional(TEXT))
    resize: str = setting("clean", "clean: clean-fid's 299x299 resize (its published-comparable protocol) | "
                          "legacy_tensorflow: Inception resizes inside, as TensorFlow did (EDM's and DMD2's FIDs) | "
                          "none: native resolution (TorchScript networks)", one_of(*RESIZE_MODES))
    inception_weights: Optional[str] = setting(None, "path of inception-2015-12-05.pt; null = "
                                               "/tmp/inception-2015-12-05.pt (clean-fid's place)", optional(TEXT))
    allow_download: bool = setting(False, "true: clean-fid may download missing weights (else a missing file "
                                   "fails at once)", BOOL)


@dataclass
class Reference:
    name: str = setting("auto", "auto: the model's own training data (train.py: data.*; evaluate.py: the "
                        "checkpoint's), statistics computed once and cached; clean-fid's precomputed ones for 32x32 "
                        "CIFAR-10 under Inception's clean resize | cifar10_train: clean-fid's precomputed CIFAR-10 "
                        "train statistics (Inception, clean, 32x32) | folder: an image folder's | npz: a statistics "
                        "file (mu, sigma)", one_of(*REFERENCES))
    folder: Optional[str] = setting(None, "reference.name=folder: an image folder tree, e.g. "
                                    "data/cifar10-jpeg/train", optional(TEXT))
    path: Optional[str] = setting(None, "reference.name=npz: a file with mu [D] and sigma [D,D], e.g. EDM's "
                                  "cifar10-32x32.npz (TF-Inception features: use resize=legacy_tensorflow)",
                                  optional(TEXT))
    resolution: Optional[int] = setting(None, "reference.name=npz, a file without metadata (EDM's): the side of the "
                                        "images it was made from; null = read from the file name (cifar10-32x32.npz "
                                        "-> 32)", optional(POSITIVE_INT, "from the file's metadata or name"))
    cache_dir: str = setting("./fid_stats", "folder statistics are computed once and cached here", TEXT)
    allow_download: bool = setting("${..feature_network.allow_download}", "true: clean-fid may download its "
                                   "precomputed statistics", BOOL)


@dataclass
class FidSettings:
    """How FID / FD is measured: the feature network and the reference statistics (evaluate.py and eval_every)."""
    feature_network: FeatureNetwork = group(FeatureNetwork, "the network whose features are compared")
    reference: Reference = group(Reference, "the reference statistics")
    allow_few_samples: bool = setting(False, "true: compute FID / FD even with fewer samples than the feature "
                                      "dimension (2048 for Inception; a singular covariance, a number comparable "
                                      "with nothing); false: refused before sampling", BOOL)
    uncertainty_resamples: int = setting(20, "bootstrap resamples of the generated samples' features behind each "
                                         "value's standard deviation (eval/fid_std, eval/kid_std; the spread a "
                                         "rerun with other seeds shows); 0 = none", NONNEG_INT)
    prdc_k: int = setting(5, "precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. "
                          "2020) of the features already extracted, with this many nearest neighbours (5, Naeem et "
                          "al.'s; needs the reference's features: an image folder or the training data, or "
                          "clean-fid's CIFAR-10 with kid=true; data=gaussian_mixture: pixels against true samples); "
                          "0 = off", NONNEG_INT)
    prdc_samples: int = setting(10000, "precision / recall / density / coverage use at most this many samples of "
                                "each side (a seeded subsample; the cost grows with its square)", int_at_least(6))


@dataclass
class EvalSettings(FidSettings):
    """What eval_every measures: feature_network.* and reference.* as in evaluate.py, and these."""
    num_samples: int = setting(10000, "samples per evaluation, classes round-robin; the values are named with it "
                               "(fid@10k); published FIDs use 50000 (README \"Which FID\")", int_in(2, MAX_SAMPLES))
    batch_size: int = setting(250, "images generated and featurized at once", POSITIVE_INT)
    seed: int = setting(0, "sample i uses noise seeded by (seed, i): every evaluation sees the same noise",
                        SEED)
    sampler_steps: int = setting(18, "teacher: Heun steps (18 = 35 NFE); generators sample their own chain",
                                 POSITIVE_INT)


@dataclass
class LocalPaths:
    """Machine-specific paths, set once per machine in conf/local/default.yaml (git-ignored; copy
    conf/local/example.yaml) and used by config groups such as eval=featnet."""
    featnet: Optional[str] = setting(None, "the TorchScript CIFAR-10 feature network file (float images [B,3,H,W] "
                                     "in [0,255] -> features [B,D]) that eval=featnet measures FD with",
                                     optional(TEXT))


@dataclass
class Perf:
    """Fast paths; README "Performance" has the measurements behind each default."""
    tf32: bool = setting(True, "TF32 tensor cores for fp32 matmuls and convolutions (Ampere+ GPUs)", BOOL)
    cudnn_benchmark: bool = setting(True, "cuDNN autotunes its convolution algorithms (CUDA)", BOOL)
    channels_last: bool = setting(False, "networks in channels-last (NHWC) memory format", BOOL)
    compile: bool = setting(False, "torch.compile the networks (compiles during the first steps)", BOOL)
    fused_adamw: Any = setting("auto", "AdamW's fused kernel: auto (on CUDA) | true | false (foreach)",
                               Rule(lambda v: v == "auto" or isinstance(v, bool), "'auto', true or false"))
    cache_dataset: Any = setting("auto", "decode the dataset once into memory on the training device: auto (when "
                                 "its uint8 images fit in cache_max_gb) | true | false (DataLoader workers)",
                                 Rule(lambda v: v == "auto" or isinstance(v, bool), "'auto', true or false"))
    cache_max_gb: float = setting(2.0, "memory budget of the dataset cache (GB)", NONNEG)


# ---------------------------------------------------------------------------------------------- training

DEVICE = Rule(lambda v: v in ("auto", "cpu") or (isinstance(v, str) and v.split(":")[0] == "cuda"),
              "'auto', 'cpu', 'cuda' or 'cuda:N'")
METRIC = Rule(lambda v: isinstance(v, str) and v.startswith(("train/", "eval/")),
              "a metric key such as eval/fid or train/loss_fake")


@dataclass
class TrainSettings:
    """Keys of both stages. A stage's YAML (conf/stage/) sets the values it uses for them."""
    stage: str = setting(MISSING, "teacher | distill: the runner and its hyperparameters",
                         one_of("teacher", "distill"))
    arch: Any = chosen("network (teacher, fake score and generator share it): conf/arch")
    data: Any = chosen("dataset: conf/data")
    logger: Any = chosen("wandb (offline by default) | none: conf/logger", policy=PLACEMENT)

    seed: int = setting(0, "base seed; rank r uses seed + r", SEED, policy=REPEATS)
    data_dir: str = setting("./data", "where datasets live (torchvision downloads CIFAR-10 here when missing)", TEXT,
                            policy=PLACEMENT)
    output_dir: Optional[str] = setting(None, "checkpoints, samples, metrics; null = this run's Hydra directory",
                                        optional(TEXT), policy=PLACEMENT)
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda | cuda:N", DEVICE, policy=PLACEMENT)
    run_name: Optional[str] = setting(None, "W&B run name; null = built from the command-line overrides",
                                      optional(TEXT), policy=PLACEMENT)
    resume: Optional[str] = setting(None, "null | auto (newest valid checkpoint in output_dir) | a checkpoint path",
                                    optional(TEXT), policy=PLACEMENT)
    resume_allow_changes: bool = setting(False, "resume even when settings that shape the run (arch, data, batch "
                                         "size, ratio, seed) differ from the checkpoint's", BOOL, policy=ADJUSTABLE)
    keep_last: Optional[int] = setting(None, "keep only the newest N periodic checkpoints (*_final.pt is always "
                                       "kept)", optional(POSITIVE_INT, "keep all"), policy=ADJUSTABLE)
    on_nonfinite: str = setting("stop", "a NaN/inf loss or gradient: stop (the last checkpoint stays intact) | "
                                "skip the update (counted as skipped_steps)", one_of("stop", "skip"), policy=ADJUSTABLE)

    batch_size: int = setting(128, "samples per step (per process under torchrun)", POSITIVE_INT)
    global_batch_size: Optional[int] = setting(None, "images per optimizer step over every process; each step "
                                               "accumulates gradients over global_batch_size / (batch_size x "
                                               "processes) rounds (a positive integer); a run stores the value it "
                                               "trained with", optional(POSITIVE_INT, "batch_size x processes"),
                                               policy=ADJUSTABLE)
    num_epochs: int = setting(100, "passes over the dataset", POSITIVE_INT, policy=ADJUSTABLE)
    max_steps: Optional[int] = setting(None, "step limit; training stops at max_steps or num_epochs, whichever "
                                       "comes first", optional(POSITIVE_INT), policy=ADJUSTABLE)
    save_every: int = setting(5000, "periodic checkpoint every N steps (<stage>_NNNNNN.pt); *_final.pt at the end",
                              POSITIVE_INT, policy=ADJUSTABLE)
    weight_decay: float = setting(0.0, "AdamW weight decay", NONNEG, policy=ADJUSTABLE)
    adam_betas: List[float] = setting([0.9, 0.999], "AdamW betas",
                                      ADAM_BETAS, policy=ADJUSTABLE)
    warmup_steps: int = setting(1000, "linear learning-rate warm-up over N training iterations, then lr_decay's "
                                "schedule (constant by default)",
                                NONNEG_INT, policy=ADJUSTABLE)
    lr_decay: str = setting("none", "after the warm-up: none (constant) | cosine | linear, from the base rate to "
                            "lr_final x the base rate at the run's last iteration (max_steps or num_epochs; a resume "
                            "that changes them rescales the curve)",
                            one_of("none", "cosine", "linear"), policy=ADJUSTABLE)
    lr_final: float = setting(0.0, "with lr_decay: the learning rate at the last iteration, as a fraction of the "
                              "base rate (0 unless lr_decay is set)", FRACTION, policy=ADJUSTABLE)
    grad_clip: Optional[float] = setting(1.0, "max global gradient norm; null disables clipping", optional(POSITIVE),
                                         policy=ADJUSTABLE)
    precision: str = setting("fp32", "fp32 | bf16 (autocast on CUDA; ignored on CPU)", one_of("fp32", "bf16"))

    log_every: int = setting(50, "scalar logging interval (steps); also the status line's (step, kimg, s/step, "
                             "ETA, losses, memory), in <run>/train.log and, without a terminal, on stdout",
                             POSITIVE_INT, policy=ADJUSTABLE)
    progress: str = setting("auto", "how training shows its progress: auto = a bar on a terminal, status lines every "
                            "log_every steps otherwise (nohup, SLURM, a pipe) | bar | lines",
                            one_of("auto", "bar", "lines"), policy=PLACEMENT)
    sample_every: int = setting(5000, "sample grid interval (steps); 0 = only at the end", NONNEG_INT,
                                policy=ADJUSTABLE)
    samples_per_class: int = setting(8, "columns of the sample grid (one row per class; at most 16 classes, "
                                     "evenly spaced)", int_in(1, 64), policy=ADJUSTABLE)
    sample_steps: int = setting(18, "Heun steps of teacher sample grids (18 steps = 35 network evaluations)",
                                POSITIVE_INT, policy=ADJUSTABLE)

    eval_every: int = setting(0, "FID / FD of the EMA network every N steps and at the end (distill: also at step "
                              "0), logged as eval/fid or eval/fd_<network>; 0 = off", NONNEG_INT, policy=ADJUSTABLE)
    eval: EvalSettings = group(EvalSettings, "what eval_every measures", policy=ADJUSTABLE)
    optimized_metric: Optional[str] = setting(None, "what train.py returns to a sweeper: null = the best eval "
                                              "metric (needs eval_every > 0); or a final metric key the run "
                                              "produces (a loss only when named: train/loss)", optional(METRIC),
                                              policy=ADJUSTABLE)
    perf: Perf = group(Perf, "fast paths", policy=ADJUSTABLE)
    paths: LocalPaths = group(LocalPaths, "machine-specific paths (conf/local/default.yaml)", policy=PLACEMENT)


@dataclass
class TeacherSettings(TrainSettings):
    """Stage 1: train the EDM teacher."""
    stage: str = setting("teacher", "teacher | distill", one_of("teacher"))
    lr: float = setting(1e-4, "AdamW learning rate", LEARNING_RATE, policy=ADJUSTABLE)
    ema_decay: float = setting(0.9999, "EMA of the weights (what distillation loads); warmed up as "
                               "min(decay, (1+n)/(10+n))", DECAY, policy=ADJUSTABLE)
    sigma_data: float = setting(0.5, "EDM data standard deviation", POSITIVE)
    p_mean: float = setting(-1.2, "EDM training noise: ln(sigma) ~ N(p_mean, p_std^2)", number())
    p_std: float = setting(1.2, "EDM training noise spread", POSITIVE)


BAND = Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(b) and b >= 0 for b in v)
            and v[0] <= v[1], "two numbers low <= high, both >= 0, e.g. [0.001, 10]")


@dataclass
class HealthSettings:
    """Diagnostics of a distillation's health (README "Is my run healthy?"): the alerts' thresholds and the
    denoiser panels. An alert is a warning line, a W&B alert and a row in metrics.jsonl, once per event (when its
    condition starts to hold) with its step. The defaults stay quiet on a healthy known-answer run and fire on the
    broken ones the README shows."""
    alerts: bool = setting(True, "watch the logged metrics and raise the alerts below", BOOL)
    min_recall: float = setting(0.3, "alert when eval/recall (precision / recall of the evaluation, prdc_k) falls "
                                "below this: modes are being lost (true samples of the known-answer mixture score "
                                "about 0.75 at 1000 samples)", FRACTION)
    min_class_entropy: float = setting(0.5, "alert when eval/class_entropy (the generated class histogram's entropy "
                                       "over log C: 1 = every class equally often) falls below this", FRACTION)
    max_saturated: float = setting(0.1, "alert when train/saturated_fraction (generated pixels at +-1 after "
                                   "clamping) exceeds this", FRACTION)
    fd_rise_evals: int = setting(3, "alert when the FID / FD rises over this many evaluations in a row; 0 = off",
                                 NONNEG_INT)
    fd_rise_min: float = setting(0.05, "fd_rising also needs the rise over those evaluations to exceed this "
                                 "fraction of the value before the first rise: smaller rises are within the "
                                 "evaluation noise (a CIFAR-10 FD of 5,000 samples: bootstrap sd 0.4 %; a known-answer "
                                 "FD of 1000 samples near its floor swings 5-10 % between evaluations); 0 = any rise",
                                 NONNEG)
    grad_ratio_band: List[float] = setting([0.001, 10.0], "alert when train/gan_dm_grad_ratio (GAN gradient over "
                                           "DM gradient, the weight included; GAN runs only) leaves [low, high]",
                                           BAND)
    panels: bool = setting(True, "at every sample grid: the denoiser panel (noisy generated images, the "
                           "teacher's and the fake score network's x0, their difference and the DM gradient at "
                           "panel_sigmas) and, for a multi-step generator, its chain's panel", BOOL)
    panel_images: int = setting(4, "generated images in the panels (the first of as many grid rows)",
                                POSITIVE_INT)
    panel_sigmas: List[float] = setting([0.5, 2.0, 10.0, 40.0], "the panels' noise levels",
                                        Rule(lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 6
                                             and all(_is_num(x) and x > 0 for x in v),
                                             "1 to 6 positive sigmas"))


@dataclass
class DistillSettings(TrainSettings):
    """Stage 2: DMD2 distillation of a teacher checkpoint into a one-step (or few-step) generator."""
    stage: str = setting("distill", "teacher | distill", one_of("distill"))
    teacher_checkpoint: str = setting(MISSING, "a teacher checkpoint (teacher_final.pt); its EMA weights are used",
                                      TEXT, policy=REPEATS)
    generator_lr: float = setting(2e-6, "AdamW learning rate of the generator", LEARNING_RATE, policy=ADJUSTABLE)
    guidance_lr: float = setting(2e-6, "AdamW learning rate of the fake score network (and GAN head)", LEARNING_RATE,
                                 policy=ADJUSTABLE)
    dfake_gen_update_ratio: int = setting(10, "the fake score network updates every step, the generator every "
                                          "N-th step (two time-scale update rule)", POSITIVE_INT)
    dropout: Optional[float] = setting(0.0, "dropout of the generator and the fake score network (the teacher "
                                       "always runs without); 0 as in the official DMD2",
                                       optional(FRACTION, "keep the teacher's"))
    conditioning_sigma: float = setting(80.0, "generator input z * sigma at this noise level (sigma_max)", POSITIVE)
    denoising_sigmas: Optional[List[float]] = setting(None, "multi-step generator: descending sigmas starting at "
                                                      "conditioning_sigma; trained with backward simulation",
                                                      optional(DESCENDING_SIGMAS, "one step"))
    min_step_percent: float = setting(0.02, "DM loss timesteps t ~ U{min, max} of num_train_timesteps Karras "
                                      "steps: the lower end", FRACTION)
    max_step_percent: float = setting(0.98, "... the upper end", FRACTION)
    num_train_timesteps: int = setting(1000, "size of the Karras timestep table (index 0 = sigma_min)",
                                       int_at_least(2))
    gan_classifier: bool = setting(False, "DMD2's GAN head on the fake score network's bottleneck", BOOL)
    cls_loss_weight: float = setting(1e-2, "weight of the classifier's loss in the guidance update", NONNEG)
    gen_cls_loss_weight: float = setting(3e-3, "weight of the generator's non-saturating GAN loss. The DMD2 "
                                         "authors' calibration rule: weight it so that its gradient at the "
                                         "generated images is comparable to the DM gradient's. Read "
                                         "train/gan_dm_grad_ratio (this weight x train/gan_grad_norm / "
                                         "train/dm_grad_norm, per sample, same units): about 1 = comparable; far "
                                         "below 1 = the GAN term barely acts; far above = it swamps the DM "
                                         "gradient (health.grad_ratio_band alerts outside a band)", NONNEG)
    diffusion_gan: bool = setting(True, "noise real and fake images before the classifier sees them (false: "
                                  "clean images at sigma_min)", BOOL)
    diffusion_gan_max_timestep: int = setting(1000, "diffusion-GAN noise at sigmas[t], t ~ U{0 .. max-1}",
                                              POSITIVE_INT)
    # FastGen's DMD2 recipe (NVlabs/FastGen, configs/methods/config_dmd2.py): each choice beside the official one
    gan_features: str = setting("fake_bottleneck", "what the GAN classifier reads: fake_bottleneck (official DMD2: "
                                "a head on the fake score network's bottleneck, trained with it) | teacher (FastGen: "
                                "a separate discriminator of conv heads on the frozen teacher's encoder features at "
                                "gan_feature_resolutions, own learning rate; real images noised at an independent "
                                "DM-range timestep, fakes at the loss's own noisy input)",
                                one_of("fake_bottleneck", "teacher"))
    gan_feature_resolutions: List[int] = setting([32, 16, 8], "gan_features=teacher: the teacher's encoder "
                                                 "outputs read, by size in px (FastGen: 32, 16, 8)", INT_LIST)
    discriminator_lr: Optional[float] = setting(None, "gan_features=teacher: AdamW learning rate of the "
                                                "discriminator (FastGen 1e-4)", optional(LEARNING_RATE, "guidance_lr"),
                                                policy=ADJUSTABLE)
    update_schedule: str = setting("every", "every (official DMD2: the fake score network every iteration, the "
                                   "generator too on every ratio-th) | alternate (FastGen: the generator alone on "
                                   "every ratio-th iteration counted from 1, the fake score network and "
                                   "discriminator alone on the others)", one_of("every", "alternate"))
    fake_score_timesteps: str = setting("all", "the fake score loss's timesteps: all (official: the whole table) | "
                                        "dm (FastGen: the DM loss's range, min/max_step_percent)",
                                        one_of("all", "dm"))
    fake_score_weighting: str = setting("edm", "the fake score loss: edm (official: EDM's lambda(sigma) weight) | "
                                        "none (FastGen: the plain x0 mean squared error)", one_of("edm", "none"))
    dm_eps: float = setting(0.0, "added to the DM gradient's normaliser mean|x - teacher x0| (official 0, "
                            "FastGen 1e-6)", NONNEG)
    r1_weight: float = setting(0.0, "gan_features=teacher: weight of the approximate R1 penalty of the "
                               "discriminator (FastGen: 0 for CIFAR-10; 100-1000 when used)", NONNEG)
    r1_alpha: float = setting(0.1, "the R1 penalty's perturbation of the real images (noise scale)", POSITIVE)
    generator_ema_decay: Optional[float] = setting(None, "EMA of the generator weights (e.g. 0.999), saved next "
                                                   "to the raw weights", optional(DECAY, "off"), policy=ADJUSTABLE)
    generator_ema_decays: List[float] = setting([], "extra EMAs of the generator beside generator_ema_decay, "
                                                "updated alike; each named ema_<decay> (e.g. ema_0.99995), saved "
                                                "in generator_emas", DISTINCT_DECAYS, policy=ADJUSTABLE)
    generator_ema_warmup: bool = setting(False, "warm the generator EMAs up as the teacher's: decay min(d, (1+n)/"
                                         "(10+n)) after n generator updates (false: d from the first update, "
                                         "which keeps d^n of the initial weights); no effect without an EMA",
                                         BOOL, policy=ADJUSTABLE)
    fake_warmup_steps: int = setting(0, "iterations 0 .. N-1 update the fake score network (and GAN head) alone, "
                                     "on the initial generator's samples, before the generator's first update",
                                     NONNEG_INT, policy=ADJUSTABLE)
    eval_weights: str = setting("ema", "what eval_every measures: ema (the generator_ema_decay EMA; the raw weights "
                                "without it) | raw | ema_<decay> (one of generator_ema_decays)", GENERATOR_WEIGHTS,
                                policy=ADJUSTABLE)
    health: HealthSettings = group(HealthSettings, "diagnostics and alerts of the run's health", policy=ADJUSTABLE)
    dm_gradient_sign: float = setting(1.0, "a deliberately broken control (README \"Is my run healthy?\"): -1 "
                                      "flips the DM gradient's sign, so the generator moves toward the fake score "
                                      "network's x0 and away from the teacher's; 1 = DMD2", one_of(1.0, -1.0))
    exact_teacher: bool = setting(False, "data=gaussian_mixture only: the real score is the mixture's exact "
                                  "denoiser (closed form, zero teacher error); teacher_checkpoint then only "
                                  "initialises the generator and the fake score network", BOOL)


# ---------------------------------------------------------------------------------------------- evaluate, generate


@dataclass
class SamplerSettings:
    steps: int = setting(18, "Heun steps of teacher checkpoints (18 = 35 network evaluations, 1 = one Euler "
                         "step); generators sample their own chain", POSITIVE_INT)


@dataclass
class EvaluateSettings(FidSettings):
    """evaluate.py: FID of teacher and DMD2 checkpoints with clean-fid (or an FD with another feature network)."""
    logger: Any = chosen("wandb (offline by default) | none: conf/logger", policy=PLACEMENT)
    checkpoint: Optional[str] = setting(None, "one teacher_*.pt or dmd2_*.pt, an export folder or .safetensors "
                                        "file, or hf://owner/repo; set this or checkpoint_dir", optional(TEXT))
    checkpoint_dir: Optional[str] = setting(None, "every *.pt in this folder, in order of training step; set one "
                                            "of checkpoint, checkpoint_dir, images, write_reference",
                                            optional(TEXT))
    output_dir: Optional[str] = setting(None, "results.json, metrics.jsonl and wandb/; null = this run's Hydra "
                                        "directory", optional(TEXT), policy=PLACEMENT)
    num_samples: int = setting(50000, "generated images per checkpoint, classes round-robin",
                               int_in(2, MAX_SAMPLES))
    batch_size: int = setting(250, "images generated and featurized at once", POSITIVE_INT)
    seed: int = setting(0, "sample i uses noise seeded by (seed, i): every checkpoint sees the same noise",
                        SEED)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", DEVICE, policy=PLACEMENT)
    teacher_weights: str = setting("ema", "teacher checkpoints: ema | model", one_of("ema", "model"))
    generator_weights: str = setting("ema", "DMD2 checkpoints: ema (when trained with generator_ema_decay, else "
                                     "raw) | raw | ema_<decay> (an EMA of generator_ema_decays)", GENERATOR_WEIGHTS)
    sampler: SamplerSettings = group(SamplerSettings, "how teacher checkpoints sample")
    images: Optional[str] = setting(None, "measure these images instead of a checkpoint: a folder or .zip of image "
                                    "files (generate.py's PNGs, EDM's output) or an .npz with arr_0 uint8 [N,H,W,3] "
                                    "(generate.py format=npz, ADM's layout); needs a named reference",
                                    optional(TEXT))
    write_reference: Optional[str] = setting(None, "write the reference statistics (reference.*) to this .npz: mu, "
                                             "sigma (EDM's format) and their metadata, then stop", optional(TEXT))
    overwrite_reference: bool = setting(False, "let write_reference replace an existing file (refused otherwise)",
                                        BOOL)
    kid: bool = setting(False, "also compute KID (clean-fid's kernel distance)", BOOL)
    num_workers: int = setting(4, "data-loader workers reading the reference folder", NONNEG_INT)
    run_name: Optional[str] = setting(None, "W&B run name; null = built from the command-line overrides",
                                      optional(TEXT), policy=PLACEMENT)
    paths: LocalPaths = group(LocalPaths, "machine-specific paths (conf/local/default.yaml)", policy=PLACEMENT)


def _seeds_ok(value: Any) -> bool:
    try:
        # arithmetic: a huge range is refused without building its list
        return count_seeds(value) > 0 and max(last for _, last in seed_ranges(value)) < SEED_LIMIT
    except ConfigError:
        return False


SEEDS = Rule(lambda v: v is None or _seeds_ok(v),
             f"null, a seed (7), a range (0-63) or a list of seeds and ranges ([0-9,20]), each < 2**40, at most "
             f"{MAX_SEEDS} seeds in all (split more over several runs)")
CLASSES = Rule(lambda v: v is None or isinstance(v, (int, str)) or (isinstance(v, (list, tuple)) and len(v) > 0),
               "null, a class id or name, or a list of them")


@dataclass
class GenerateSettings:
    """images from a checkpoint or an export, one per seed."""
    checkpoint: str = setting(MISSING, "a teacher_*.pt (Heun sampler) or dmd2_*.pt checkpoint, an export folder or "
                              ".safetensors file (python -m dmd2.export), or hf://owner/repo", TEXT)
    output_dir: str = setting("./generated", "png: <output_dir>/<class>/<seed>.png (unconditional: "
                              "<output_dir>/<seed>.png); npz: <output_dir>/samples.npz; both: grid.png", TEXT,
                              policy=PLACEMENT)
    overwrite: bool = setting(False, "write into an output_dir that holds files generate.py did not write there, or "
                              "another model's (refused otherwise; files of the same names are replaced)", BOOL)
    seeds: Any = setting(None, "image seeds, as EDM's generate.py: 7, 0-63 or [0-9,20,30-32]; seed s draws its own "
                         "noise, so it gives the same image in any run; null = 8 per class (0 .. 8 x classes - 1)",
                         SEEDS)
    classes: Any = setting(None, "class ids or names, e.g. 3 or [cat,dog]; seed s gets classes[s mod len(classes)]; "
                           "null = every class", CLASSES)
    format: str = setting("png", "png (one file per image) | npz (samples.npz: arr_0 uint8 [N,H,W,3], arr_1 labels "
                          "[N], seeds [N], class_names; the layout of ADM's evaluator)", one_of("png", "npz"))
    batch_size: int = setting(256, "images generated at once", POSITIVE_INT)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", DEVICE, policy=PLACEMENT)
    teacher_weights: str = setting("ema", "teacher checkpoints: ema | model", one_of("ema", "model"))
    generator_weights: str = setting("ema", "DMD2 checkpoints: ema | raw | ema_<decay> (an EMA of "
                                     "generator_ema_decays)", GENERATOR_WEIGHTS)
    paths: LocalPaths = group(LocalPaths, "machine-specific paths (conf/local/default.yaml)", policy=PLACEMENT)
    sampler: SamplerSettings = group(SamplerSettings, "how teacher checkpoints sample")
    class_names: Optional[List[str]] = setting(None, "names for folders and grids; null = the model's (stored in "
                                               "checkpoints and exports; class_000 ... when unknown)")


# ---------------------------------------------------------------------------------------------- registration

SCHEMAS: dict[str, type] = {
    "schema/stage/teacher": TeacherSettings, "schema/stage/distill": DistillSettings,
    "schema/arch/simple_unet": SimpleUNetArch, "schema/arch/edm_unet": EDMUNetArch,
    "schema/arch/adm": ADMArch, "schema/arch/from_teacher": FromTeacherArch, "schema/data": DataSettings,
    "schema/logger/wandb": WandbLogger, "schema/logger/none": NoLogger,
    "schema/evaluate": EvaluateSettings, "schema/generate": GenerateSettings,
}

# The policy of the top-level keys that are no setting of any schema above (every flag given; a key inside one,
# such as hydra.run.dir or hydra/launcher, has its policy). The only such answers: dmd2.config.policy reads them.
OTHER_KEYS: dict[str, Policy] = {
    # stored beside the settings in a training run's config (its checkpoints; config.yaml holds teacher_sha256);
    # global_batch_size is a setting, stored resolved (batch_size x processes x rounds)
    "world_size": Policy(resume_safe=True, names_run=False, splits_compare=True),  # processes: another number
    # the teacher file's hash: a different teacher is refused on resume by its own check (older checkpoints lack
    # it); runs of different teachers are different groups, whatever the teacher_checkpoint path
    "teacher_sha256": Policy(resume_safe=True, names_run=False, splits_compare=True),
    # command-line overrides only (never stored): Hydra's own settings and the machine's conf/local file
    "hydra": PLACEMENT,
    "local": PLACEMENT,
    # choices of the config groups that are no key of a schema: presets, named by their choice
    "experiment": DEFAULT_POLICY,
    "debug": DEFAULT_POLICY,
    "debug_stage": DEFAULT_POLICY,
    "hparams_search": DEFAULT_POLICY,
    "protocol": DEFAULT_POLICY,
}


def describe(node: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, what it accepts, meaning) of every setting of ``node``, nested sections flattened."""
    rows = []
    for f in dataclasses.fields(node):
        if dataclasses.is_dataclass(f.type) or (f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
                                                and dataclasses.is_dataclass(f.default_factory)):
            rows += describe(f.default_factory, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif f.default is MISSING and f.metadata.get("check") is None:
            continue  # a section filled by a config group: described by that group's schema
        else:
            check = f.metadata.get("check")
            rows.append((prefix + f.name, check.expected if check else "", f.metadata.get("help", "")))
    return rows


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


def group_options(groups: list[str]) -> str:
    """'group: option, option' lines for the config groups a script uses, read from conf/."""
    lines = []
    for name in groups:
        folder = os.path.join(CONF_DIR, name)
        options = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
        lines.append(f"{name}: {', '.join(options)}")
    return "\n".join(lines)


def help_template(script: str, title: str, sections: list[tuple[str, type, str]], groups: list[str]) -> str:
    """Hydra's --help text: the config ``groups`` the script uses with their options, then ``sections``
    ((heading, schema, key prefix) of its keys); Hydra fills in the composed $CONFIG."""
    lines = [f"{script}: {title}", "", "Override any key on the command line (key=value)"
             + (", choose config groups (group=option)" if groups else "") + ", sweep with -m.", ""]
    if groups:
        lines += ["== Config groups ==", group_options(groups), ""]
    keys = []
    for heading, node, prefix in sections:
        keys.append(f"== {heading} ==")
        for key, expected, meaning in describe(node, prefix):
            keys.append(f"  {key}: {meaning}" + (f"  [{expected}]" if expected else ""))
        keys.append("")
    keys += ["== This run's config (with your overrides) =="]
    tail = ["", "Hydra's own flags: --hydra-help. Tab completion (bash): "
            f"eval \"$(python {script} -sc install=bash)\"."]
    literal = lambda part: "\n".join(part).replace("$", "$$")  # string.Template escapes; no OmegaConf ${...}
    return "\n".join([literal(lines + keys), "$CONFIG", literal(tail)])


TRAIN_HELP = [("Keys of both stages", TrainSettings, ""), ("stage=teacher", TeacherSettings, ""),
              ("stage=distill", DistillSettings, ""), ("arch=simple_unet*", SimpleUNetArch, "arch."),
              ("arch=edm_unet*", EDMUNetArch, "arch."), ("arch=adm", ADMArch, "arch."),
              ("data", DataSettings, "data."),
              ("logger=wandb", WandbLogger, "logger.")]


def _only_own(node: type, base: type) -> type:
    """A view of ``node`` listing only the fields ``base`` lacks (for the per-stage help sections)."""
    names = {f.name for f in dataclasses.fields(base)}
    own = [(f.name, f.type, f) for f in dataclasses.fields(node) if f.name not in names]
    return dataclasses.make_dataclass(node.__name__, own)


def register() -> None:
    """Put the schemas and the --help texts into Hydra's ConfigStore (idempotent; done on import)."""
    cs = ConfigStore.instance()
    for path, node in SCHEMAS.items():
        group_name, _, name = path.rpartition("/")
        cs.store(group=group_name, name=name, node=node)
    train_sections = [(h, _only_own(n, TrainSettings) if n in (TeacherSettings, DistillSettings) else n, p)
                      for h, n, p in TRAIN_HELP]
    helps = {
        "dmd2_train": help_template("train.py", "train an EDM teacher (stage=teacher) or distill it with DMD2 "
                                    "(stage=distill).", train_sections,
                                    ["stage", "arch", "data", "logger", "eval", "experiment", "debug", "hparams_search",
                                     "local"]),
        "dmd2_evaluate": help_template("evaluate.py", "FID / FD of teacher and DMD2 checkpoints.",
                                       [("Keys", EvaluateSettings, ""), ("logger=wandb", WandbLogger, "logger.")],
                                       ["logger", "protocol", "eval", "local"]),
        "dmd2_generate": help_template("generate.py", "images from a checkpoint or an export, one per seed.",
                                       [("Keys", GenerateSettings, "")], ["local"]),
    }
    for name, template in helps.items():
        cs.store(group="hydra/help", name=name, node={"app_name": name, "header": "", "footer": "",
                                                      "template": template})


register()
