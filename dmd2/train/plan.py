"""A run's schedule in words, printed at its start: steps, epochs, the global batch (processes, accumulation
rounds, kimg), warm-up, evaluation, checkpoints, grids.

``describe_schedule`` is pure (numbers in, text and warnings out); ``log_schedule`` reads them from a training
config and logs them (rank 0).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _every(every: int, what: str, steps: int, start_too: bool = False) -> str:
    """``what`` happens every ``every`` steps and after the last one (and at step 0 when ``start_too``)."""
    at_start = "at step 0, " if start_too else ""
    count = (steps - 1) // every + 1 + int(start_too)
    if every >= steps:
        return f"{what}: {at_start}at the end only ({count} in all; the interval {every} >= {steps} steps)"
    return f"{what}: {at_start}every {every} steps and at the end ({count} in all)"


def describe_batch(batch_size: int, world_size: int, rounds: int, steps: int) -> str:
    """The global batch of a step, how it is made, and the images a run of ``steps`` steps sees."""
    made = f"batch_size {batch_size} x {world_size} process{'es' if world_size > 1 else ''}"
    made += f" x {rounds} accumulation rounds" if rounds > 1 else ""
    global_batch = batch_size * world_size * rounds
    return f"  batch: global batch {global_batch} = {made}; {steps * global_batch / 1000:.6g} kimg in all"


def describe_schedule(stage: str, steps: int, steps_per_epoch: int, start: int, warmup_steps: int,
                      eval_every: int, save_every: int, sample_every: int, batch: str = "") -> tuple[str, list[str]]:
    """The schedule of a run of ``steps`` training steps (``steps_per_epoch`` per pass over the data, resumed at
    ``start``): (one line per item, warnings). Intervals as the runners apply them: the learning rate ramps up
    over iterations 0 .. warmup_steps - 1; evaluation (eval_every > 0; distill: also at step 0), checkpoints and
    sample grids (sample_every > 0) every N steps and at the end; ``batch`` (``describe_batch``) is the second
    line when given."""
    epochs = steps / steps_per_epoch if steps_per_epoch else 0.0
    lines = [f"[{stage}] schedule: {steps} steps = {epochs:.4g} epochs of {steps_per_epoch} steps"
             + (f", resuming at step {start}" if start else "")]
    if batch:
        lines.append(batch)
    warnings = []
    if warmup_steps == 0:
        lines.append("  warm-up: none (full learning rate from step 0)")
    else:
        lines.append(f"  warm-up: linear over steps 0-{warmup_steps - 1}, full learning rate from step {warmup_steps}")
        if warmup_steps > steps:
            reached = steps / warmup_steps
            warnings.append(f"[{stage}] warmup_steps = {warmup_steps} is longer than the run ({steps} steps): the "
                            f"learning rate ends at {reached:.0%} of its value and never reaches it")
    lines.append("  " + (_every(eval_every, "evaluation", steps, start_too=stage == "distill") if eval_every > 0
                         else "evaluation: off (eval_every=0)"))
    lines.append("  " + _every(save_every, "checkpoints", steps))
    lines.append("  " + (_every(sample_every, "sample grids", steps) if sample_every > 0
                         else "sample grids: at the end only (sample_every=0)"))
    return "\n".join(lines), warnings


def log_schedule(cfg: Any, steps: int, steps_per_epoch: int, start: int, is_main: bool, world_size: int = 1,
                 rounds: int = 1) -> None:
    """Log the schedule of training config ``cfg`` (INFO) and its warnings (WARNING), on rank 0 only."""
    if not is_main:
        return
    batch_size = getattr(cfg, "batch_size", None)  # a config without it: no batch line
    batch = describe_batch(batch_size, world_size, rounds, steps) if batch_size else ""
    text, warnings = describe_schedule(cfg.stage, steps, steps_per_epoch, start, cfg.warmup_steps, cfg.eval_every,
                                       cfg.save_every, cfg.sample_every, batch)
    log.info(text)
    for warning in warnings:
        log.warning(f"WARNING: {warning}")
