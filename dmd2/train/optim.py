"""Optimisation of one trained network, the same for both stages: AdamW, a learning-rate warm-up counted in
training iterations (and an optional decay), gradient clipping, the non-finite policy and an optional EMA of the weights.

``Updater.update(loss, step)`` is the one optimizer step of this project: ``accumulate(loss, rounds)`` (backward of
loss / rounds, gradients summed over the rounds of an iteration) then ``step(step)``. A skipped update (``on_nonfinite=skip``)
leaves the weights, the optimizer state and the EMA untouched and is counted in ``Updater.skipped``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from dmd2.config.errors import TrainingFailed
from dmd2.runtime.distributed import global_mean

log = logging.getLogger(__name__)


def adamw(params: Any, lr: float, betas: Any, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW, with its fused kernel when ``fused`` (else the multi-tensor one)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                             **({"fused": True} if fused else {}))


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """Learning rate of training iteration ``step`` (0-based): a linear ramp from base_lr / warmup_steps over
    ``warmup_steps`` iterations, then constant. A function of the iteration, not of the number of updates, so
    a generator updated every N-th iteration ends its warm-up at the same iteration as the fake score network
    (as the official DMD2 schedulers, which step every iteration)."""
    return base_lr * min(1.0, (step + 1) / max(1, warmup_steps))


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate as a function of the training iteration: ``warmup_lr``'s linear warm-up, then constant
    (``decay`` "none") or decayed to ``final`` x the base rate at the last iteration ``total_steps - 1`` along a
    half cosine ("cosine") or a line ("linear"). A pure function of the iteration (a resumed run continues it)."""

    warmup_steps: int = 0
    decay: str = "none"      # none | cosine | linear
    final: float = 0.0       # the rate at the last iteration, as a fraction of the base rate
    total_steps: int = 0     # the run's length in iterations (0: unknown, no decay)

    def lr(self, base_lr: float, step: int) -> float:
        rate = warmup_lr(base_lr, step, self.warmup_steps)
        span = self.total_steps - 1 - self.warmup_steps
        if self.decay == "none" or span <= 0 or step <= self.warmup_steps:
            return rate
        t = min(1.0, (step - self.warmup_steps) / span)  # 0 at the end of the warm-up, 1 at the last iteration
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if self.decay == "cosine" else 1.0 - t
        return rate * (self.final + (1.0 - self.final) * shape)


def lr_schedule(cfg: Any) -> LRSchedule:
    """The learning-rate schedule of a stage's settings (warmup_steps, lr_decay, lr_final); its length is set
    by ``plan_schedules`` once the run's steps are known."""
    return LRSchedule(cfg.warmup_steps, cfg.lr_decay, cfg.lr_final)


def plan_schedules(updaters: Any, total_steps: int) -> None:
    """Give each updater's schedule the run's length (known once its batches are planned)."""
    for upd in updaters:
        upd.schedule = replace(upd.schedule, total_steps=total_steps)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter-wise; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up as min(decay, (1 + n) / (10 + n)), n the updates so far, so that short runs do not keep
    the initial weights (a fixed decay d still holds d^n of them after n updates: 0.99^156 = 21 %)."""
    return min(decay, (1 + step) / (10 + step))


def grad_norm(parameters: Any, clip: float | None) -> Tensor:
    """Global gradient norm before clipping (clipped to ``clip`` when it is set)."""
    params = [p for p in parameters if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm became NaN or infinite."""


def is_finite(step: int, policy: str, **values: Tensor) -> bool:
    """True if every named (scalar) value is finite; one host read for all of them. Otherwise ``policy`` "stop"
    raises NonFiniteError naming the step and the term (the last checkpoint stays as it was); "skip" warns and
    returns False (skip this update)."""
    if bool(torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in values.values()])).all()):
        return True
    for name, value in values.items():
        if not torch.isfinite(value).all():
            message = f"non-finite {name} ({value.item()}) at step {step}"
            if policy == "skip":
                log.warning(f"[train] WARNING: {message}; skipping this update (on_nonfinite=skip)")
                return False
            raise NonFiniteError(f"{message}; stopping. The last checkpoint is intact; try a lower learning rate, "
                                 "a smaller grad_clip, or on_nonfinite=skip")
    return True


@dataclass
class EMA:
    """An EMA copy ``ema`` of ``model``, updated with ``decay(step)`` after every applied update."""

    ema: nn.Module
    model: nn.Module
    decay: Callable[[int], float]


