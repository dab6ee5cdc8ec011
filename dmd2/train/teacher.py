"""Stage 1: train the class-conditional EDM teacher.

One step (``teacher_rounds``; ``teacher_step`` on one batch): per accumulation round draw sigma (ln sigma ~
N(p_mean, p_std^2)), noise the batch, EDM-weighted denoising loss, backward; then AdamW with warm-up and gradient
clipping, then an EMA update (dmd2.train.optim.Updater). The EMA weights are what distillation loads. Checkpoints: teacher_NNNNNN.pt every ``save_every`` steps and teacher_final.pt.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dmd2.data.batches import random_hflip
from dmd2.data.datasets import build_dataset
from dmd2.io.sampler import CheckpointSampler
from dmd2.io.weights import build_denoiser
from dmd2.method.edm import edm_sigma
from dmd2.method.losses import denoising_loss
from dmd2.method.randomness import BatchRNG
from dmd2.method.samplers import heun_nfe
from dmd2.networks import count_parameters
from dmd2.networks.precond import EDMPrecond
from dmd2.runtime.distributed import synced, wrap
from dmd2.runtime.perf import autocast, fused_adamw, prepare_network
from dmd2.train.context import RunContext, run_context
from dmd2.train.evaluator import TrainingEvaluator
from dmd2.train.grids import SampleGrids
from dmd2.train.loop import plan_batches, train_loop
from dmd2.train.optim import EMA, Updater, adamw, ema_decay_at, lr_schedule, plan_schedules


@dataclass
class TeacherState:
    """Everything a teacher step reads or updates."""

    net: nn.Module                 # the denoiser as called (inside DDP under torchrun)
    updater: Updater               # AdamW, warm-up, clipping, non-finite policy and the EMA
    rng: BatchRNG                  # every random draw of the batch
    amp: Callable[[], Any]         # a fresh autocast context (bf16 on CUDA) or a null one
    p_mean: float                  # ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float
    sigma_data: float
    hflip: bool                    # random horizontal flips of the batch


def teacher_step(s: TeacherState, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor | None]:
    """One update on images x [B,C,H,W] in [-1, 1] with labels y [B]: (flip,) draw sigma, EDM denoising loss,
    update (+ EMA). Returns the loss and the gradient norm (None when the update was skipped)."""
    return teacher_rounds(s, [(x, y)], step)


def teacher_rounds(s: TeacherState, batches: list[tuple[Tensor, Tensor]], step: int
                   ) -> tuple[Tensor, Tensor | None]:
    """One update accumulated over the micro-batches ``batches`` (one per round, this rank's slices of the global
    batch): per round (flip,) draw sigma, EDM denoising loss, backward of loss / rounds (DDP all-reduces on the
    last round only); then one optimizer step (+ EMA). Returns the loss (the rounds' mean) and the gradient norm
    (None when the update was skipped)."""
    rounds, losses = len(batches), []
    for r in s.rng.rounds(rounds):
        x, y = batches[r]
        if s.hflip:
            x = random_hflip(x, s.rng)
        sigma = edm_sigma(s.rng.randn(x.shape[0]), s.p_mean, s.p_std)
        with synced(s.net, r == rounds - 1):
            with s.amp():
                loss = denoising_loss(s.net, x, sigma, y, s.rng.randn(*x.shape), s.sigma_data)
            s.updater.accumulate(loss, rounds)
        losses.append(loss)
    loss = losses[0] if rounds == 1 else torch.stack([v.detach() for v in losses]).mean()
    return loss, s.updater.step(step)


@dataclass
class TeacherStage:
    """The teacher stage for the training loop (dmd2/train/loop.py)."""

    s: TeacherState
    model: EDMPrecond              # the trained denoiser (unwrapped)
    ema: EDMPrecond                # its EMA: what distillation, generate.py and evaluations use
    grids: SampleGrids
    ctx: RunContext
    cfg: DictConfig
    name: str = "teacher"
    prefix: str = "teacher"
    progress_key: str = "train/loss"
    evaluate_first: bool = False   # a teacher at step 0 is noise

    @property
    def updaters(self) -> dict[str, Updater]:
        return {"teacher": self.s.updater}

    @property
    def networks(self) -> dict[str, nn.Module]:
        return {"teacher": self.model, "teacher EMA": self.ema}

    def step(self, batches: list[tuple[Tensor, Tensor]], step: int) -> dict[str, Tensor]:
        moved = [tuple(t.to(self.ctx.device, non_blocking=True) for t in batch) for batch in batches]
        loss, gnorm = teacher_rounds(self.s, moved, step)  # type: ignore[arg-type]
        return {"loss": loss} if gnorm is None else {"loss": loss, "grad_norm": gnorm}  # None: a skipped update

    def scalars(self, step: int) -> dict[str, float]:
        return {"train/lr": self.s.updater.lr_at(step), "train/skipped_steps": self.s.updater.skipped}

    @staticmethod
    def metric_keys() -> list[str]:
        """The train/ scalars a teacher run logs: its steps' logs and ``scalars``."""
        return ["train/loss", "train/grad_norm", "train/lr", "train/skipped_steps"]

    def state(self) -> dict[str, Any]:
        cfg = self.cfg
        return dict(kind="teacher", arch=self.ctx.config["arch"], num_classes=cfg.data.num_classes,
                    resolution=cfg.data.resolution, sigma_data=cfg.sigma_data, class_names=self.grids.classes,
                    model=self.model.state_dict(), ema=self.ema.state_dict(), updater=self.s.updater.state_dict())

    def log_grids(self, step: int) -> None:
        self.grids.log_teacher(self.ctx.logger, "samples/teacher_ema", self.ema, self.cfg.sample_steps, step, "EMA")

    def sampler(self, step: int) -> CheckpointSampler:
        data, steps = self.cfg.data, self.cfg.eval.sampler_steps
        return CheckpointSampler("teacher", self.ema, step, data.num_classes, data.resolution, heun_nfe(steps), steps)

    def publish(self, path: str, steps: int) -> None:
        self.ctx.logger.log_artifact(path, "teacher", steps)


def run(cfg: DictConfig) -> dict[str, Any]:
    with run_context(cfg, job_type="teacher", prefix="teacher") as ctx:
        return train_teacher(cfg, ctx)


def train_teacher(cfg: DictConfig, ctx: RunContext) -> dict[str, Any]:
    device = ctx.device
    evaluator = TrainingEvaluator(cfg, device, ctx.dist, ctx.logger)  # a missing feature network fails here
    dataset = build_dataset(cfg.data)
    model = build_denoiser(cfg.arch, cfg.data.num_classes, cfg.data.resolution, cfg.sigma_data).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    prepare_network(model, cfg.perf)  # channels-last / torch.compile (after the EMA copy: it stays eager)
    opt = adamw(model.parameters(), cfg.lr, cfg.adam_betas, cfg.weight_decay, fused_adamw(cfg.perf.fused_adamw, device))
    upd = Updater("loss", list(model.parameters()), opt, cfg.lr, lr_schedule(cfg), cfg.grad_clip, cfg.on_nonfinite,
                  EMA(ema, model, lambda step: ema_decay_at(step, cfg.ema_decay)))
    start = 0
    if ctx.resume is not None:
        model.load_state_dict(ctx.resume["model"])
        ema.load_state_dict(ctx.resume["ema"])
        upd.load_state_dict(ctx.resume["updater"])
        evaluator.load_state_dict(ctx.resume["evaluation"])
        start = int(ctx.resume["step"])
    # under torchrun the denoiser runs inside DistributedDataParallel (gradients averaged over ranks)
    s = TeacherState(wrap(model, ctx.dist, device), upd, ctx.rng, partial(autocast, device, cfg.precision),
                     cfg.p_mean, cfg.p_std, cfg.sigma_data, cfg.data.hflip)
    loader, plan = plan_batches(cfg, ctx, dataset, start)
    plan_schedules([upd], plan.steps)  # a learning-rate decay ends at the run's last iteration
    ctx.say(f"[teacher] {count_parameters(model) / 1e6:.2f}M parameters, {len(dataset)} images, {plan.steps} steps "
            f"of global batch {plan.global_batch} on {device} (from step {start}); writing to {ctx.output_dir}")
    # class names are stored in checkpoints: generate.py and exports name their classes
    grids = SampleGrids(cfg.seed, cfg.data.num_classes, cfg.data.resolution, cfg.samples_per_class, 1,
                        dataset.class_names, device)
    return train_loop(cfg, ctx, TeacherStage(s, model, ema, grids, ctx, cfg), loader, plan, evaluator)
