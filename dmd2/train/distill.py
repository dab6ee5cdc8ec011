"""Stage 2: DMD2 distillation of a teacher checkpoint into a one- or few-step generator.

Each step the generator makes images x for a batch of dataset labels (one step: x = G(z * 80; 80, c);
with ``denoising_sigmas`` of length S it runs k ~ U{0..S-1} steps of its own chain first, backward simulation).
- ``generator_step`` (every ``dfake_gen_update_ratio``-th step, counting from step 0): the DM loss on x through
  the frozen teacher and the fake score network (both without gradient), plus the GAN loss when enabled,
  updates the generator.
- ``fake_score_step`` (every step): the fake score network's denoising loss on detached x (plus the GAN
  classifier's loss on x against dataset images) updates the fake score network and the head.
On the other steps x is made without autograd. The teacher never receives gradients or updates and runs in
eval mode; the generator and the fake score network train with their own ``dropout`` (0 by default, as the
official DMD2), so at initialisation (fake = teacher) the DM gradient is exactly zero. Both learning-rate
warm-ups count training iterations. With ``eval_every`` > 0 the generator's FID / FD is measured at step 0,
every ``eval_every`` steps and at the end (dmd2.train.evaluator).
Checkpoints: dmd2_NNNNNN.pt every ``save_every`` steps and dmd2_final.pt.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dmd2.config.errors import ConfigError
from dmd2.config.settings import DEFAULT_EMA, RAW_WEIGHTS, DistillSettings, ema_decays
from dmd2.data.batches import random_hflip
from dmd2.data.datasets import LabelsOnly, build_dataset
from dmd2.data.mixture import mixture_from_config
from dmd2.io.checkpoint import load_checkpoint, network_from_checkpoint
from dmd2.io.export import export_generator
from dmd2.io.sampler import CheckpointSampler
from dmd2.method.edm import SIGMA_MAX, SIGMA_MIN, dmd_timestep_sigmas
from dmd2.method.guidance import GuidanceModel, LossChoices, guidance_logs
from dmd2.method.health import SATURATED, saturated_fraction
from dmd2.method.mixture import ExactDenoiser
from dmd2.method.randomness import BatchRNG, derived_seed, torch_generator
from dmd2.method.samplers import backward_simulation
from dmd2.method.unified import UnifiedModel, generator_logs
from dmd2.networks import count_parameters, set_dropout
from dmd2.networks.discriminator import FeatureDiscriminator, feature_channels
from dmd2.networks.gan_head import GANHead
from dmd2.networks.precond import EDMPrecond
from dmd2.runtime.distributed import synced, wrap
from dmd2.runtime.perf import autocast, fused_adamw, prepare_network
from dmd2.train.context import RunContext, run_context
from dmd2.train.evaluator import TrainingEvaluator
from dmd2.train.grids import SampleGrids
from dmd2.train.health import DenoiserPanels, HealthMonitor
from dmd2.train.loop import plan_batches, train_loop
from dmd2.train.optim import EMA, Updater, adamw, ema_decay_at, lr_schedule, plan_schedules, round_means

log = logging.getLogger(__name__)


@dataclass
class DistillState:
    """Everything a distillation step reads or updates."""

    model: UnifiedModel            # the generator and the guidance model (teacher, fake score network, GAN head)
    generator: nn.Module           # model.generator as called for its update (inside DDP under torchrun)
    guidance: nn.Module            # model.guidance as called for its update (inside DDP under torchrun)
    updaters: dict[str, Updater]   # "generator" (with the generator EMA, if any) and "guidance"
    rng: BatchRNG                  # every random draw of the batch
    amp: Callable[[], Any]         # a fresh autocast context (bf16 on CUDA) or a null one
    ratio: int                     # the generator updates every ratio-th step (TTUR)
    schedule: str = "every"        # "every": the critic updates on every step | "alternate": not on the generator's
    fake_warmup: int = 0           # iterations 0 .. fake_warmup - 1 update the critic alone (fake_warmup_steps)


@dataclass
class Batch:
    """One step's inputs."""

    y: Tensor                      # class labels [B] (from the dataset)
    z: Tensor                      # noise [S,B,C,H,W], one draw per generator step (S = len(denoising_sigmas))
    k: int                         # backward-simulation depth: the generator's output at chain step k is trained
    real: Tensor | None = None     # dataset images [B,C,H,W] for the GAN classifier (None without it)


