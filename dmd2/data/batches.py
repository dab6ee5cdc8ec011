"""Batches of a dataset: the epoch's order as a function of (seed, epoch), each rank's slice of the global batch,
optionally cached on the device, and random flips drawn in the training process."""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from dmd2.config.errors import ConfigError
from dmd2.data.datasets import LabelsOnly
from dmd2.data.images import from_uint8, to_uint8
from dmd2.method.randomness import EPOCH_STRIDE, GLOBAL_RNG, BatchRNG, derived_seed, torch_generator
from dmd2.runtime.perf import cache_fits
from dmd2.runtime.progress import Progress


def random_hflip(images: Tensor, rng: BatchRNG = GLOBAL_RNG) -> Tensor:
    """Flip each image [B,C,H,W] horizontally with probability 1/2 (draws from ``rng``)."""
    u = rng.rand(images.shape[0])
    return torch.where((u < 0.5).to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, forever: epoch e is a permutation seeded by (seed, e), cut into
    ``len(dataset) // (batch_size * world_size * rounds)`` full global batches. A global batch is cut into
    ``rounds`` x ``world_size`` slices of ``batch_size``: rank r's micro-batch of accumulation round a is slice
    a * world_size + r, and the sampler yields a rank's ``rounds`` micro-batches of each global batch in turn.
    Starts at global batch number ``start`` (= the training step)."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, rounds: int = 1) -> None:
        if num_items < batch_size * world_size * rounds:
            rounds_text = f" x {rounds} accumulation rounds" if rounds > 1 else ""
            raise ConfigError(f"batch_size = {batch_size} x {world_size} processes{rounds_text} is larger than the "
                              f"dataset ({num_items} images)")
        self.num_items, self.batch_size, self.seed, self.start = num_items, batch_size, seed, start
        self.rank, self.world_size, self.rounds = rank, world_size, rounds
        self.global_batch = batch_size * world_size * rounds
        self.batches_per_epoch = num_items // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, index = divmod(self.start, self.batches_per_epoch)
        while True:
            perm = torch.randperm(self.num_items, generator=torch_generator(derived_seed(self.seed, epoch, EPOCH_STRIDE)))
            for b in range(index, self.batches_per_epoch):
                for r in range(self.rounds):
                    first = b * self.global_batch + (r * self.world_size + self.rank) * self.batch_size
                    yield perm[first:first + self.batch_size].tolist()
            epoch, index = epoch + 1, 0


def accumulation_rounds(global_batch_size: int | None, batch_size: int, world_size: int) -> int:
    """Micro-batches per iteration: ``global_batch_size`` / (``batch_size`` x ``world_size``), which must be a
    positive integer (ConfigError naming the keys otherwise); 1 when ``global_batch_size`` is None (the global
    batch is batch_size x processes)."""
    if global_batch_size is None:
        return 1
    per_round = batch_size * world_size
    if global_batch_size < per_round or global_batch_size % per_round:
        raise ConfigError(f"config key 'global_batch_size' = {global_batch_size} is not a positive multiple of "
                          f"'batch_size' = {batch_size} x {world_size} processes = {per_round}: the accumulation "
                          "rounds (global_batch_size / (batch_size x processes)) must be a positive integer")
    return global_batch_size // per_round


def build_loader(ds: Dataset, batch_size: int, num_workers: int, seed: int, pin_memory: bool = False,
                 start_step: int = 0, rank: int = 0, world_size: int = 1, rounds: int = 1) -> DataLoader:
    """An endless loader of this rank's share (``rounds`` micro-batches of ``batch_size``) of full global
    batches, in an order fixed by ``seed``, starting at global batch ``start_step``."""
    sampler = EpochBatchSampler(len(ds), batch_size, seed, start_step, rank, world_size,  # type: ignore[arg-type]
                                rounds)
    # its own generator: creating the iterator must not draw from the global RNG (a resumed run would drift)
    return DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


class CachedBatches:
    """The dataset decoded once into memory, then batches indexed there: no loader workers, no per-step decoding.

    Images are kept as uint8 [N,3,R,R] on ``device`` (CIFAR-10's training set: 154 MB) and labels [N]; batches
    follow the same ``EpochBatchSampler`` order as ``build_loader`` (resumable, sharded by rank) and come out as
    float [B,3,R,R] in [-1, 1] (``from_uint8``, the loader's normalisation) with labels [B].
    ``LabelsOnly`` datasets keep only their labels (images are empty tensors)."""

    def __init__(self, ds: Dataset, batch_size: int, seed: int, device: torch.device, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, rounds: int = 1) -> None:
        self.sampler = EpochBatchSampler(len(ds), batch_size, seed, start_step, rank,  # type: ignore[arg-type]
                                         world_size, rounds)
        self.device = device
        if isinstance(ds, LabelsOnly):
            self.images, self.labels = None, torch.tensor(ds.targets, device=device)
            return
        chunks, labels = [], []
        with Progress(len(ds), "[data] decoding into memory", "images", enabled=rank == 0) as shown:
            for x, y in DataLoader(ds, batch_size=500, num_workers=num_workers):  # [-1, 1] floats -> exact uint8
                chunks.append(to_uint8(x))
                labels.append(y)
                shown.update(len(y))
        self.images = torch.cat(chunks).to(device)
        self.labels = torch.cat(labels).to(device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for indices in self.sampler:
            i = torch.tensor(indices, device=self.device)
            images = from_uint8(self.images[i]) if self.images is not None else torch.empty(0)
            yield images, self.labels[i]


def build_batches(ds: Dataset, batch_size: int, seed: int, device: torch.device, perf: Mapping[str, Any],
                  num_workers: int, start_step: int = 0, rank: int = 0, world_size: int = 1,
                  rounds: int = 1) -> Iterable[Any]:
    """This rank's endless batches from global batch ``start_step`` on: ``CachedBatches`` when
    ``perf.cache_dataset`` says so (auto: when the decoded uint8 images fit in ``perf.cache_max_gb``), else a
    DataLoader with ``num_workers`` workers (pinned memory on CUDA). Each step takes ``rounds`` batches in turn
    (gradient accumulation)."""
    first = ds[0][0]
    num_bytes = len(ds) * first.numel()  # type: ignore[arg-type]
    if cache_fits(perf["cache_dataset"], num_bytes, perf["cache_max_gb"]):
        return CachedBatches(ds, batch_size, seed, device, start_step, rank, world_size, num_workers, rounds)
    return build_loader(ds, batch_size, num_workers, seed, device.type == "cuda", start_step, rank, world_size,
                        rounds)


def total_steps(num_epochs: int, steps_per_epoch: int, max_steps: int | None) -> int:
    """Training length: num_epochs passes, capped by max_steps when it is set."""
    steps = num_epochs * steps_per_epoch
    return min(steps, max_steps) if max_steps else steps
