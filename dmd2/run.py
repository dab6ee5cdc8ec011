"""A training run's lifecycle: its output folder, the checkpoint it resumes, seeding, the logger (and W&B run),
the torchrun process group, and what it returns. Both stage runners open one with ``run_context``."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from dmd2.checkpoint import CheckpointError, latest_valid_checkpoint, load_checkpoint, rng_state, set_rng_state
from dmd2.config import ConfigError, resolve_device, to_container
from dmd2.distributed import Dist, broadcast_object, gather_objects, init_distributed, shutdown
from dmd2.randomness import BatchRNG, derived_seed
from dmd2.run_logger import RunLogger
from dmd2.speed import set_backend_flags


@dataclass
class RunContext:
    """Where a run writes, on which device, its logger, this process's rank and the batch's random stream."""

    output_dir: str
    device: torch.device
    config: dict[str, Any]
    logger: RunLogger
    dist: Dist
    rng: BatchRNG                         # noise, noise levels, timesteps and flips of the global batch
    resume: dict[str, Any] | None = None  # the checkpoint this run continues, if any

    def say(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.dist.is_main:
            print(message, flush=True)


def hydra_output_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # not running under @hydra.main (e.g. a test calling train(cfg) directly)
        return None


def default_run_name() -> str | None:
    """W&B run name from the command-line overrides, e.g. 'stage=distill,generator_lr=5e-06'."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = [o for o in HydraConfig.get().overrides.task if not o.startswith(("output_dir=", "data_dir="))]
        return ",".join(task) or None
    except Exception:
        return None


def sweep_group() -> str | None:
    """In a Hydra multirun, the sweep's name: the last two parts of its directory (e.g.
    'multirun/2026-11-26/14-03-12-123456' -> '2026-11-26_14-03-12-123456'), so every job of one sweep lands in
    one W&B group."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        parts = [p for p in os.path.normpath(os.path.abspath(hc.sweep.dir)).split(os.sep) if p]
        return "_".join(parts[-2:])
    except Exception:
        return None


def logger_settings(cfg: DictConfig) -> dict[str, Any]:
    """The logger config with the sweep's group filled in when ``logger.group`` is null."""
    settings = OmegaConf.to_container(cfg.logger, resolve=True)
    if settings.get("name") == "wandb" and settings.get("group") is None:  # type: ignore[union-attr]
        settings["group"] = sweep_group()  # type: ignore[index]
    return settings  # type: ignore[return-value]


def find_resume(cfg: DictConfig, output_dir: str, prefix: str, kind: str) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint named by ``resume`` as (path, state): null = none, auto = the newest valid one in
    output_dir, else a path."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        if not cfg.output_dir:
            raise ConfigError("config key 'resume' = 'auto' needs output_dir=<the folder of the run to continue>")
        found = latest_valid_checkpoint(output_dir, prefix, kind)
        if found is None:
            print(f"[resume] no valid {prefix}_*.pt in {output_dir}: starting from scratch", flush=True)
            return None
        print(f"[resume] continuing {found[0]} (step {found[1]['step']})", flush=True)
        return found
    try:
        state = load_checkpoint(cfg.resume, kind=kind)
    except CheckpointError as err:
        raise ConfigError(f"config key 'resume' = {cfg.resume!r}: {err}") from err
    print(f"[resume] continuing {cfg.resume} (step {state['step']})", flush=True)
    return cfg.resume, state