def load_teacher(cfg: DictConfig) -> tuple[dict[str, Any], EDMPrecond]:
    """The teacher's EMA denoiser, rebuilt with the architecture stored in its checkpoint.

    ``arch=from_teacher`` (the distill default) takes that architecture; an explicit arch must match it."""
    state = load_checkpoint(cfg.teacher_checkpoint, kind="teacher")
    stored = state["arch"]
    if cfg.arch.name != "from_teacher":
        requested = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.arch.items()}
        if requested != stored:
            diff = sorted(k for k in set(stored) | set(requested) if stored.get(k) != requested.get(k))
            raise ConfigError(
                f"config key 'arch' contradicts the teacher checkpoint {cfg.teacher_checkpoint} on {diff} "
                f"(checkpoint: { {k: stored.get(k) for k in diff} }); drop the arch override to use the teacher's"
            )
    for key in ("num_classes", "resolution"):
        if state[key] != cfg.data[key]:
            raise ConfigError(f"config key 'data.{key}' = {cfg.data[key]} but the teacher was trained with {state[key]}")
    return state, network_from_checkpoint(state, "ema")


def class_names(teacher: dict[str, Any], dataset_names: list[str] | None, data_name: str) -> list[str] | None:
    """The class names the generator is trained with: the teacher's (stored in its checkpoint), else the
    dataset's. Both known and different means label c is another class in the data than for the teacher:
    refused."""
    names = teacher.get("class_names")
    if names is not None and dataset_names is not None and list(names) != list(dataset_names):
        raise ConfigError(
            f"config key 'data' ({data_name}): its classes {list(dataset_names)[:10]} are not the teacher's "
            f"{list(names)[:10]} (same order expected): labels would mean other classes than the teacher learned")
    return list(names) if names is not None else dataset_names


def build_updaters(model: UnifiedModel, ema: EDMPrecond | None, cfg: DistillSettings, fused: bool,
                   more: dict[str, EDMPrecond] | None = None) -> dict[str, Updater]:
    """The generator's updater (with its EMA, if any, and the ``more`` EMAs of generator_ema_decays, by name) and
    the guidance model's (fake score network + GAN head)."""
    def updater(name: str, params: list[Tensor], lr: float, ema_of: EMA | None) -> Updater:
        opt = adamw(params, lr, cfg.adam_betas, cfg.weight_decay, fused)
        return Updater(f"{name} loss", params, opt, lr, lr_schedule(cfg), cfg.grad_clip, cfg.on_nonfinite,
                       ema_of)

    decay = cfg.generator_ema_decay
    guidance: Any = model.guidance.trainable()
    disc = model.guidance.discriminator_params()
    if disc:  # FastGen's discriminator: its own learning rate, stepped with the fake score network
        disc_lr = cfg.discriminator_lr if cfg.discriminator_lr is not None else cfg.guidance_lr
        guidance = [{"params": guidance}, {"params": disc, "lr": disc_lr, "base_lr": disc_lr}]
    def decay_of(d: float) -> Any:  # with generator_ema_warmup, the teacher's warm-up over generator updates
        if not cfg.generator_ema_warmup:
            return lambda _: d
        turns = partial(generator_updates_before, ratio=cfg.dfake_gen_update_ratio, schedule=cfg.update_schedule,
                        fake_warmup=cfg.fake_warmup_steps)
        return lambda step: ema_decay_at(turns(step), d)

    upds = {"generator": updater("generator", list(model.generator.parameters()), cfg.generator_lr,
                                 EMA(ema, model.generator, decay_of(decay)) if ema is not None else None),
            "guidance": updater("guidance", guidance, cfg.guidance_lr, None)}
    upds["guidance"].params = model.guidance.trainable() + disc
    decays = ema_decays(None, cfg.generator_ema_decays)
    upds["generator"].more_emas = [EMA(net, model.generator, decay_of(decays[name]))
                                   for name, net in (more or {}).items()]
    return upds


