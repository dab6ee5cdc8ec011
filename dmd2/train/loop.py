"""One training loop for both stages, read top to bottom.

A stage (``TeacherStage`` in dmd2/train/teacher.py, ``DistillStage`` in dmd2/train/distill.py) is a small object
that knows how to take one step, what its checkpoint holds, how to draw its sample grids and what an evaluation
measures. The loop owns the cadence every stage shares: log every ``log_every`` steps (the window's mean of each
scalar the step returned, a histogram of each vector), sample grids every ``sample_every`` steps, evaluations when
the evaluator says so, periodic checkpoints, stop signals, and the final checkpoint.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol

import torch
from torch import Tensor, nn

from dmd2.data.batches import accumulation_rounds, build_batches, total_steps
from dmd2.io.checkpoint import save_final, save_periodic
from dmd2.io.sampler import CheckpointSampler
from dmd2.runtime.distributed import mean_across_ranks
from dmd2.runtime.progress import bar_safe_logging
from dmd2.train.context import RunContext, restore_rng, run_state
from dmd2.train.evaluator import TrainingEvaluator
from dmd2.train.logger import RunningMeans
from dmd2.train.optim import Updater, check_trained
from dmd2.train.plan import log_schedule

log = logging.getLogger(__name__)

# what the loop logs for every stage (train/kimg: thousands of images seen, over every process and round)
LOOP_KEYS = ("train/images_per_sec", "train/epoch", "train/global_batch_size", "train/kimg")


class Stage(Protocol):
    """What the loop needs of a stage."""

    name: str                      # "teacher" | "distill": messages and the progress bar
    prefix: str                    # checkpoint files: <prefix>_NNNNNN.pt and <prefix>_final.pt
    progress_key: str              # the logged scalar the progress bar shows
    evaluate_first: bool           # draw grids and evaluate at step 0, before any update
    updaters: dict[str, Updater]   # checked for "every update skipped" at the end
    networks: dict[str, nn.Module]  # checked for non-finite weights at the end

    def step(self, batches: list[tuple[Tensor, Tensor]], step: int) -> dict[str, Tensor]:
        """One iteration on the loader's (images, labels), one per accumulation round; the logs: scalars (averaged over the log window) and
        vectors (one histogram per window)."""

    def scalars(self, step: int) -> dict[str, float]:
        """Scalars logged as they are at ``step`` (learning rates, skipped updates)."""

    def state(self) -> dict[str, Any]:
        """The stage's part of a checkpoint (networks, optimizers, what they were built from)."""

    def log_grids(self, step: int) -> None:
        """Log the sample grids (rank 0 only)."""

    def sampler(self, step: int) -> CheckpointSampler:
        """What an evaluation measures: the weights generate.py and evaluate.py would sample."""

    def publish(self, path: str, steps: int) -> None:
        """After the final checkpoint ``path`` is written (rank 0 only): artifacts, exports."""


@dataclass(frozen=True)
class Plan:
    """How long a run is and how much it sees."""

    start: int                     # the first step (a resumed run's checkpoint step)
    steps: int                     # the last step
    steps_per_epoch: int           # global batches per pass over the data
    global_batch: int              # images per step, over every process and accumulation round
    rounds: int = 1                # accumulation rounds per step (micro-batches of batch_size per process)


def plan_batches(cfg: Any, ctx: RunContext, dataset: Any, start: int) -> tuple[Iterable[Any], Plan]:
    """This rank's batches from step ``start`` on and the run's plan (printed at the start)."""
    world = ctx.dist.world_size
    rounds = accumulation_rounds(cfg.get("global_batch_size"), cfg.batch_size, world)
    loader = build_batches(dataset, cfg.batch_size, cfg.seed, ctx.device, cfg.perf, cfg.data.num_workers, start,
                           ctx.dist.rank, world, rounds)
    global_batch = cfg.batch_size * world * rounds
    steps_per_epoch = len(dataset) // global_batch
    plan = Plan(start, total_steps(cfg.num_epochs, steps_per_epoch, cfg.max_steps), steps_per_epoch, global_batch,
                rounds)
    log_schedule(cfg, plan.steps, steps_per_epoch, start, ctx.dist.is_main, world, rounds)
    return loader, plan