@contextmanager
def run_context(cfg: DictConfig, job_type: str, prefix: str) -> Iterator[RunContext]:
    """Join the torchrun process group (if any), settle the output folder (rank 0's, shared by every rank)
    and the checkpoint to resume, seed, store the config, start the logger (rank 0 only). On leaving, the
    logger (and W&B run) is finished, with a failure code if the run raised, and the process group closed."""
    d, device = init_distributed(resolve_device(cfg.device))
    own_dir = hydra_output_dir()
    output_dir = broadcast_object(cfg.output_dir or own_dir or os.path.join("outputs", "run"), d)
    if not d.is_main and own_dir and os.path.abspath(own_dir) != os.path.abspath(output_dir):
        try:  # the empty Hydra folder of a rank > 0 (train.py tells Hydra to write nothing there)
            os.rmdir(own_dir)
        except OSError:
            pass
    kind = prefix if prefix == "teacher" else "dmd2"
    found = find_resume(cfg, output_dir, prefix, kind) if d.is_main else None
    resume_path = broadcast_object(found[0] if found else None, d)
    resume = found[1] if found else (load_checkpoint(resume_path, kind=kind) if resume_path else None)
    config = to_container(cfg)
    config.update(output_dir=output_dir, world_size=d.world_size, global_batch_size=cfg.batch_size * d.world_size)
    if d.is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
    set_backend_flags(cfg.perf, device)
    torch.manual_seed(cfg.seed + d.rank)  # dropout and other in-network randomness differ between ranks
    logger = RunLogger(output_dir, logger_settings(cfg), config, job_type, cfg.run_name or default_run_name(),
                       enabled=d.is_main, resume_id=resume.get("wandb_run_id") if resume else None)
    ctx = RunContext(output_dir, device, config, logger, d, BatchRNG(cfg.seed, device, d), resume)
    if d.enabled:
        ctx.say(f"[{job_type}] {d.world_size} processes (torchrun): batch_size {cfg.batch_size} per process, "
                f"global batch {cfg.batch_size * d.world_size}")
    try:
        yield ctx
    except BaseException:
        logger.finish(exit_code=1)
        raise
    finally:
        shutdown()
    logger.finish()


def run_state(ctx: RunContext, step: int, **parts: Any) -> dict[str, Any]:
    """Checkpoint fields every stage shares: step, config, random states (every rank's) and the W&B run id.
    Under torchrun every rank must call it (it gathers the ranks' random states)."""
    ranks = gather_objects(rng_state(), ctx.dist)
    return {"step": step, "config": ctx.config, "rng": ranks[0], "rng_ranks": ranks,
            "batch_rng": ctx.rng.get_state(), "wandb_run_id": ctx.logger.run_id, **parts}


def restore_rng(ctx: RunContext) -> None:
    """On resume, continue the random streams exactly where the checkpoint left them. Resuming with another
    number of processes continues the shared batch stream; each rank's own stream is then reseeded."""
    if ctx.resume is None:
        return
    ranks = ctx.resume.get("rng_ranks", [ctx.resume["rng"]])
    if len(ranks) == ctx.dist.world_size:
        set_rng_state(ranks[ctx.dist.rank])
    else:
        ctx.say(f"[resume] the checkpoint was written by {len(ranks)} processes, this run has "
                f"{ctx.dist.world_size}: per-rank random streams are reseeded")
        torch.manual_seed(derived_seed(int(ctx.resume["step"]), ctx.config["seed"] + ctx.dist.rank))
    if not ctx.rng.set_state(ctx.resume.get("batch_rng")):
        ctx.say("[resume] the checkpoint's batch random stream does not fit this device: it starts afresh from "
                "the seed (the run stays valid, but is not a bitwise continuation)")


def progress(total: int, desc: str, ctx: RunContext) -> Any:
    """A progress bar on rank 0 (disabled on the others)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
                disable=not ctx.dist.is_main)


def run_result(checkpoint: str, steps: int, metrics: dict[str, float], evaluator: Any, loss_key: str
               ) -> dict[str, Any]:
    """What a stage returns: the final checkpoint, the last logged metrics with the evaluation's last and best
    values, and ``objective_key``, the metric a sweeper minimises by default: the best FID / FD when
    ``eval_every`` > 0, else the last logged ``loss_key``."""
    metrics = {**metrics, **evaluator.results()}
    key = f"{evaluator.key}_best" if evaluator.results() else loss_key
    return {"checkpoint": checkpoint, "steps": steps, "metrics": metrics, "objective_key": key}