def restore_emas(state: dict[str, Any], emas: dict[str, EDMPrecond]) -> None:
    """Load the generator EMAs (by name) of a dmd2 checkpoint; an extra EMA the checkpoint lacks (a decay added to
    generator_ema_decays on resume) starts from the generator's weights."""
    for name, net in emas.items():
        if name == DEFAULT_EMA:
            net.load_state_dict(state["generator_ema"])
        elif name in state["generator_emas"]:
            net.load_state_dict(state["generator_emas"][name])
        else:
            log.warning(f"[distill] the checkpoint has no generator EMA {name}: it starts from the generator's weights")
            net.load_state_dict(state["generator"])


def restore_distill(state: dict[str, Any], model: UnifiedModel, emas: dict[str, EDMPrecond], upds: dict[str, Updater],
                    evaluator: TrainingEvaluator) -> int:
    """Load a dmd2 checkpoint into the freshly built objects (``emas``: the generator EMAs by name); return its
    step."""
    model.generator.load_state_dict(state["generator"])
    model.guidance.fake_unet.load_state_dict(state["fake_unet"])
    if model.guidance.gan_head is not None:
        if "gan_head" not in state:
            raise ConfigError("config key 'gan_classifier' = true, but the checkpoint to resume has no GAN head")
        model.guidance.gan_head.load_state_dict(state["gan_head"])
    if model.guidance.discriminator is not None:
        if "discriminator" not in state:
            raise ConfigError("config key 'gan_features' = 'teacher', but the checkpoint to resume has no "
                              "discriminator")
        model.guidance.discriminator.load_state_dict(state["discriminator"])
    restore_emas(state, emas)
    for name, upd in upds.items():
        upd.load_state_dict(state[f"{name}_updater"])
    evaluator.load_state_dict(state["evaluation"])
    return int(state["step"])


UPDATERS = ("generator", "guidance")  # the distillation's two updaters (build_updaters)


def grad_norm_key(updater: str) -> str:
    """The logged gradient norm of an updater's applied updates."""
    return f"{updater}_grad_norm"


def chain_step(seed: int, step: int, num_steps: int) -> int:
    """Backward-simulation depth k ~ U{0..num_steps-1}, a function of (seed, step) only: every rank and a
    resumed run draw the same k."""
    if num_steps == 1:
        return 0
    return int(torch.randint(0, num_steps, (1,), generator=torch_generator(derived_seed(seed, step))))


def full(x: Tensor) -> Tensor:
    """Generator samples at full precision: float32 from autocast's bf16 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def generator_step(s: DistillState, b: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Update the generator with the DM (+ GAN) loss; return its (detached) samples x [B,C,H,W] and the logs."""
    xs, logs = generator_rounds(s, [b], step)
    return xs[0], logs


def generator_rounds(s: DistillState, batches: list[Batch], step: int) -> tuple[list[Tensor], dict[str, Tensor]]:
    """One generator update accumulated over ``batches`` (one per round): per round the samples and the DM (+ GAN)
    loss, backward of loss / rounds (DDP all-reduces on the last round only); then one step. Returns each
    round's (detached) samples and the logs (means over the rounds)."""
    upd, rounds = s.updaters["generator"], len(batches)
    xs, logs = [], []
    for r in s.rng.rounds(rounds):
        b = batches[r]
        with synced(s.generator, r == rounds - 1):
            with s.amp():
                x = backward_simulation(s.generator, b.z, b.y, s.model.denoising_sigmas, b.k)
                loss, round_logs = s.model.generator_loss(full(x), b.y, s.rng)
            upd.accumulate(loss, rounds)
        xs.append(full(x.detach()))
        logs.append(round_logs)
    merged = round_means(logs)
    gnorm = upd.step(step)
    if gnorm is not None:
        merged[grad_norm_key("generator")] = gnorm
    return xs, merged