class LogWindow:
    """What the steps of one log interval returned: means of the scalars, the values of the vectors."""

    def __init__(self) -> None:
        self.means = RunningMeans()
        self.vectors: dict[str, list[Tensor]] = {}
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, logs: dict[str, Tensor], images: int) -> None:
        self.means.add({f"train/{k}": v for k, v in logs.items() if v.numel() == 1})
        for k, v in logs.items():
            if v.numel() != 1:
                self.vectors.setdefault(f"train/{k}", []).append(v.detach().flatten())
        self.images += images

    def close(self, ctx: RunContext) -> tuple[dict[str, float], dict[str, Tensor], float]:
        """(the scalars' means over ranks, the vectors, images per second); starts the next window."""
        now = time.perf_counter()
        means = mean_across_ranks(self.means.pop(), ctx.dist)
        vectors = {k: torch.cat(v).cpu() for k, v in self.vectors.items()}
        rate = self.images / (now - self.t0)
        self.vectors = {}
        self.t0 = now
        self.images = 0
        return means, vectors, rate


def memory_text(device: torch.device) -> str:
    """The memory a status line shows: the peak allocated on a CUDA device, else the process's peak resident
    size."""
    if device.type == "cuda":
        return f"gpumem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB"
    import resource

    return f"cpumem {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB"  # ru_maxrss: KiB (Linux)


def loss_keys(metrics: dict[str, float], progress_key: str) -> list[str]:
    """The losses a status line shows: the stage's progress key first, then every other train/loss_*."""
    keys = [progress_key] if progress_key in metrics else []
    return keys + sorted(k for k in metrics if k.startswith("train/loss") and k != progress_key)


