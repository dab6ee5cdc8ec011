"""Random streams of a run, all derived from its ``seed``.

- The batch's draws (noise, noise levels, DM / GAN timesteps, flips) come from ``BatchRNG``: one stream shared by
  every torchrun rank, drawn for the whole global batch, of which each rank keeps its slice. Sample i of the
  global batch gets the same draws whatever the number of processes, and (without dropout) N processes with
  batch B follow one process with batch N*B up to floating-point summation order.
- The global torch RNG (dropout inside the networks) is seeded with ``seed + rank``.
- Streams that must not depend on anything but the seed and an index (per-sample evaluation noise, the epoch's
  batch order, the backward-simulation depth of a step, the fixed noise of sample grids) get their own
  generator, seeded by ``derived_seed``.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

# Strides that turn (seed, index) into one generator seed: seed * stride + index. Primes larger than any index
# they are used with, so two (seed, index) pairs never share a seed (index < stride).
SAMPLE_STRIDE = 1_000_003  # per-sample noise (index: sample number), chain depth (step), reseeding (step)
EPOCH_STRIDE = 100_003     # the batch order of an epoch (index: epoch)
GRID_NOISE_OFFSET = 12345  # the fixed noise of the sample grids: seed + offset, apart from the training streams


def derived_seed(seed: int, index: int, stride: int = SAMPLE_STRIDE) -> int:
    """The seed of stream ``index`` of a run seeded ``seed``."""
    return seed * stride + index


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


class BatchRNG:
    """Draws for a global batch from one shared stream; each rank keeps its slice of ``world_size`` equal parts.

    ``randn(8, 3, dim=0)`` on rank r of 2 draws [16, 3] and returns rows 8r .. 8r+7. With one process (or
    ``generator=None``, the global RNG) it is an ordinary draw. Inside ``rounds(R)``, round r draws for
    R x world_size parts and keeps part r * world_size + rank (see the module docstring)."""

    def __init__(self, seed: int | None = None, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1) -> None:
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.generator = torch_generator(seed, self.device) if seed is not None else None
        self.parts, self.part = world_size, rank  # the draw's parts and this process's (round r: r * world + rank)

    def rounds(self, rounds: int) -> Iterator[int]:
        """Iterate over the ``rounds`` micro-batches of one phase of an iteration: before round r the stream is
        put back where the phase started and draws are made for all ``rounds`` x world_size parts, this rank
        keeping part r * world_size + rank. Afterwards the stream is where one full draw leaves it."""
        if rounds == 1:
            yield 0
            return
        if self.generator is None:
            raise ValueError("accumulation rounds need a seeded BatchRNG (the global RNG cannot be rewound)")
        start = self.generator.get_state()
        try:
            for r in range(rounds):
                if r:
                    self.generator.set_state(start)
                self.parts, self.part = rounds * self.world_size, r * self.world_size + self.rank
                yield r
        finally:
            self.parts, self.part = self.world_size, self.rank

    def _global(self, shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
        return tuple(s * self.parts if i == dim else s for i, s in enumerate(shape))

    def _mine(self, full: Tensor, n: int, dim: int) -> Tensor:
        return full.narrow(dim, self.part * n, n) if self.parts > 1 else full

    def randn(self, *shape: int, dim: int = 0) -> Tensor:
        """Standard normal draws, ``shape`` with the batch along ``dim``."""
        full = torch.randn(self._global(shape, dim), generator=self.generator, device=self.device)
        return self._mine(full, shape[dim], dim)

    def rand(self, n: int) -> Tensor:
        """Uniform [0, 1) draws [n]."""
        return self._mine(torch.rand(n * self.parts, generator=self.generator, device=self.device), n, 0)

    def randint(self, low: int, high: int, n: int) -> Tensor:
        """Integers in [low, high), [n]."""
        full = torch.randint(low, high, (n * self.parts,), generator=self.generator, device=self.device)
        return self._mine(full, n, 0)

    def get_state(self) -> Tensor | None:
        return self.generator.get_state() if self.generator is not None else None

    def set_state(self, state: Tensor | None) -> bool:
        """Continue a saved stream; False (the stream is left as seeded) when there is none or it was saved on
        another kind of device (CPU and CUDA generators keep different states)."""
        if self.generator is None or state is None:
            return False
        try:
            self.generator.set_state(state)
        except RuntimeError:
            return False
        return True

    def randn_like(self, x: Tensor) -> Tensor:
        """Noise shaped like x [B,...] (batch first), on x's device and dtype."""
        return self.randn(*x.shape).to(device=x.device, dtype=x.dtype)


GLOBAL_RNG = BatchRNG()  # draws from the global torch RNG, one process (library calls outside a run)