def fake_score_step(s: DistillState, b: Batch, x: Tensor, step: int) -> dict[str, Tensor]:
    """Update the fake score network (and GAN head) on detached generator samples x (and the real images)."""
    return fake_score_rounds(s, [b], [x], step)


def fake_score_rounds(s: DistillState, batches: list[Batch], xs: list[Tensor], step: int) -> dict[str, Tensor]:
    """One update of the fake score network (and GAN head) accumulated over the rounds' batches and detached
    samples ``xs``, as ``generator_rounds``. Returns the logs (means over the rounds)."""
    upd, rounds, logs = s.updaters["guidance"], len(batches), []
    for r in s.rng.rounds(rounds):
        b = batches[r]
        with synced(s.guidance, r == rounds - 1):
            with s.amp():
                loss, round_logs = s.guidance(xs[r], b.y, b.real, b.y if b.real is not None else None, s.rng)
            upd.accumulate(loss, rounds)
        logs.append(round_logs)
    merged = round_means(logs)
    gnorm = upd.step(step)
    if gnorm is not None:
        merged[grad_norm_key("guidance")] = gnorm
    return merged


def generator_turn(step: int, ratio: int, schedule: str, fake_warmup: int = 0) -> bool:
    """Whether iteration ``step`` (from 0) updates the generator: every ``ratio``-th from step 0 (``every``, the
    official DMD2's), or every ``ratio``-th counted from 1 (``alternate``: FastGen's trainer starts at iteration 1,
    so its first four iterations update the critic); never before iteration ``fake_warmup`` (the fake score network
    first learns the generator's initial samples)."""
    if step < fake_warmup:
        return False
    return (step + 1) % ratio == 0 if schedule == "alternate" else step % ratio == 0


def generator_updates_before(step: int, ratio: int, schedule: str, fake_warmup: int = 0) -> int:
    """How many of iterations 0 .. step - 1 are generator turns (``generator_turn``): the count an EMA warm-up
    of the generator is a function of (a pure function of the iteration, so a resumed run continues it)."""
    first = fake_warmup + (-fake_warmup - (1 if schedule == "alternate" else 0)) % ratio  # the first turn
    return 0 if step <= first else (step - first - 1) // ratio + 1


def first_generator_turn(cfg: DictConfig) -> int:
    """The iteration of the generator's first update (``generator_turn``: after the fake warm-up, on a turn)."""
    ratio, schedule, warm = cfg.dfake_gen_update_ratio, cfg.update_schedule, cfg.fake_warmup_steps
    return next(step for step in range(warm, warm + ratio + 1) if generator_turn(step, ratio, schedule, warm))


def distill_step(s: DistillState, b: Batch, step: int) -> dict[str, Tensor]:
    """One iteration: the generator's update on its turns (on the others its samples are made without autograd),
    then the fake score network's (and discriminator's) update on those samples; with the ``alternate`` schedule
    the critic skips the generator's turns. Returns the logs."""
    return distill_rounds(s, [b], step)


def distill_rounds(s: DistillState, batches: list[Batch], step: int) -> dict[str, Tensor]:
    """``distill_step`` on an iteration of accumulation rounds, one ``Batch`` per round (this rank's slices of
    the global batch): each update accumulates its gradients over the rounds, then steps once."""
    if generator_turn(step, s.ratio, s.schedule, s.fake_warmup):
        xs, logs = generator_rounds(s, batches, step)
        if s.schedule == "alternate":
            return logs
    else:
        logs = {}
        with torch.no_grad(), s.amp():
            xs = [full(s.model.generate(b.z, b.y, b.k)) for b in batches]
    logs[SATURATED] = saturated_fraction(torch.cat(xs))  # a diagnostic (dmd2.method.health): no draw, no gradient
    logs.update(fake_score_rounds(s, batches, xs, step))
    return logs