class TrainingProgress:
    """The training run's progress on rank 0: a bar on a terminal (``progress``: auto | bar | lines), else a status
    line every ``log_every`` steps, in the style of EDM's: step, kimg, seconds per step, ETA, the main losses and
    memory. The status line also goes to the run's train.log when the bar is shown. Seconds per step, the bar's
    rate and the ETA count training steps only: the time spent in sample grids, evaluations and checkpoints is
    left out (``paused``)."""

    def __init__(self, mode: str, plan: Plan, name: str, progress_key: str, device: torch.device,
                 enabled: bool) -> None:
        from dmd2.runtime.progress import interactive

        self.plan, self.name, self.key, self.device, self.enabled = plan, name, progress_key, device, enabled
        self.lines = mode == "lines" or (mode == "auto" and not interactive())
        self.t0, self.paused_s = time.perf_counter(), 0.0
        self.bar = None
        if enabled and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=plan.steps, initial=plan.start, desc=name, dynamic_ncols=True, file=sys.stderr,
                            mininterval=1.0, smoothing=0.05)

    def seconds_per_step(self, done: int) -> float:
        trained = time.perf_counter() - self.t0 - self.paused_s
        return trained / max(done - self.plan.start, 1)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """A block whose time is no training time (grids, evaluations, checkpoints)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.paused_s += spent
            if self.bar is not None:  # the bar's rate and ETA: as if the block took no time
                self.bar.start_t += spent
                self.bar.last_print_t += spent

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def status(self, done: int, metrics: dict[str, float]) -> str:
        """The status line of step ``done``."""
        from dmd2.runtime.progress import clock

        per_step = self.seconds_per_step(done)
        losses = " ".join(f"{k.split('/')[-1]} {metrics[k]:<8.4f}" for k in loss_keys(metrics, self.key))
        return (f"[{self.name}] step {done:>{len(str(self.plan.steps))}}/{self.plan.steps} "
                f"kimg {done * self.plan.global_batch / 1000:<9.3f} s/step {per_step:<7.3f} "
                f"eta {clock(per_step * (self.plan.steps - done)):<8} {losses} {memory_text(self.device)}")

    def log(self, done: int, metrics: dict[str, float]) -> None:
        """At a logging step: the status line (stdout and train.log without a bar; train.log only, and the bar's
        loss, with one)."""
        if not self.enabled:
            return
        line = self.status(done, metrics)
        if self.bar is None:
            log.info(line)
            return
        log.info(line, extra={"file_only": True})
        self.bar.set_postfix({self.key.split("/")[-1]: f"{metrics.get(self.key, float('nan')):.4f}"})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_loop(cfg: Any, ctx: RunContext, stage: Stage, loader: Iterable[Any], plan: Plan,
               evaluator: TrainingEvaluator) -> dict[str, Any]:
    """Run ``stage`` from ``plan.start`` to ``plan.steps`` and write its final checkpoint. Returns the run's result
    (``run_result``)."""
    # the last logged value of every scalar, kept in checkpoints: a resumed run (even one resumed after its end)
    # returns the run's final metrics, not only those of its own steps
    last: dict[str, float] = dict(ctx.resume.get("metrics") or {}) if ctx.resume is not None else {}

    def checkpoint(step: int) -> dict[str, Any]:
        return run_state(ctx, step, **stage.state(), evaluation=evaluator.state_dict(), metrics=dict(last))

    if plan.start == 0 and stage.evaluate_first:  # the starting point (a distillation: the teacher's one step)
        if ctx.dist.is_main:
            stage.log_grids(0)
        if evaluator.enabled:
            evaluator(stage.sampler(0), 0)
    ctx.logger.start()  # config.yaml, metrics.jsonl, W&B: every check has passed
    restore_rng(ctx)
    batches = iter(loader)
    steps = plan.steps
    window = LogWindow()
    shown = TrainingProgress(cfg.get("progress", "auto"), plan, stage.name, stage.progress_key, ctx.device,
                             ctx.dist.is_main)
    with bar_safe_logging() if shown.bar is not None else nullcontext():
        for step in range(plan.start, steps):  # one step: this rank's micro-batch of each accumulation round
            window.add(stage.step([next(batches) for _ in range(plan.rounds)], step), plan.global_batch)
            done = step + 1
            shown.step()
            if done % cfg.log_every == 0 or done == steps:
                log_window(ctx, stage, window, plan, step, last, shown)
            with shown.paused():  # grids, evaluations and checkpoints: not counted in s/step and the ETA
                if ctx.dist.is_main and ((cfg.sample_every and done % cfg.sample_every == 0) or done == steps):
                    stage.log_grids(done)
                if evaluator.due(done, steps):
                    evaluator(stage.sampler(done), done)
                if done % cfg.save_every == 0 and done != steps:
                    save_periodic(checkpoint(done), ctx.output_dir, stage.prefix, done, cfg.keep_last, ctx.dist)
            if ctx.stop_requested() and done != steps:  # SIGTERM / SIGINT / SIGUSR1: save this step, then exit
                shown.close()
                ctx.stop(checkpoint(done), stage.prefix, done)
    shown.close()
    path = os.path.join(ctx.output_dir, f"{stage.prefix}_final.pt")
    check_trained(stage.updaters, stage.networks, path)  # every update skipped, or non-finite weights: no final
    path = save_final(checkpoint(steps), path, ctx.dist)
    if ctx.dist.is_main:
        stage.publish(path, steps)
    ctx.say(f"[{stage.name}] done: {path}")
    return run_result(path, steps, last, evaluator)


def log_window(ctx: RunContext, stage: Stage, window: LogWindow, plan: Plan, step: int, last: dict[str, float],
               shown: TrainingProgress) -> None:
    """At a logging step: the window's scalars (metrics.jsonl, W&B) and histograms, and the status line."""
    done = step + 1
    means, vectors, rate = window.close(ctx)
    own = dict(zip(LOOP_KEYS, (rate, step // plan.steps_per_epoch, plan.global_batch,
                               done * plan.global_batch / 1000)))
    metrics = {**means, **stage.scalars(step), **own}
    ctx.logger.log(metrics, step=done)
    last.update(metrics)
    for key, values in vectors.items():
        ctx.logger.log_histogram(key, values, step=done)
    shown.log(done, metrics)


def run_result(checkpoint: str, steps: int, metrics: dict[str, float], evaluator: TrainingEvaluator
               ) -> dict[str, Any]:
    """What a stage returns: the final checkpoint, the last logged metrics with the evaluation's last and best
    values, and ``objective_key``, the metric a sweeper minimises by default: the best FID / FD when
    ``eval_every`` > 0, else None (a loss is an objective only when optimized_metric names it)."""
    evaluated = evaluator.results()
    key = f"{evaluator.key}_best" if evaluated else None  # no evaluation, no default objective (train.objective)
    return {"checkpoint": checkpoint, "steps": steps, "metrics": {**metrics, **evaluated}, "objective_key": key}
