"""Stage 1: train the class-conditional EDM teacher.

One step (``teacher_step``): draw sigma (ln sigma ~ N(p_mean, p_std^2)), noise the batch, EDM-weighted
denoising loss, AdamW with warm-up and gradient clipping, then an EMA update (dmd2.train.optim.Updater). The EMA weights are what
distillation loads. Checkpoints: teacher_NNNNNN.pt every ``save_every`` steps and teacher_final.pt.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dmd2.data.batches import build_batches, random_hflip, total_steps
from dmd2.data.datasets import build_dataset
from dmd2.io.checkpoint import save_final, save_periodic
from dmd2.io.sampler import CheckpointSampler, grid_labels
from dmd2.io.weights import build_denoiser
from dmd2.method.edm import edm_sigma
from dmd2.method.losses import denoising_loss
from dmd2.method.randomness import GRID_NOISE_OFFSET, BatchRNG, generator
from dmd2.method.samplers import heun_nfe, heun_sample, heun_sampler_sigmas
from dmd2.networks import count_parameters
from dmd2.networks.precond import EDMPrecond
from dmd2.runtime.distributed import mean_across_ranks, wrap
from dmd2.runtime.perf import autocast, fused_adamw, prepare_network
from dmd2.train.context import RunContext, progress, restore_rng, run_context, run_result, run_state
from dmd2.train.evaluator import TrainingEvaluator
from dmd2.train.logger import RunningMeans
from dmd2.train.optim import EMA, Updater, adamw, check_trained, ema_decay_at
from dmd2.train.plan import log_schedule


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
    if s.hflip:
        x = random_hflip(x, s.rng)
    sigma = edm_sigma(s.rng.randn(x.shape[0]), s.p_mean, s.p_std)
    with s.amp():
        loss = denoising_loss(s.net, x, sigma, y, s.rng.randn(*x.shape), s.sigma_data)
    return loss, s.updater.update(loss, step)


def teacher_state(cfg: DictConfig, ctx: RunContext, model: EDMPrecond, ema: EDMPrecond, upd: Updater,
                  evaluator: TrainingEvaluator, step: int, class_names: list[str] | None,
                  metrics: dict[str, float]) -> dict[str, Any]:
    return run_state(
        ctx, step, kind="teacher", arch=ctx.config["arch"], num_classes=cfg.data.num_classes,
        resolution=cfg.data.resolution, sigma_data=cfg.sigma_data, class_names=class_names,
        model=model.state_dict(), ema=ema.state_dict(),
        updater=upd.state_dict(), evaluation=evaluator.state_dict(), metrics=dict(metrics),
    )


@torch.no_grad()
def teacher_samples(ema: EDMPrecond, noise: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
    """Heun samples [B,3,R,R] in [-1, 1] of the EMA teacher from fixed noise [B,3,R,R] and labels [B]."""
    return heun_sample(ema, noise, labels, heun_sampler_sigmas(steps).to(noise.device))


def run(cfg: DictConfig) -> dict[str, Any]:
    with run_context(cfg, job_type="teacher", prefix="teacher") as ctx:
        return train_teacher(cfg, ctx)


def train_teacher(cfg: DictConfig, ctx: RunContext) -> dict[str, Any]:
    device = ctx.device
    evaluator = TrainingEvaluator(cfg, device, ctx.dist, ctx.logger)  # a missing feature network fails here
    dataset = build_dataset(cfg.data)
    classes = dataset.class_names  # stored in checkpoints: generate.py and exports name their classes
    model = build_denoiser(cfg.arch, cfg.data.num_classes, cfg.data.resolution, cfg.sigma_data).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    prepare_network(model, cfg.perf)  # channels-last / torch.compile (after the EMA copy: it stays eager)
    opt = adamw(model.parameters(), cfg.lr, cfg.adam_betas, cfg.weight_decay, fused_adamw(cfg.perf.fused_adamw, device))
    upd = Updater("loss", list(model.parameters()), opt, cfg.lr, cfg.warmup_steps, cfg.grad_clip, cfg.on_nonfinite,
                  EMA(ema, model, lambda step: ema_decay_at(step, cfg.ema_decay)))
    start = 0
    if ctx.resume is not None:
        model.load_state_dict(ctx.resume["model"])
        ema.load_state_dict(ctx.resume["ema"])
        upd.load_state_dict(ctx.resume.get("updater") or ctx.resume["optimizer"])
        evaluator.load_state_dict(ctx.resume.get("evaluation"))
        start = int(ctx.resume["step"])
    # under torchrun the denoiser runs inside DistributedDataParallel (gradients averaged over ranks)
    s = TeacherState(wrap(model, ctx.dist, device), upd, ctx.rng, partial(autocast, device, cfg.precision),
                     cfg.p_mean, cfg.p_std, cfg.sigma_data, cfg.data.hflip)
    world = ctx.dist.world_size
    loader = build_batches(dataset, cfg.batch_size, cfg.seed, device, cfg.perf, cfg.data.num_workers, start,
                           ctx.dist.rank, world)
    steps_per_epoch = len(dataset) // (cfg.batch_size * world)
    steps = total_steps(cfg.num_epochs, steps_per_epoch, cfg.max_steps)
    log_schedule(cfg, steps, steps_per_epoch, start, ctx.dist.is_main)
    ctx.say(f"[teacher] {count_parameters(model) / 1e6:.2f}M parameters, {len(dataset)} images, {steps} steps of "
            f"global batch {cfg.batch_size * world} on {device} (from step {start}); writing to {ctx.output_dir}")

    gen = generator(cfg.seed + GRID_NOISE_OFFSET)  # fixed grid noise, independent of training
    grid_y = grid_labels(cfg.data.num_classes, cfg.samples_per_class, device)
    grid_z = torch.randn(len(grid_y), 3, cfg.data.resolution, cfg.data.resolution, generator=gen).to(device)

    # the last logged value of every scalar, kept in checkpoints: a resumed run (even one resumed after its end)
    # returns the run's final metrics, not only those of its own steps
    last: dict[str, float] = dict(ctx.resume.get("metrics") or {}) if ctx.resume is not None else {}

    def checkpoint(step: int) -> dict[str, Any]:
        return teacher_state(cfg, ctx, model, ema, upd, evaluator, step, classes, last)

    ctx.logger.start()  # config.yaml, metrics.jsonl, W&B: every check has passed
    restore_rng(ctx)
    batches = iter(loader)
    bar = progress(steps, "teacher", ctx)
    bar.update(start)
    t_last, images_since, window = time.perf_counter(), 0, RunningMeans()
    for step in range(start, steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, gnorm = teacher_step(s, x, y, step)
        if gnorm is None:  # a skipped update (on_nonfinite=skip)
            gnorm = torch.tensor(float("nan"))

        done = step + 1
        images_since += x.shape[0] * world
        window.add({"train/loss": loss})
        bar.update(1)
        if done % cfg.log_every == 0 or done == steps:
            now = time.perf_counter()
            metrics = mean_across_ranks(window.pop(), ctx.dist)
            metrics.update({"train/lr": upd.lr_at(step), "train/grad_norm": gnorm.item(),
                            "train/images_per_sec": images_since / (now - t_last),
                            "train/epoch": step // steps_per_epoch, "train/skipped_steps": upd.skipped,
                            "train/global_batch_size": cfg.batch_size * world})
            ctx.logger.log(metrics, step=done)
            last.update(metrics)
            bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}")
            t_last, images_since = now, 0
        if ctx.dist.is_main and ((cfg.sample_every and done % cfg.sample_every == 0) or done == steps):
            ctx.logger.log_samples("samples/teacher_ema", teacher_samples(ema, grid_z, grid_y, cfg.sample_steps),
                                   grid_y, classes, cfg.samples_per_class, done,
                                   f"EMA, Heun {heun_nfe(cfg.sample_steps)} NFE")
        if evaluator.due(done, steps):
            evaluator(CheckpointSampler("teacher", ema, done, cfg.data.num_classes, cfg.data.resolution,
                                        heun_nfe(cfg.eval.sampler_steps), cfg.eval.sampler_steps), done)
        if done % cfg.save_every == 0 and done != steps:
            save_periodic(checkpoint(done), ctx.output_dir, "teacher", done, cfg.keep_last, ctx.dist)
        if ctx.stop_requested() and done != steps:  # SIGTERM / SIGINT / SIGUSR1: save this step, then exit
            ctx.stop(checkpoint(done), "teacher", done)
    bar.close()
    path = os.path.join(ctx.output_dir, "teacher_final.pt")
    check_trained({"teacher": upd}, {"teacher": model, "teacher EMA": ema}, path)
    path = save_final(checkpoint(steps), path, ctx.dist)
    if ctx.dist.is_main:
        ctx.logger.log_artifact(path, "teacher", steps)
    ctx.say(f"[teacher] done: {path}")
    return run_result(path, steps, last, evaluator, "train/loss")