def teacher_discriminator(teacher: EDMPrecond, s: DistillSettings | DictConfig) -> FeatureDiscriminator:
    """FastGen's discriminator: one head per teacher encoder output at ``gan_feature_resolutions``."""
    resolutions = [int(r) for r in s.gan_feature_resolutions]
    try:
        channels = feature_channels(teacher.net, teacher.net.resolution, resolutions)
    except ValueError as err:
        raise ConfigError(f"config key 'gan_feature_resolutions' = {resolutions}: {err}") from None
    return FeatureDiscriminator(channels, resolutions)


def trainable_copy(teacher: EDMPrecond, dropout: float | None) -> EDMPrecond:
    """A trainable copy of the teacher with its own dropout (None keeps the teacher's)."""
    net = copy.deepcopy(teacher).train().requires_grad_(True)
    return set_dropout(net, dropout) if dropout is not None else net


def distill_model(teacher: EDMPrecond, s: DistillSettings | DictConfig) -> UnifiedModel:
    """The generator and the guidance model of a distillation, from the distill stage's settings ``s`` (a
    composed config or a ``DistillSettings``): both trainable networks start as copies of the teacher; the GAN
    head reads the fake score network's bottleneck; the DM loss draws timesteps from [min_step_percent,
    max_step_percent] of the ``num_train_timesteps``-entry Karras table."""
    generator = trainable_copy(teacher, s.dropout)
    fake = trainable_copy(teacher, s.dropout)
    net = teacher.net
    on_teacher = s.gan_classifier and s.gan_features == "teacher"
    head = GANHead(net.bottleneck_channels, net.bottleneck_resolution) if s.gan_classifier and not on_teacher else None
    n = s.num_train_timesteps
    dm_steps = (int(s.min_step_percent * n), min(int(s.max_step_percent * n), n - 1))
    choices = LossChoices(dm_steps if s.fake_score_timesteps == "dm" else None, s.fake_score_weighting, s.dm_eps,
                          s.r1_weight, s.r1_alpha, s.dm_gradient_sign < 0)
    guidance = GuidanceModel(teacher, fake, head, dmd_timestep_sigmas(n, SIGMA_MIN, SIGMA_MAX), dm_steps,
                             s.diffusion_gan_max_timestep if s.diffusion_gan else None, s.cls_loss_weight,
                             teacher.sigma_data, choices, teacher_discriminator(teacher, s) if on_teacher else None)
    return UnifiedModel(generator, guidance, s.denoising_sigmas or [s.conditioning_sigma], s.gen_cls_loss_weight)


def build_networks(cfg: DictConfig, teacher: EDMPrecond, device: torch.device
                   ) -> tuple[UnifiedModel, dict[str, EDMPrecond], dict[str, Updater]]:
    """The generator and the guidance model (copies of the teacher; with ``exact_teacher`` the real score is the
    mixture's exact denoiser), the generator's EMAs by name ('ema' for generator_ema_decay, ema_<decay> for each
    of generator_ema_decays; none without either) and both updaters."""
    model = distill_model(teacher, cfg).to(device)
    if cfg.exact_teacher:  # known-answer data: the real score is exact; the checkpoint only initialises G and fake
        model.guidance.real_unet = ExactDenoiser(mixture_from_config(cfg.data), teacher.sigma_data)
    emas = {name: copy.deepcopy(model.generator).eval().requires_grad_(False)
            for name in ema_decays(cfg.generator_ema_decay, cfg.generator_ema_decays)}
    networks = [model.generator, model.guidance.fake_unet] + ([] if cfg.exact_teacher else [model.guidance.real_unet])
    for net in networks:
        prepare_network(net, cfg.perf)  # channels-last / torch.compile (after the EMA copy: it stays eager)
    fused = fused_adamw(cfg.perf.fused_adamw, device)
    more = {name: net for name, net in emas.items() if name != DEFAULT_EMA}
    return model, emas, build_updaters(model, emas.get(DEFAULT_EMA), cfg, fused, more)


