"""Sampling from checkpoints: one interface for teachers (Heun) and DMD2 generators (one step).

Both ``generate.py`` and ``evaluate.py`` use it, so a checkpoint is always sampled the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from dmd2.checkpoint import load_checkpoint, network_from_checkpoint
from dmd2.diffusion import heun_nfe, heun_sample, heun_sampler_sigmas, one_step_sample, to_uint8
from dmd2.networks import EDMPrecond


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
    conditioning_sigma: float = 80.0  # generator only

    def describe(self) -> str:
        if self.kind == "teacher":
            return f"teacher checkpoint (step {self.step}), Heun sampler, {self.heun_steps} steps = {self.nfe} NFE"
        return f"DMD2 generator checkpoint (step {self.step}), one step = {self.nfe} NFE"

    @torch.no_grad()
    def __call__(self, noise: Tensor, labels: Tensor) -> Tensor:
        if self.kind == "teacher":
            sigmas = heun_sampler_sigmas(self.heun_steps).to(noise.device)
            return heun_sample(self.net, noise, labels, sigmas)
        return one_step_sample(self.net, noise, labels, self.conditioning_sigma)


def load_sampler(path: str, device: torch.device | str = "cpu", heun_steps: int = 18,
                 teacher_weights: str = "ema") -> CheckpointSampler:
    """Teacher checkpoints sample their ``teacher_weights`` ("ema" or "model") with ``heun_steps`` Heun steps;
    DMD2 checkpoints sample the generator in one step from their conditioning sigma."""
    state = load_checkpoint(path)
    common = dict(step=int(state["step"]), num_classes=int(state["num_classes"]), resolution=int(state["resolution"]))
    if state["kind"] == "teacher":
        if teacher_weights not in ("ema", "model"):
            raise ValueError(f"teacher_weights must be 'ema' or 'model', got {teacher_weights!r}")
        if heun_steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {heun_steps}")
        net = network_from_checkpoint(state, teacher_weights).to(device).eval()
        return CheckpointSampler("teacher", net, nfe=heun_nfe(heun_steps), heun_steps=heun_steps, **common)
    net = network_from_checkpoint(state, "generator").to(device).eval()
    return CheckpointSampler("dmd2", net, nfe=1, conditioning_sigma=float(state["conditioning_sigma"]), **common)


def per_sample_noise(indices: range, seed: int, shape: tuple[int, ...]) -> Tensor:
    """Noise [len(indices), *shape], sample i drawn from its own generator seeded (seed, i): any subset or
    batch size reproduces the same images."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                        for i in indices])


def round_robin_labels(indices: range, num_classes: int) -> Tensor:
    """Class of sample i is i mod num_classes (equal counts when N is a multiple of num_classes)."""
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long)


def generate_uint8(sampler: CheckpointSampler, num: int, seed: int, batch_size: int,
                   device: torch.device | str = "cpu", start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (uint8 images [B,3,R,R] on the CPU, labels [B]) for samples start..start+num-1, in batches."""
    shape = (3, sampler.resolution, sampler.resolution)
    for lo in range(start, start + num, batch_size):
        idx = range(lo, min(lo + batch_size, start + num))
        labels = round_robin_labels(idx, sampler.num_classes)
        images = sampler(per_sample_noise(idx, seed, shape).to(device), labels.to(device))
        yield to_uint8(images).cpu(), labels
