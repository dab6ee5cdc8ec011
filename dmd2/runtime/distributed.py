"""Multi-process training with torchrun and DistributedDataParallel.

``torchrun --nproc_per_node N train.py ...`` starts N copies of this program with RANK, LOCAL_RANK and
WORLD_SIZE set; ``init_distributed`` joins them into one process group (NCCL on GPUs, gloo on the CPU).
Without torchrun everything here is a no-op for a world of one process.

Randomness under torchrun: see dmd2.method.randomness (one batch stream shared by every rank, each rank keeping its
slice; the global torch RNG, for dropout, seeded with ``seed + rank``).
"""
from __future__ import annotations

import contextlib

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dmd2.config.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (if any) and pick this rank's device: cuda:LOCAL_RANK for CUDA runs.

    Returns the Dist and the device. Idempotent: a second call reuses the existing group."""
    if not launched_by_torchrun():
        return Dist(), device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index is not None and device.index != local:
            raise ConfigError(f"config key 'device' = {device} under torchrun: each process uses cuda:LOCAL_RANK; "
                             "use device=auto or device=cuda")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value such as a path)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: dict[str, float], d: Dist) -> dict[str, float]:
    """Average scalar logs over the ranks that have them, so rank 0 logs global-batch values. Every rank must
    call it; their keys may differ (a rank drops a non-finite value)."""
    if not d.enabled:
        return values
    merged: dict[str, list[float]] = {}
    for rank_values in gather_objects(values, d):
        for key, v in rank_values.items():
            merged.setdefault(key, []).append(v)
    return {key: sum(vs) / len(vs) for key, vs in merged.items()}


def synced(module: nn.Module, last: bool) -> Any:
    """The context of one accumulation round's forward and backward through ``module``: DDP's ``no_sync`` (the
    gradients accumulate locally) unless it is the ``last`` round, whose backward all-reduces the sum."""
    if last or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def wrap(module: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """``module`` inside DistributedDataParallel (gradients averaged over ranks in backward); itself when alone.

    Only the parameters that require gradients are synchronised (a frozen teacher inside is left alone)."""
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # no buffer broadcast before each forward: the networks' buffers are constants (no running statistics);
    # newer PyTorch renames the switch
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{no_sync: False})


def global_mean(value: Tensor) -> Tensor:
    """The mean of a (detached) tensor over all ranks; ``value`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank if ``flag`` is true on any rank (one small all-reduce)."""
    if not d.enabled:
        return flag
    t = torch.tensor([float(flag)], device=torch.device("cuda", d.local_rank) if dist.get_backend() == "nccl"
                     else torch.device("cpu"))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def batch_shard(n: int, batch_size: int, d: Dist) -> range:
    """This rank's share of items 0..n-1 processed in batches of ``batch_size``: a contiguous run of whole
    batches, the ranks' shares in rank order. Each batch is then exactly the batch one process would run (same
    items, same size), so per-item results do not depend on the number of processes, bit for bit."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = -(-n // batch_size)
    lo = batches * d.rank // d.world_size * batch_size
    hi = batches * (d.rank + 1) // d.world_size * batch_size
    return range(min(lo, n), min(hi, n))


def shared_output_dir(chosen: str, own_dir: str | None, d: Dist) -> str:
    """Rank 0's ``chosen`` output folder, on every rank. A rank > 0 removes its own (empty) Hydra folder when it
    is another one: the scripts tell Hydra to write nothing there (``dmd2.config.cli.quiet_hydra_on_other_ranks``)."""
    folder = broadcast_object(chosen, d)
    if not d.is_main and own_dir and os.path.abspath(own_dir) != os.path.abspath(folder):
        try:
            os.rmdir(own_dir)
        except OSError:
            pass
    return folder


def gather_to_main(obj: Any, d: Dist) -> list[Any] | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None on the other ranks (nothing is copied to them)."""
    if not d.enabled:
        return [obj]
    out: list[Any] | None = [None] * d.world_size if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out