def describe_run(cfg: DictConfig, ctx: RunContext, teacher_state: dict[str, Any], model: UnifiedModel, steps: int,
                 start: int) -> str:
    """The line a distillation starts with: its teacher, networks, method and length."""
    teacher_text = f"teacher {cfg.teacher_checkpoint} (step {teacher_state['step']})"
    if cfg.exact_teacher:
        teacher_text = f"the exact mixture denoiser as teacher (networks initialised from {teacher_text})"
    return (f"[distill] {teacher_text}, {count_parameters(model.generator) / 1e6:.2f}M parameters per network, "
            f"{model.num_steps}-step generator, GAN {'on' if cfg.gan_classifier else 'off'}, {steps} steps of global "
            f"batch {ctx.config['global_batch_size']} on {ctx.device}, generator every "
            f"{cfg.dfake_gen_update_ratio} steps" + (f" (after {cfg.fake_warmup_steps} steps of fake score network "
            f"warm-up: first at step {first_generator_turn(cfg)})" if cfg.fake_warmup_steps else "")
            + f", from step {start}; writing to {ctx.output_dir}")


def export_final(ctx: RunContext, path: str, steps: int, num_chain: int) -> None:
    """Export the generator of the final checkpoint (ready for dmd2.load_generator / generate.py / the Hub) and
    log both as W&B artifacts (rank 0). The export is a side write: when it fails (a full disk, ...) the error is
    reported with the command that makes it from the final checkpoint, and the run ends as it would have."""
    export = os.path.join(ctx.output_dir, "generator")
    try:
        meta = export_generator(path, export, overwrite=True)  # the run's own folder (a resumed run re-exports)
    except Exception as err:  # noqa: BLE001 - the final checkpoint is written: the export can be redone
        log.error(f"[distill] ERROR: exporting the generator to {export} failed ({err}); the final checkpoint is "
                  f"complete: export it later with python -m dmd2.export {path} {export} --overwrite")
        return
    ctx.say(f"[distill] generator exported to {export} ({meta['weights']} weights, {num_chain} NFE)")
    ctx.logger.log_artifact(path, "dmd2", steps)
    ctx.logger.log_artifact(export, "generator", steps, metadata={k: meta[k] for k in ("kind", "sampler",
                            "num_classes", "resolution", "provenance")})


def generator_sampler(model: UnifiedModel, emas: dict[str, EDMPrecond], step: int, num_classes: int,
                      resolution: int, weights: str = DEFAULT_EMA) -> CheckpointSampler:
    """What evaluations measure: the weights generate.py / evaluate.py sample when given ``weights`` (eval_weights:
    'ema', the default EMA when there is one, else the raw weights; 'raw'; or an EMA's name)."""
    if weights == DEFAULT_EMA and DEFAULT_EMA not in emas:
        weights = RAW_WEIGHTS
    net = model.generator if weights == RAW_WEIGHTS else emas[weights]
    return CheckpointSampler("dmd2", net, step, num_classes, resolution, model.num_steps,
                             denoising_sigmas=tuple(model.denoising_sigmas), weights=weights)


def make_batch(cfg: DictConfig, rng: BatchRNG, real: Tensor, y: Tensor, step: int, num_chain: int,
               device: torch.device) -> Batch:
    """A step's inputs from the loader's (images, labels): the labels, the images for the GAN classifier (flipped
    when data.hflip; None without the classifier), fresh noise for every chain step and the chain depth. Draws from
    ``rng`` in this order: flips, then noise."""
    y = y.to(device, non_blocking=True)
    real = real.to(device, non_blocking=True) if cfg.gan_classifier else None
    if real is not None and cfg.data.hflip:
        real = random_hflip(real, rng)
    res = cfg.data.resolution
    return Batch(y, rng.randn(num_chain, y.shape[0], 3, res, res, dim=1), chain_step(cfg.seed, step, num_chain), real)


