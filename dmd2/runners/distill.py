"""Stage 2: DMD2 distillation of a teacher checkpoint into a one-step generator.

Each step: the generator makes x = G(z * 80; 80, c) for a batch of dataset labels c.
- ``generator_step`` (every ``dfake_gen_update_ratio``-th step, counting from step 0): the DM loss on x,
  through the frozen teacher and the fake score network (both without gradient), updates the generator.
- ``fake_score_step`` (every step): the fake score network's denoising loss on detached x.
On the other steps x is made without autograd. The teacher never receives gradients or updates.
Checkpoints: dmd2_NNNNNN.pt every ``save_every`` steps and dmd2_final.pt.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig

from dmd2.checkpoint import load_checkpoint, network_from_checkpoint
from dmd2.config import ConfigError
from dmd2.data import build_dataset, build_loader, infinite_batches
from dmd2.diffusion import heun_nfe
from dmd2.networks import count_parameters
from dmd2.runners.common import (
    RunContext, adamw, check_finite, grad_norm, grid_labels, progress, run_with_logger, save, start_run, to_grid,
    total_steps, warmup_schedule,
)
from dmd2.runners.teacher import sample_grid
from dmd2.unified import UnifiedModel


def load_teacher(cfg: DictConfig) -> tuple[dict[str, Any], torch.nn.Module]:
    """The teacher's EMA denoiser, rebuilt with the architecture stored in its checkpoint."""
    state = load_checkpoint(cfg.teacher_checkpoint, kind="teacher")
    stored = state["arch"]
    requested = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.arch.items()}
    if requested != stored:
        diff = sorted(k for k in set(stored) | set(requested) if stored.get(k) != requested.get(k))
        raise ConfigError(
            f"config key 'arch' contradicts the teacher checkpoint {cfg.teacher_checkpoint} on {diff} "
            f"(checkpoint: { {k: stored.get(k) for k in diff} }); drop the arch overrides to use the teacher's"
        )
    for key in ("num_classes", "resolution"):
        if state[key] != cfg.data[key]:
            raise ConfigError(f"config key 'data.{key}' = {cfg.data[key]} but the teacher was trained with {state[key]}")
    return state, network_from_checkpoint(state, "ema")


def distill_state(cfg: DictConfig, ctx: RunContext, teacher: dict[str, Any], model: UnifiedModel,
                  opts: dict[str, torch.optim.Optimizer], scheds: dict[str, Any], step: int, epoch: int) -> dict[str, Any]:
    return {
        "kind": "dmd2", "step": step, "epoch": epoch, "config": ctx.config,
        "arch": teacher["arch"], "num_classes": teacher["num_classes"], "resolution": teacher["resolution"],
        "sigma_data": teacher.get("sigma_data", 0.5), "conditioning_sigma": float(cfg.conditioning_sigma),
        "teacher_checkpoint": str(cfg.teacher_checkpoint),
        "generator": model.generator.state_dict(), "fake_unet": model.guidance.fake_unet.state_dict(),
        "generator_optimizer": opts["generator"].state_dict(), "guidance_optimizer": opts["guidance"].state_dict(),
        "generator_scheduler": scheds["generator"].state_dict(), "guidance_scheduler": scheds["guidance"].state_dict(),
    }


