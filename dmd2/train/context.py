"""A training run's lifecycle: its output folder (checked writable, locked against a second run, cleared of
half-written files), the checkpoint it resumes (with the settings that may change), seeding, the logger (and
W&B run), stop signals, the torchrun process group, and what it returns. Both stage runners open one with
``run_context``."""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from dmd2.config.errors import ConfigError, FileError, FormatError, UserError
from dmd2.config.names import dataset_label, run_name
from dmd2.config.policy import resume_safe
from dmd2.config.validate import to_container
from dmd2.data.batches import accumulation_rounds
from dmd2.io.checkpoint import (RESCUE_ENV, checkpoint_name, latest_valid_checkpoint, load_checkpoint, rescue_dir,
                                rng_state, save_final, set_rng_state)
from dmd2.io.files import file_sha256
from dmd2.method.randomness import BatchRNG, derived_seed
from dmd2.runtime.devices import resolve_device
from dmd2.runtime.distributed import (Dist, any_rank, broadcast_object, gather_objects, init_distributed,
                                      shared_output_dir, shutdown)
from dmd2.runtime.perf import set_backend_flags
from dmd2.train.folder import RunLock, acquire_lock, check_branch, check_folder_owner, remove_orphans
from dmd2.train.logger import RunLogger

log = logging.getLogger(__name__)


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
    signals: list[int] = field(default_factory=list)  # stop signals received (SIGTERM, SIGINT, SIGUSR1)

    def say(self, message: str) -> None:
        """Log (INFO) on rank 0 only."""
        if self.dist.is_main:
            log.info(message)

    def stop_requested(self) -> bool:
        """Whether a stop signal reached any rank (every rank must call it at the same step: they agree)."""
        return any_rank(bool(self.signals), self.dist)

    def stop(self, state: dict[str, Any], prefix: str, step: int) -> None:
        """Save ``<prefix>_<step>.pt`` after a stop signal and end the run with exit status 128 + signal number,
        so ``resume=auto`` continues from this very step (SIGTERM: 143, SIGINT: 130, SIGUSR1: 138)."""
        sig = self.signals[0] if self.signals else signal.SIGTERM
        path = save_final(state, os.path.join(self.output_dir, checkpoint_name(prefix, step)), self.dist)
        message = (f"[train] {signal.Signals(sig).name} received: stopped at step {step}, checkpoint {path}; "
                   f"continue with resume=auto output_dir={self.output_dir}")
        if self.dist.is_main:
            log.warning(message)
        raise RunStopped(128 + int(sig))


class RunStopped(SystemExit):
    """The run saved a checkpoint and stopped on a signal; its exit status is 128 + the signal number."""


STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


def hydra_output_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # not running under @hydra.main (e.g. a test calling train(cfg) directly)
        return None


def default_run_name(stage: str | None = None) -> str | None:
    """W&B run name from the command-line overrides (dmd2.config.names.run_name): in a multirun the swept keys only
    (e.g. 'generator_lr=5e-06,seed=1'), else the stage, experiment and a few overrides, paths as their stem."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        swept = sweep_keys(hc) if hc.mode == RunMode.MULTIRUN else None
        return run_name(list(hc.overrides.task), swept, stage)
    except Exception:
        return None


def sweep_keys(hc: Any) -> list[str]:
    """The keys a multirun varies: its sweeper's ``params`` (an hparams_search space) and the sweep overrides
    (a,b / choice(...) / range(...)) of the command line, which the sweep stored in <sweep dir>/multirun.yaml."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [str(k) for k in (OmegaConf.select(hc, "sweeper.params") or {})]
    stored = os.path.join(hc.sweep.dir, "multirun.yaml")
    if os.path.isfile(stored):
        task = OmegaConf.select(OmegaConf.load(stored), "hydra.overrides.task") or []
        keys += [o.key_or_group for o in OverridesParser.create().parse_overrides(list(task)) if o.is_sweep_override()]
    return keys