@dataclass
class DistillStage:
    """The distillation stage for the training loop (dmd2/train/loop.py)."""

    s: DistillState
    emas: dict[str, EDMPrecond]    # the generator's EMAs by name ('ema': what generate.py samples by default)
    teacher: dict[str, Any]        # the teacher's checkpoint (its arch, classes, ...)
    grids: SampleGrids
    ctx: RunContext
    cfg: DictConfig
    name: str = "distill"
    prefix: str = "dmd2"
    progress_key: str = "train/loss_fake"
    evaluate_first: bool = True    # the starting point: the teacher's one-step output
    panels: DenoiserPanels | None = None  # health.panels: drawn with every sample grid (dmd2.train.health)

    @property
    def ema(self) -> EDMPrecond | None:
        """The default generator EMA (generator_ema_decay), if any."""
        return self.emas.get(DEFAULT_EMA)

    @property
    def updaters(self) -> dict[str, Updater]:
        return self.s.updaters

    @property
    def networks(self) -> dict[str, nn.Module]:
        model = self.s.model
        return {"generator": model.generator, "fake score network": model.guidance.fake_unet,
                **{("generator EMA" if name == DEFAULT_EMA else f"generator EMA {name}"): net
                   for name, net in self.emas.items()}}

    def step(self, batches: list[tuple[Tensor, Tensor]], step: int) -> dict[str, Tensor]:
        made = [make_batch(self.cfg, self.s.rng, *batches[r], step, self.s.model.num_steps, self.ctx.device)
                for r in self.s.rng.rounds(len(batches))]  # the rounds' draws: slices of one global draw
        return distill_rounds(self.s, made, step)

    def scalars(self, step: int) -> dict[str, float]:
        return {f"train/{name}_{what}": value for name, upd in self.s.updaters.items()
                for what, value in (("lr", upd.lr_at(step)), ("skipped_steps", upd.skipped))}

    @staticmethod
    def metric_keys(gan: bool, r1: bool = False) -> list[str]:
        """The train/ scalars a distillation logs: its steps' logs and ``scalars``."""
        own = (generator_logs(gan) + guidance_logs(gan, r1) + tuple(grad_norm_key(u) for u in UPDATERS)
               + (SATURATED,))
        return [f"train/{k}" for k in own] + [f"train/{u}_{what}" for u in UPDATERS for what in ("lr", "skipped_steps")]

    def state(self) -> dict[str, Any]:
        model, cfg, teacher = self.s.model, self.cfg, self.teacher
        state = dict(
            kind="dmd2", arch=teacher["arch"], num_classes=teacher["num_classes"], resolution=teacher["resolution"],
            sigma_data=teacher["sigma_data"], class_names=self.grids.classes,
            conditioning_sigma=float(cfg.conditioning_sigma), denoising_sigmas=list(model.denoising_sigmas),
            teacher_checkpoint=str(cfg.teacher_checkpoint), teacher_sha256=self.ctx.config.get("teacher_sha256"),
            generator=model.generator.state_dict(), fake_unet=model.guidance.fake_unet.state_dict(),
            **{f"{name}_updater": upd.state_dict() for name, upd in self.s.updaters.items()})
        if model.guidance.gan_head is not None:
            state["gan_head"] = model.guidance.gan_head.state_dict()
        if model.guidance.discriminator is not None:
            state["discriminator"] = model.guidance.discriminator.state_dict()
        if self.ema is not None:
            state["generator_ema"] = self.ema.state_dict()
        more = {name: net.state_dict() for name, net in self.emas.items() if name != DEFAULT_EMA}
        if more:  # only then: a run with the default EMA alone writes exactly the keys it always did
            state["generator_emas"] = more
        return state

    def log_grids(self, step: int) -> None:
        model, caption = self.s.model, f"generator, {self.s.model.num_steps} NFE"
        raw = model.sample(self.grids.z, self.grids.y)
        self.grids.log(self.ctx.logger, "samples/generator", raw, step, caption)
        beside, beside_caption = raw, caption
        for name, net in self.emas.items():  # samples/generator_ema, samples/generator_ema_0.99995, ...
            images = model.sample(self.grids.z, self.grids.y, net)
            label = f"{'EMA' if name == DEFAULT_EMA else name} {caption}"
            self.grids.log(self.ctx.logger, f"samples/generator_{name}", images, step, label)
            if name == DEFAULT_EMA:
                beside, beside_caption = images, label
        # the teacher and the generator (its EMA when trained with one) from the same noise, in one picture
        self.grids.log_beside(self.ctx.logger, "samples/teacher_vs_generator", beside, step, beside_caption)
        if self.panels is not None:
            self.panels.log(self.ctx.logger, model.generator, model.guidance.real_unet, model.guidance.fake_unet, step)

    def sampler(self, step: int) -> CheckpointSampler:
        return generator_sampler(self.s.model, self.emas, step, self.cfg.data.num_classes, self.cfg.data.resolution,
                                 self.cfg.eval_weights)

    def publish(self, path: str, steps: int) -> None:
        export_final(self.ctx, path, steps, self.s.model.num_steps)


