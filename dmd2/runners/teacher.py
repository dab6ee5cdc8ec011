"""Stage 1: train the class-conditional EDM teacher.

One step: draw sigma (ln sigma ~ N(p_mean, p_std^2)), noise the batch, EDM-weighted denoising loss,
AdamW with warm-up and gradient clipping, then an EMA update. The EMA weights are what
distillation loads. Checkpoints: teacher_NNNNNN.pt every ``save_every`` steps and teacher_final.pt.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from omegaconf import DictConfig

from dmd2.data import build_batches, build_dataset, random_hflip
from dmd2.diffusion import denoising_loss, edm_sigma, heun_nfe, heun_sample, heun_sampler_sigmas
from dmd2.distributed import mean_across_ranks, wrap
from dmd2.networks import EDMPrecond, build_denoiser, count_parameters
from dmd2.optim import EMA, Updater, adamw, ema_decay_at
from dmd2.runners.common import (
    RunContext, RunningMeans, autocast, grid_labels, progress, restore_rng, run_result, run_state, run_with_logger,
    save_final, save_periodic, start_run, to_grid, total_steps,
)
from dmd2.sampling import CheckpointSampler
from dmd2.speed import fused_adamw, prepare_network
from dmd2.training_eval import TrainingEvaluator


def teacher_state(cfg: DictConfig, ctx: RunContext, model: EDMPrecond, ema: EDMPrecond, upd: Updater,
                  evaluator: TrainingEvaluator, step: int) -> dict[str, Any]:
    return run_state(
        ctx, step, kind="teacher", arch=ctx.config["arch"], num_classes=cfg.data.num_classes,
        resolution=cfg.data.resolution, sigma_data=cfg.sigma_data, model=model.state_dict(), ema=ema.state_dict(),
        updater=upd.state_dict(), evaluation=evaluator.state_dict(),
    )


@torch.no_grad()
def sample_grid(ema: EDMPrecond, noise: torch.Tensor, labels: torch.Tensor, steps: int, per_class: int) -> torch.Tensor:
    """Heun samples of the EMA teacher from fixed noise/labels, as a grid with one class per row."""
    return to_grid(heun_sample(ema, noise, labels, heun_sampler_sigmas(steps).to(noise.device)), per_class)


def run(cfg: DictConfig) -> dict[str, Any]:
    ctx = start_run(cfg, job_type="teacher", prefix="teacher")
    return run_with_logger(ctx, lambda: train_teacher(cfg, ctx))


def train_teacher(cfg: DictConfig, ctx: RunContext) -> dict[str, Any]:
    device = ctx.device
    evaluator = TrainingEvaluator(cfg, device, ctx.dist, ctx.logger)  # a missing feature network fails here
    dataset = build_dataset(cfg.data)
    model = build_denoiser(cfg.arch, cfg.data.num_classes, cfg.data.resolution, cfg.sigma_data).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    prepare_network(model, cfg.perf)  # channels-last / torch.compile (after the EMA copy: it stays eager)
    opt = adamw(model.parameters(), cfg.lr, cfg.adam_betas, cfg.weight_decay, fused_adamw(cfg.perf.fused_adamw, device))
    upd = Updater("loss", list(model.parameters()), opt, cfg.lr, cfg.warmup_steps, cfg.grad_clip, cfg.on_nonfinite,
                  EMA(ema, model, lambda step: ema_decay_at(step, cfg.ema_decay)))
    net = wrap(model, ctx.dist, device)  # DistributedDataParallel under torchrun: gradients averaged over ranks
    start = 0
    if ctx.resume is not None:
        model.load_state_dict(ctx.resume["model"])
        ema.load_state_dict(ctx.resume["ema"])
        upd.load_state_dict(ctx.resume.get("updater") or ctx.resume["optimizer"])
        evaluator.load_state_dict(ctx.resume.get("evaluation"))
        start = int(ctx.resume["step"])
    world = ctx.dist.world_size
    loader = build_batches(dataset, cfg.batch_size, cfg.seed, device, cfg.perf, cfg.data.num_workers, start,
                           ctx.dist.rank, world)
    steps_per_epoch = len(dataset) // (cfg.batch_size * world)
    steps = total_steps(cfg.num_epochs, steps_per_epoch, cfg.max_steps)
    ctx.say(f"[teacher] {count_parameters(model) / 1e6:.2f}M parameters, {len(dataset)} images, {steps} steps of "
            f"global batch {cfg.batch_size * world} on {device} (from step {start}); writing to {ctx.output_dir}")

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 12345)  # fixed grid noise, independent of training
    grid_y = grid_labels(cfg.data.num_classes, cfg.samples_per_class, device)
    grid_z = torch.randn(len(grid_y), 3, cfg.data.resolution, cfg.data.resolution, generator=gen).to(device)

    restore_rng(ctx)
    batches = iter(loader)
    bar = progress(steps, "teacher", ctx)
    bar.update(start)
    t_last, images_since, window = time.perf_counter(), 0, RunningMeans()
    last: dict[str, float] = {}  # the last logged value of every scalar
    for step in range(start, steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.data.hflip:
            x = random_hflip(x, ctx.rng)
        sigma = edm_sigma(ctx.rng.randn(x.shape[0]), cfg.p_mean, cfg.p_std)
        with autocast(device, cfg.precision):
            loss = denoising_loss(net, x, sigma, y, ctx.rng.randn(*x.shape), cfg.sigma_data)
        gnorm = upd.update(loss, step)  # None: a skipped update (on_nonfinite=skip)
        if gnorm is None:
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
            grid = sample_grid(ema, grid_z, grid_y, cfg.sample_steps, cfg.samples_per_class)
            ctx.logger.log_grid("samples/teacher_ema", grid, done, f"EMA, Heun {heun_nfe(cfg.sample_steps)} NFE")
        if evaluator.due(done, steps):
            evaluator(CheckpointSampler("teacher", ema, done, cfg.data.num_classes, cfg.data.resolution,
                                        heun_nfe(cfg.eval.sampler_steps), cfg.eval.sampler_steps), done)
        if done % cfg.save_every == 0 and done != steps:
            save_periodic(ctx, teacher_state(cfg, ctx, model, ema, upd, evaluator, done), "teacher", done,
                          cfg.keep_last)
    bar.close()
    path = save_final(ctx, teacher_state(cfg, ctx, model, ema, upd, evaluator, steps), "teacher_final.pt")
    ctx.say(f"[teacher] done: {path}")
    return run_result(path, steps, last, evaluator, "train/loss")