def task_overrides() -> list[str]:
    """This job's command-line overrides (logged in the W&B config as ``overrides``); [] outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []


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


def logger_settings(cfg: DictConfig, data: Any = None) -> dict[str, Any]:
    """The logger config with the sweep's group filled in when ``logger.group`` is null, and the project when
    ``logger.project`` is null (from ``data``, by default the config's ``data``)."""
    settings = OmegaConf.to_container(cfg.logger, resolve=True)
    if settings.get("name") == "wandb" and settings.get("group") is None:  # type: ignore[union-attr]
        settings["group"] = sweep_group()  # type: ignore[index]
    if settings.get("name") == "wandb" and settings.get("project") is None:  # type: ignore[union-attr]
        data = data if data is not None else OmegaConf.select(cfg, "data", default=None)
        settings["project"] = wandb_project(data)  # type: ignore[index]
    return settings  # type: ignore[return-value]


def wandb_project(data: Any) -> str:
    """The default W&B project: dmd2-<data set> (dmd2-cifar10, dmd2-imagenet64, ...); dmd2 when the data is
    unknown."""
    return f"dmd2-{dataset_label(data)}" if data else "dmd2"


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
            log.info(f"[resume] no valid {prefix}_*.pt in {output_dir}: starting from scratch")
            return None
        log.info(f"[resume] continuing {found[0]} (step {found[1]['step']})")
        return found
    try:
        state = load_checkpoint(cfg.resume, kind=kind)
    except (FileError, FormatError) as err:
        raise type(err)(f"config key 'resume' = {cfg.resume!r}: {err}") from err
    log.info(f"[resume] continuing {cfg.resume} (step {state['step']})")
    return cfg.resume, state


def probe_write(folder: str) -> None:
    """Create ``folder`` if needed and write (then remove) a file there; OSError when that fails."""
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".tmp-write-check-", dir=folder)
    os.close(fd)
    os.remove(probe)


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed and write a file there, before any data or model is loaded."""
    try:
        probe_write(folder)
    except OSError as err:
        raise FileError(f"config key 'output_dir' = {folder!r}: not a writable folder ({err}); checkpoints "
                        "could not be saved there") from err


def check_rescue_dir() -> None:
    """The rescue folder (``$DMD2_RESCUE_DIR``) must take a file: it is found unusable now, at the start, not
    after a final checkpoint could not be written anywhere."""
    folder = rescue_dir()
    try:
        probe_write(folder)
    except OSError as err:
        raise FileError(f"${RESCUE_ENV} = {folder!r}: not a writable folder ({err}); a final checkpoint that cannot "
                        f"be written to output_dir is saved there. Set {RESCUE_ENV} to a writable folder") from err


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def resume_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The settings that differ between a checkpoint's config and this run's, as 'key: old -> new' lines:
    (safe to change, refused). Which may change is each key's policy (dmd2.config.policy.resume_safe): the
    schedule, learning rates, logging, evaluation and paths; architecture, data, batch size, seed, ... may not."""
    a, b = flatten(old), flatten(new)
    safe, refused = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            line = f"{key}: {a.get(key, '<unset>')} -> {b.get(key, '<unset>')}"
            (safe if resume_safe(key) else refused).append(line)
    return safe, refused