def run(cfg: DictConfig) -> dict[str, Any]:
    with run_context(cfg, job_type="distill", prefix="dmd2") as ctx:
        return train_distill(cfg, ctx)


def train_distill(cfg: DictConfig, ctx: RunContext) -> dict[str, Any]:
    device = ctx.device
    evaluator = TrainingEvaluator(cfg, device, ctx.dist, ctx.logger)  # a missing feature network fails here
    teacher_state, teacher = load_teacher(cfg)
    dataset = build_dataset(cfg.data)  # labels condition the generator; images feed the GAN classifier
    classes = class_names(teacher_state, dataset.class_names, cfg.data.name)
    if not cfg.gan_classifier:
        dataset = LabelsOnly(dataset)  # no image decoding when only the labels are used
    model, emas, upds = build_networks(cfg, teacher, device)
    start = 0
    if ctx.resume is not None:
        start = restore_distill(ctx.resume, model, emas, upds, evaluator)
    # under torchrun the updated networks run inside DistributedDataParallel (gradients averaged over ranks)
    s = DistillState(model, wrap(model.generator, ctx.dist, device), wrap(model.guidance, ctx.dist, device), upds,
                     ctx.rng, partial(autocast, device, cfg.precision), cfg.dfake_gen_update_ratio, cfg.update_schedule,
                     cfg.fake_warmup_steps)
    loader, plan = plan_batches(cfg, ctx, dataset, start)
    plan_schedules(upds.values(), plan.steps)  # a learning-rate decay ends at the run's last iteration
    first = first_generator_turn(cfg)
    if cfg.fake_warmup_steps and first >= plan.steps:
        raise ConfigError(f"config key 'fake_warmup_steps' = {cfg.fake_warmup_steps}: the generator's first update "
                          f"would be at step {first}, but the run has {plan.steps} steps (the generator would never "
                          "train); lower it or raise max_steps / num_epochs")
    ctx.say(describe_run(cfg, ctx, teacher_state, model, plan.steps, start))
    grids = SampleGrids(cfg.seed, cfg.data.num_classes, cfg.data.resolution, cfg.samples_per_class, model.num_steps,
                        classes, device)
    if ctx.dist.is_main:
        grids.log_teacher(ctx.logger, "samples/teacher", model.guidance.real_unet, cfg.sample_steps, 0, "teacher EMA")
        ctx.logger.use_checkpoint(cfg.teacher_checkpoint, "teacher", teacher_state.get("wandb_run_id"), "teacher")
    h = cfg.health
    if h.alerts and ctx.dist.is_main:
        HealthMonitor(h, evaluator.key if evaluator.enabled else None, ctx.logger).attach()
    panels = DenoiserPanels.build(grids.z, grids.y, cfg.samples_per_class, h.panel_images, list(h.panel_sigmas),
                                  model.denoising_sigmas, cfg.seed) if h.panels else None
    return train_loop(cfg, ctx, DistillStage(s, emas, teacher_state, grids, ctx, cfg, panels=panels), loader, plan,
                      evaluator)