def generator_step(model: UnifiedModel, opt: torch.optim.Optimizer, sched: Any, z: torch.Tensor, y: torch.Tensor,
                   clip: float | None, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Update the generator with the DM loss; return its (detached) samples and the logs."""
    x = model.generate(z, y)
    loss, logs = model.generator_loss(x, y)
    check_finite(step, loss_dm=loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = grad_norm(model.generator.parameters(), clip)
    check_finite(step, generator_grad_norm=gnorm)
    opt.step()
    sched.step()
    return x.detach(), {"loss_dm": loss.detach(), "generator_grad_norm": gnorm, **logs}


def fake_score_step(model: UnifiedModel, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor, y: torch.Tensor,
                    clip: float | None, step: int) -> dict[str, torch.Tensor]:
    """Update the fake score network with its denoising loss on detached generator samples."""
    loss = model.guidance_loss(x, y)
    check_finite(step, loss_fake=loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = grad_norm(model.guidance.fake_unet.parameters(), clip)
    check_finite(step, guidance_grad_norm=gnorm)
    opt.step()
    sched.step()
    return {"loss_fake": loss.detach(), "guidance_grad_norm": gnorm}


def run(cfg: DictConfig) -> dict[str, Any]:
    ctx = start_run(cfg, job_type="distill")
    return run_with_logger(ctx, lambda: train_distill(cfg, ctx))


def train_distill(cfg: DictConfig, ctx: RunContext) -> dict[str, Any]:
    device = ctx.device
    teacher_state, teacher = load_teacher(cfg)
    dataset = build_dataset(cfg.data)  # its labels condition the generator and define an epoch
    loader = build_loader(dataset, cfg.batch_size, cfg.data.num_workers, cfg.seed, device.type == "cuda")
    model = UnifiedModel(
        teacher, cfg.conditioning_sigma, num_train_timesteps=cfg.num_train_timesteps,
        min_step_percent=cfg.min_step_percent, max_step_percent=cfg.max_step_percent,
    ).to(device)
    opts = {"generator": adamw(model.generator.parameters(), cfg.generator_lr, cfg.adam_betas, cfg.weight_decay),
            "guidance": adamw(model.guidance.fake_unet.parameters(), cfg.guidance_lr, cfg.adam_betas, cfg.weight_decay)}
    scheds = {k: warmup_schedule(o, cfg.warmup_steps) for k, o in opts.items()}
    steps = total_steps(cfg.num_epochs, len(loader), cfg.max_steps)
    ratio = cfg.dfake_gen_update_ratio
    print(f"[distill] teacher {cfg.teacher_checkpoint} (step {teacher_state['step']}), "
          f"{count_parameters(model.generator) / 1e6:.2f}M parameters per network, {steps} steps of batch "
          f"{cfg.batch_size} on {device}, generator every {ratio} steps; writing to {ctx.output_dir}")

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 12345)
    grid_y = grid_labels(cfg.data.num_classes, cfg.samples_per_class, device)
    grid_z = torch.randn(len(grid_y), 3, cfg.data.resolution, cfg.data.resolution, generator=gen).to(device)
    ctx.logger.log_grid("samples/teacher", sample_grid(model.guidance.real_unet, grid_z, grid_y, cfg.sample_steps,
                        cfg.samples_per_class), 0, f"teacher EMA, Heun {heun_nfe(cfg.sample_steps)} NFE")
    ctx.logger.log_grid("samples/generator", to_grid(model.sample(grid_z, grid_y), cfg.samples_per_class), 0,
                        "generator, 1 NFE")

    batches = infinite_batches(loader)
    bar = progress(steps, "distill")
    t_last, images_since, epoch = time.perf_counter(), 0, 0
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    timesteps: list[torch.Tensor] = []
    for step in range(steps):
        epoch, (_, y) = next(batches)
        y = y.to(device, non_blocking=True)
        z = torch.randn(y.shape[0], 3, cfg.data.resolution, cfg.data.resolution, device=device)
        logs: dict[str, torch.Tensor] = {}
        if step % ratio == 0:
            x, logs = generator_step(model, opts["generator"], scheds["generator"], z, y, cfg.grad_clip, step)
            timesteps.append(logs.pop("dm_timesteps").cpu())
        else:
            with torch.no_grad():
                x = model.generate(z, y)
        logs.update(fake_score_step(model, opts["guidance"], scheds["guidance"], x, y, cfg.grad_clip, step))
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v.item()
            counts[k] = counts.get(k, 0) + 1

        done = step + 1
        images_since += y.shape[0]
        bar.update(1)
        if done % cfg.log_every == 0 or done == steps:
            now = time.perf_counter()
            metrics = {f"train/{k}": sums[k] / counts[k] for k in sums}
            metrics.update({"train/generator_lr": opts["generator"].param_groups[0]["lr"],
                            "train/guidance_lr": opts["guidance"].param_groups[0]["lr"],
                            "train/images_per_sec": images_since / (now - t_last), "train/epoch": epoch})
            ctx.logger.log(metrics, step=done)
            if timesteps:
                ctx.logger.log_histogram("train/dm_timesteps", torch.cat(timesteps), step=done)
            bar.set_postfix(loss_fake=f"{metrics['train/loss_fake']:.4f}")
            t_last, images_since, sums, counts, timesteps = now, 0, {}, {}, []
        if (cfg.sample_every and done % cfg.sample_every == 0) or done == steps:
            ctx.logger.log_grid("samples/generator", to_grid(model.sample(grid_z, grid_y), cfg.samples_per_class),
                                done, "generator, 1 NFE")
        if done % cfg.save_every == 0 and done != steps:
            save(ctx, distill_state(cfg, ctx, teacher_state, model, opts, scheds, done, epoch), f"dmd2_{done:06d}.pt")
    bar.close()
    path = save(ctx, distill_state(cfg, ctx, teacher_state, model, opts, scheds, steps, epoch), "dmd2_final.pt")
    print(f"[distill] done: {path}")
    return {"checkpoint": path, "steps": steps}