@contextmanager
def stop_signals(signals: list[int]) -> Iterator[None]:
    """Record SIGTERM / SIGINT / SIGUSR1 in ``signals`` (the loop saves and stops after the current step); a
    second signal gets the default behaviour (e.g. a second Ctrl-C interrupts at once)."""
    previous = {}

    def record(signum: int, frame: Any) -> None:
        signals.append(signum)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"\n[train] {signal.Signals(signum).name} received: saving a checkpoint after this step",
              file=sys.stderr, flush=True)

    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, record)
    except ValueError:  # not the main thread: no handlers
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def run_context(cfg: DictConfig, job_type: str, prefix: str) -> Iterator[RunContext]:
    """Join the torchrun process group (if any), settle the output folder (rank 0's, shared by every rank)
    and the checkpoint to resume, seed, store the config, start the logger (rank 0 only). On leaving, the
    logger (and W&B run) is finished, with a failure code if the run raised, and the process group closed."""
    d, device = init_distributed(resolve_device(cfg.device))
    try:  # every rank refuses a global batch that is no multiple of batch_size x processes, alike
        global_batch(cfg, d)
    except ConfigError:
        shutdown()
        raise
    own_dir = hydra_output_dir()
    output_dir = shared_output_dir(cfg.output_dir or own_dir or os.path.join("outputs", "run"), own_dir, d)
    kind = prefix if prefix == "teacher" else "dmd2"
    lock, found, refusal, inputs = None, None, None, {}
    if d.is_main:  # rank 0 takes the folder and finds the checkpoint; every rank learns the outcome
        try:
            lock, found, inputs = take_folder(cfg, output_dir, prefix, kind, d)
        except UserError as err:  # any refusal of the start, whatever its cause, reaches every rank
            refusal = err
    if broadcast_object(refusal is not None, d):
        if lock is not None:
            lock.release()
        shutdown()
        raise refusal if refusal is not None else ConfigError("the run was refused on rank 0 (see its message)")
    try:
        ctx = open_context(cfg, job_type, output_dir, device, d, found, kind, inputs)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    logger = ctx.logger
    try:
        with stop_signals(ctx.signals):
            yield ctx
    except RunStopped as stopped:
        logger.finish(exit_code=int(stopped.code or 1), preempted=True)
        raise
    except BaseException:
        logger.finish(exit_code=1)
        raise
    else:
        logger.finish()
    finally:
        shutdown()
        if lock is not None:
            lock.release()


def open_context(cfg: DictConfig, job_type: str, output_dir: str, device: torch.device, d: Dist,
                 found: tuple[str, dict[str, Any]] | None, kind: str, inputs: dict[str, str]) -> RunContext:
    """Every rank's part of the start: the checkpoint to resume, seeds, the stored config (with rank 0's
    ``inputs``, the hashes of the files the run consumes) and the logger."""
    resume_path = broadcast_object(found[0] if found else None, d)
    resume = found[1] if found else (load_checkpoint(resume_path, kind=kind) if resume_path else None)
    config = to_container(cfg)
    settings = logger_settings(cfg)  # with the sweep's W&B group filled in: evaluate.py joins it
    inputs = broadcast_object(inputs, d)
    config.update(output_dir=output_dir, world_size=d.world_size, global_batch_size=global_batch(cfg, d),
                  logger=settings, **inputs)
    set_backend_flags(cfg.perf, device)
    torch.manual_seed(cfg.seed + d.rank)  # dropout and other in-network randomness differ between ranks
    # config.yaml, metrics.jsonl and the W&B run appear with the first thing logged: a run refused while the
    # runner builds and checks its networks leaves output_dir as it was
    # W&B also records the command line as typed (the resolved config alone does not say what was chosen)
    logger = RunLogger(output_dir, settings, {**config, "overrides": task_overrides()}, job_type,
                       cfg.run_name or default_run_name(cfg.stage),
                       enabled=d.is_main, resume_id=resume.get("wandb_run_id") if resume else None,
                       config_yaml=OmegaConf.to_yaml(cfg, resolve=True) + OmegaConf.to_yaml(inputs) * bool(inputs),
                       keep_until=int(resume["step"]) if resume else -1)
    ctx = RunContext(output_dir, device, config, logger, d, BatchRNG(cfg.seed, device, d.rank, d.world_size), resume)
    if d.enabled:
        ctx.say(f"[{job_type}] {d.world_size} processes (torchrun): batch_size {cfg.batch_size} per process, "
                f"global batch {global_batch(cfg, d)}")
    return ctx


def global_batch(cfg: DictConfig, d: Dist) -> int:
    """The images of one optimizer step over every process: ``global_batch_size``, or batch_size x processes when
    it is null (ConfigError when it is no multiple of batch_size x processes). The run stores this value as its
    ``global_batch_size``."""
    rounds = accumulation_rounds(cfg.get("global_batch_size"), cfg.batch_size, d.world_size)
    return cfg.batch_size * d.world_size * rounds


