"""Sampling from checkpoints: one interface for teachers (Heun) and DMD2 generators (one step).

Both ``generate.py`` and ``evaluate.py`` use it, so a checkpoint is always sampled the same way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torchvision.utils import make_grid

from dmd2.config.errors import ConfigError, FormatError
from dmd2.config.settings import DEFAULT_EMA, DESCENDING_SIGMAS, MAX_SIGMA, RAW_WEIGHTS
from dmd2.data.images import to_uint8
from dmd2.io.checkpoint import network_from_checkpoint
from dmd2.method.randomness import derived_seed, torch_generator
from dmd2.method.samplers import heun_nfe, heun_sample, heun_sampler_sigmas, multistep_sample
from dmd2.networks.precond import EDMPrecond


@dataclass
class CheckpointSampler:
    """A denoiser from a checkpoint and how to sample it. Call with noise [B,C,H,W], labels [B] -> [-1,1] images."""

    kind: str                  # "teacher" or "dmd2"
    net: EDMPrecond
    step: int                  # training step of the checkpoint
    num_classes: int
    resolution: int
    nfe: int                   # network evaluations per sample
    heun_steps: int = 0        # teacher only
    denoising_sigmas: tuple[float, ...] = (80.0,)  # generator only: its chain of noise levels
    weights: str = "ema"       # which weights of the checkpoint are sampled

    @property
    def noise_steps(self) -> int:
        """Independent noise draws each sample needs: 1 for the teacher, one per chain step for a generator."""
        return 1 if self.kind == "teacher" else len(self.denoising_sigmas)

    def describe(self) -> str:
        if self.kind == "teacher":
            return (f"teacher checkpoint (step {self.step}, {self.weights} weights), Heun sampler, "
                    f"{self.heun_steps} steps = {self.nfe} NFE")
        return (f"DMD2 generator checkpoint (step {self.step}, {self.weights} weights), {self.nfe}-step "
                f"sampler over sigmas {list(self.denoising_sigmas)} = {self.nfe} NFE")

    @torch.no_grad()
    def __call__(self, noise: Tensor, labels: Tensor) -> Tensor:
        """noise [S,B,C,H,W] with S = ``noise_steps`` (or [B,C,H,W] when S = 1), labels [B] -> [B,C,H,W]."""
        if noise.dim() == 4:
            noise = noise[None]
        if self.kind == "teacher":
            sigmas = heun_sampler_sigmas(self.heun_steps).to(noise.device)
            return heun_sample(self.net, noise[0], labels, sigmas)
        return multistep_sample(self.net, noise, labels, self.denoising_sigmas)


def sampler_from_checkpoint(state: dict[str, Any], device: torch.device | str = "cpu", heun_steps: int = 18,
                            teacher_weights: str = "ema", generator_weights: str = "ema") -> CheckpointSampler:
    """Teacher checkpoints sample their ``teacher_weights`` ("ema" or "model") with ``heun_steps`` Heun steps.
    DMD2 checkpoints sample the generator over its stored ``denoising_sigmas`` (one step by default), with
    its EMA weights when ``generator_weights == "ema"`` and the checkpoint has them, else the raw weights; or the
    weights of one of its named EMAs (``generator_weights_key``: an unknown name is refused)."""
    if state["kind"] == "teacher":
        if teacher_weights not in ("ema", "model"):
            raise ValueError(f"teacher_weights must be 'ema' or 'model', got {teacher_weights!r}")
        key, entry, weights = teacher_weights, None, teacher_weights
    else:
        key, entry, weights = generator_weights_key(state, generator_weights)
    net = network_from_checkpoint(state, key, entry).to(device).eval()
    return make_sampler(state["kind"], net, int(state["step"]), int(state["num_classes"]), int(state["resolution"]),
                        weights, heun_steps, generator_sigmas(state) if state["kind"] == "dmd2" else ())


def generator_weight_names(state: dict[str, Any]) -> list[str]:
    """The generator weights a dmd2 checkpoint holds, by name: 'ema' (when it has the default EMA), 'raw', and
    the names of its further EMAs."""
    return ([DEFAULT_EMA] if "generator_ema" in state else []) + [RAW_WEIGHTS] + sorted(state.get("generator_emas", {}))


def generator_weights_key(state: dict[str, Any], name: str) -> tuple[str, str | None, str]:
    """(the key of ``state`` holding the weights ``name``, the entry within it (a further EMA's name) or None, the
    name of the weights sampled) of a dmd2 checkpoint. 'ema' falls back to the raw weights when the run kept no default EMA;
    a name the checkpoint does not hold is refused with the names it holds."""
    if name == DEFAULT_EMA:
        return ("generator_ema", None, DEFAULT_EMA) if "generator_ema" in state else ("generator", None, RAW_WEIGHTS)
    if name == RAW_WEIGHTS:
        return "generator", None, RAW_WEIGHTS
    if isinstance(name, str) and name in state.get("generator_emas", {}):
        return "generator_emas", name, name
    raise ConfigError(f"config key 'generator_weights' = {name!r}: this checkpoint holds the generator weights "
                      f"{', '.join(generator_weight_names(state))}")


def make_sampler(kind: str, net: EDMPrecond, step: int, num_classes: int, resolution: int, weights: str,
                 heun_steps: int, sigmas: Sequence[float]) -> CheckpointSampler:
    """A teacher's Heun sampler with ``heun_steps`` steps, or a generator over its chain ``sigmas``."""
    if kind == "teacher":
        if heun_steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {heun_steps}")
        return CheckpointSampler("teacher", net, step, num_classes, resolution, heun_nfe(heun_steps), heun_steps,
                                 weights=weights)
    sigmas = tuple(float(s) for s in sigmas)
    if not is_sigma_chain(sigmas):
        raise FormatError(f"the generator's stored noise levels (denoising_sigmas) are {list(sigmas)}: expected "
                             f"sigmas in (0, {MAX_SIGMA:g}] in strictly descending order (NaN or negative ones give black "
                             "images); the checkpoint or export is damaged or was edited")
    return CheckpointSampler("dmd2", net, step, num_classes, resolution, len(sigmas), denoising_sigmas=sigmas,
                             weights=weights)


def is_sigma(value: Any) -> bool:
    """Whether ``value`` can be a noise level: a number in (0, MAX_SIGMA] (dmd2.config.settings)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_SIGMA


def is_sigma_chain(sigmas: Any) -> bool:
    """Whether ``sigmas`` is a generator's chain of noise levels: the config's rule (a non-empty list of positive
    sigmas in strictly descending order: dmd2.config.settings.DESCENDING_SIGMAS), every one finite."""
    return DESCENDING_SIGMAS(sigmas) and all(is_sigma(s) for s in sigmas)


def generator_sigmas(state: dict[str, Any]) -> tuple[float, ...]:
    """A dmd2 checkpoint's chain of noise levels."""
    return tuple(float(s) for s in state["denoising_sigmas"])


def per_sample_noise(indices: Iterable[int], seed: int, shape: tuple[int, ...]) -> Tensor:
    """Noise [len(indices), *shape], sample i drawn from its own generator seeded (seed, i): any subset or
    batch size reproduces the same images. A leading steps axis in ``shape`` (S, C, H, W) gives each chain
    step its own draw; its first slice equals the noise of shape (C, H, W)."""
    return torch.stack([torch.randn(shape, generator=torch_generator(derived_seed(seed, i))) for i in indices])


def label_count(num_classes: int) -> int:
    """Labels a sampler draws: the classes, or the single label 0 of an unconditional model (num_classes 0)."""
    return max(1, num_classes)


def round_robin_labels(indices: range, num_classes: int) -> Tensor:
    """Class of sample i is i mod num_classes (equal counts when N is a multiple of num_classes); all 0 for an
    unconditional model."""
    return torch.tensor([i % label_count(num_classes) for i in indices], dtype=torch.long)


def sample_batches(sampler: CheckpointSampler, seeds: Sequence[int], labels: Tensor, batch_size: int,
                   device: torch.device | str = "cpu", base_seed: int = 0, dtype: torch.dtype | None = None
                   ) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (uint8 images [B,3,R,R] on the CPU, labels [B]) for ``seeds`` [N] with ``labels`` [N], in batches.
    The image of seed s is made from noise seeded by (base_seed, s), so it is the same whatever the batch size
    or the other seeds (``per_sample_noise``). ``dtype`` (bfloat16 / float16): the network runs under autocast."""
    if len(seeds) != len(labels):
        raise ValueError(f"{len(seeds)} seeds but {len(labels)} labels")
    shape = (sampler.noise_steps, 3, sampler.resolution, sampler.resolution)
    device = torch.device(device)
    for lo in range(0, len(seeds), batch_size):
        chunk, y = seeds[lo:lo + batch_size], labels[lo:lo + batch_size]
        noise = per_sample_noise(chunk, base_seed, shape).transpose(0, 1)  # [S, B, C, H, W]
        amp = (torch.autocast(device.type, dtype=dtype) if dtype not in (None, torch.float32)
               else contextlib.nullcontext())
        with amp:
            images = sampler(noise.to(device), y.to(device))
        yield to_uint8(images.float()).cpu(), y


def generate_uint8(sampler: CheckpointSampler, num: int, seed: int, batch_size: int,
                   device: torch.device | str = "cpu", start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (uint8 images [B,3,R,R] on the CPU, labels [B]) for samples start..start+num-1 (classes
    round-robin), in batches: what evaluate.py measures. Sample i is ``generate.py``'s seed i when seed = 0."""
    indices = range(start, start + num)
    yield from sample_batches(sampler, indices, round_robin_labels(indices, sampler.num_classes), batch_size,
                              device, seed)


GRID_MAX_CLASSES = 16  # sample grids show at most this many classes (rows), evenly spaced over all of them


def grid_labels(num_classes: int, per_class: int, device: torch.device) -> Tensor:
    """Labels [rows * per_class] laid out so a grid with ``per_class`` columns has one class per row: every class
    (at most GRID_MAX_CLASSES, evenly spaced, e.g. for ImageNet's 1000), or one row of label 0 for an
    unconditional model."""
    n = label_count(num_classes)
    classes = torch.arange(n) if n <= GRID_MAX_CLASSES else torch.linspace(0, n - 1, GRID_MAX_CLASSES).round().long()
    return classes.to(device).repeat_interleave(per_class)


def to_grid(images: Tensor, per_class: int) -> Tensor:
    """Images [N,3,H,W] in [-1, 1] -> a grid [3,H',W'] in [0, 1], ``per_class`` images per row."""
    return make_grid((images.float().clamp(-1, 1) + 1) / 2, nrow=per_class, padding=2)