@dataclass
class Updater:
    """One network's optimisation: what ``update`` steps and how (see the module docstring)."""

    name: str                      # names the loss in errors and warnings, e.g. "generator loss"
    params: list[Tensor]
    optimizer: torch.optim.Optimizer
    lr: float                      # base learning rate (after warm-up)
    schedule: LRSchedule           # warm-up and decay by iteration (its total_steps is set once the run is planned)
    clip: float | None             # max global gradient norm; None = no clipping
    on_nonfinite: str              # "stop" | "skip"
    ema: EMA | None = None
    more_emas: list[EMA] = field(default_factory=list)  # further EMAs of the same model, updated alike
    skipped: int = field(default=0)  # skipped updates of the whole run (kept in checkpoints)
    tried: int = field(default=0)    # updates this process attempted, and applied (not kept: this start only)
    applied: int = field(default=0)
    pending: Tensor | None = field(default=None, repr=False)  # the rounds' loss so far (accumulate), for step

    def accumulate(self, loss: Tensor, rounds: int = 1) -> None:
        """Backpropagate ``loss`` / ``rounds`` of one accumulation round (the first round of an update clears the
        gradients). With one round the loss is backpropagated as it is."""
        if self.pending is None:
            self.optimizer.zero_grad(set_to_none=True)
        part = loss if rounds == 1 else loss / rounds
        part.backward()  # always: under DistributedDataParallel every rank must join the gradient all-reduce
        self.pending = part.detach() if self.pending is None else self.pending + part.detach()

    def lr_at(self, step: int) -> float:
        return self.schedule.lr(self.lr, step)

    def update(self, loss: Tensor, step: int) -> Tensor | None:
        """Backward, clip, AdamW step at the learning rate of iteration ``step``, then the EMAs. Returns the
        gradient norm, or None when the update was skipped (non-finite loss or gradient, ``on_nonfinite=skip``)."""
        self.accumulate(loss)
        return self.step(step)

    def step(self, step: int) -> Tensor | None:
        """Clip, AdamW step on the gradients accumulated since the last step, then the EMA (see ``update``)."""
        if self.pending is None:
            raise RuntimeError(f"{self.name}: step() without accumulate()")
        loss, self.pending = self.pending, None
        self.tried += 1
        gnorm = grad_norm(self.params, self.clip)
        # the loss averaged over ranks and the (already all-reduced) gradient norm: every rank decides alike
        if not is_finite(step, self.on_nonfinite, **{self.name: global_mean(loss), f"{self.name} gradient norm": gnorm}):
            self.skipped += 1
            return None
        for group in self.optimizer.param_groups:  # a group with its own base_lr (a discriminator) warms up alike
            group["lr"] = self.schedule.lr(group.get("base_lr", self.lr), step)
        self.optimizer.step()
        self.applied += 1
        for ema in ([self.ema] if self.ema is not None else []) + self.more_emas:
            ema_update(ema.ema, ema.model, ema.decay(step))
        return gnorm

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state and the skipped-update count (the EMAs' weights are saved by the runner)."""
        return {"optimizer": self.optimizer.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``state_dict()``'s output (older checkpoints' bare optimizer states are upgraded when loaded)."""
        ours = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, hyper in zip(self.optimizer.param_groups, ours):  # the moments resume; the settings are this
            group.update(hyper)                                      # run's (e.g. a changed weight_decay)
        self.skipped = int(state["skipped"])


def round_means(logs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The logs of an iteration's accumulation rounds as one: each scalar's mean over the rounds (equal
    micro-batches: the global batch's mean), each vector's values concatenated. One round: its logs as they are."""
    if len(logs) == 1:
        return logs[0]
    return {k: torch.stack([d[k].detach() for d in logs]).mean() if v.numel() == 1
            else torch.cat([d[k].detach().flatten() for d in logs]) for k, v in logs[0].items()}


def check_trained(updaters: dict[str, Updater], networks: dict[str, nn.Module], final: str) -> None:
    """Before the final checkpoint ``final`` is written: raise TrainingFailed (exit status 5, no final checkpoint)
    when an updater skipped every update it attempted in this run (on_nonfinite=skip), or a network's weights are
    no longer finite (an update that overflowed them: everything after it is skipped, and its samples are NaN)."""
    problems = [f"every one of the {u.tried} {name} updates of this run was skipped (non-finite loss or gradient)"
                for name, u in updaters.items() if u.tried and not u.applied]
    problems += [f"the {name} weights are not finite" for name, net in networks.items()
                 if not all(bool(torch.isfinite(t).all()) for t in net.state_dict().values() if t.is_floating_point())]
    if problems:
        raise TrainingFailed(f"training failed: {'; '.join(problems)}. {os.path.basename(final)} was not written "
                             "(the periodic checkpoints stay as they are); lower the learning rate, or look for the "
                             "step where the losses stopped being finite (metrics.jsonl)")