def take_folder(cfg: DictConfig, output_dir: str, prefix: str, kind: str, d: Dist
                ) -> tuple[RunLock, tuple[str, dict[str, Any]] | None, dict[str, str]]:
    """Rank 0's checks before anything is loaded: output_dir writable and this run's (locked, not another run's
    folder, cleared of interrupted writes), the rescue folder usable, and the checkpoint to resume (consistent
    with this run's settings and input files, not a branch). Any failure releases the lock again. Returns the
    lock, the checkpoint to resume (or None) and ``input_hashes``."""
    check_writable(output_dir)
    check_rescue_dir()
    lock = acquire_lock(output_dir)
    try:
        check_folder_owner(output_dir, cfg.stage, cfg.resume)
        remove_orphans(output_dir)
        found = find_resume(cfg, output_dir, prefix, kind)
        inputs = input_hashes(cfg)
        if found is not None:
            if cfg.resume != "auto":
                check_branch(output_dir, prefix, found[0], int(found[1]["step"]))
            check_same_inputs(found, inputs, cfg)
            check_resume_config(found[1]["config"], {**to_container(cfg), "output_dir": output_dir, **inputs,
                                "world_size": d.world_size, "global_batch_size": global_batch(cfg, d)})
    except BaseException:
        lock.release()
        raise
    return lock, found, inputs


def input_hashes(cfg: DictConfig) -> dict[str, str]:
    """The SHA-256 of the files a run consumes, computed once per start (a distillation: its teacher, as
    ``teacher_sha256``); stored in the run's config and checkpoints, and compared on resume."""
    if cfg.stage != "distill":
        return {}
    return {"teacher_sha256": file_sha256(cfg.teacher_checkpoint)}


def check_same_inputs(found: tuple[str, dict[str, Any]], inputs: dict[str, str], cfg: DictConfig) -> None:
    """Refuse to resume checkpoint ``found`` (path, state) with another teacher file than it was trained with
    (``inputs``: this start's ``input_hashes``): a teacher overwritten at the same path would train one generator
    against two teachers."""
    path, state = found
    digest, stored = inputs.get("teacher_sha256"), (state.get("config") or {}).get("teacher_sha256")
    if digest is None:
        return
    if stored is None:
        log.warning(f"[resume] WARNING: {path} records no teacher_sha256 (an older checkpoint): its teacher cannot be "
                    f"compared with {cfg.teacher_checkpoint}")
    elif stored != digest:
        raise FileError(f"config key 'teacher_checkpoint' = {cfg.teacher_checkpoint!r}: this file (sha256 {digest}) "
                        f"is not the teacher {path} was trained with (sha256 {stored}); restore that teacher, or "
                        f"distill this one into a new output_dir")


def check_resume_config(old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse a resume whose settings (``new``: this run's resolved config) differ from the checkpoint's beyond
    ``resume_safe`` (unless ``resume_allow_changes``); announce the changes that will take effect."""
    safe, refused = resume_changes(old, new)
    if refused and not new.get("resume_allow_changes"):
        raise ConfigError("config keys differ from the checkpoint to resume, and continuing with them would mix "
                          "two settings in one run:\n  " + "\n  ".join(refused) + "\nDrop these overrides, start a "
                          "new output_dir, or set resume_allow_changes=true to continue with them anyway")
    for line in safe + refused:
        if not line.startswith(("resume:", "resume_allow_changes:", "output_dir:")):
            log.info(f"[resume] changed from the checkpoint, in effect from its step on: {line}")


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
    ranks = ctx.resume["rng_ranks"]
    if len(ranks) == ctx.dist.world_size:
        set_rng_state(ranks[ctx.dist.rank])
    else:
        ctx.say(f"[resume] the checkpoint was written by {len(ranks)} processes, this run has "
                f"{ctx.dist.world_size}: per-rank random streams are reseeded")
        torch.manual_seed(derived_seed(int(ctx.resume["step"]), ctx.config["seed"] + ctx.dist.rank))
    if not ctx.rng.set_state(ctx.resume.get("batch_rng")):
        ctx.say("[resume] the checkpoint's batch random stream does not fit this device: it starts afresh from "
                "the seed (the run stays valid, but is not a bitwise continuation)")
