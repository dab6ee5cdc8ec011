"""Throughput benchmark of the project's training steps, samplers and FID feature extraction.
(Shared pieces: bench_tools.py; feature-network and data-loading measurements: bench_features.py; the text
report: bench_report.py.)

    python benchmarks/bench.py                                   # CPU/GPU default: simple_unet_small + simple_unet
    python benchmarks/bench.py --device cuda --arch simple_unet edm_unet --batch-size 128 --out bench.json
    python benchmarks/bench.py --device cuda --arch edm_unet --bf16 --channels-last --compile
    python benchmarks/bench.py --tiny --device cpu --out /tmp/r.json   # < 60 s smoke run (tests use it)

For every architecture preset (conf/arch/<name>.yaml, ``defaults:`` inheritance resolved) and the chosen
device it measures, with a randomly initialised network at one batch size:

  teacher_step   EDM denoising loss, backward, grad clip, AdamW step, EMA update (what dmd2/train/teacher.py
                 does per step, without data loading and logging)
  dmd2           dmd2.train.distill.generator_step + fake_score_step (a generator-update step) and no-grad
                 generate + fake_score_step (a fake-score-only step) on a dmd2.method.unified.UnifiedModel; the average
                 step at dfake_gen_update_ratio r is (t_gen + (r - 1) t_fake_only) / r, for r = 10 and 5
  sampling       one-step generator (multistep_sample over [80]), 4-step generator ([80, 2.5, 0.6, 0.1]) and
                 the teacher's Heun sampler at 35 evaluations (heun_sample, heun_sampler_sigmas(18))
  fid_features   the feature network's forward on [B,3,32,32] floats in [0, 255]
  overhead       each bare network pass a DMD2 step must make, timed alone on the same batch, against the step
                 (steps and passes timed in interleaved rounds; ratio = median over rounds of step / sum of passes)
  dmd2_full_method (with --full-method) the same steps with the GAN classifier and a 2-step generator

Every number is images per second = batch / median seconds per iteration (after warm-up iterations; CUDA is
synchronised around every timed iteration). Results go to a table on stdout and, with --out, to JSON that also
records the machine, the settings and the command line.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import shlex
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_features import bench_data, bench_features  # noqa: E402
from bench_report import data_table, table  # noqa: E402
from bench_tools import (DEFAULT_ARCHS, FOUR_STEP_SIGMAS, HEUN_STEPS, RESOLUTION, TINY_ARCHS, TINY_WIDTHS,  # noqa: E402
                         Memory, Timer, build, images, labels, load_arch, load_average, machine_info, perf_settings,
                         prepare, stage_settings)
from omegaconf import DictConfig  # noqa: E402
from torch import nn  # noqa: E402

from dmd2.method.randomness import BatchRNG  # noqa: E402
from dmd2.method.samplers import heun_nfe, heun_sample, heun_sampler_sigmas, multistep_sample
from dmd2.method.unified import UnifiedModel  # noqa: E402
from dmd2.networks import count_parameters  # noqa: E402
from dmd2.runtime.perf import autocast  # noqa: E402
from dmd2.runtime.perf import set_backend_flags  # noqa: E402
from dmd2.train.distill import Batch, DistillState, build_updaters, distill_model, fake_score_step, generator_step
from dmd2.train.optim import EMA, LRSchedule, Updater, adamw, ema_decay_at, grad_norm  # noqa: E402
from dmd2.train.teacher import TeacherState, teacher_step  # noqa: E402


# ----------------------------------------------------------------------------------------------- sections
def bench_teacher(arch: dict[str, Any], device: torch.device, args: argparse.Namespace, timer: Timer,
                  mem: Memory) -> dict[str, Any]:
    """One teacher training step as in dmd2/train/teacher.py (data loading and logging excluded)."""
    hp = stage_settings("teacher")
    model = prepare(build(arch, device).train(), args)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = adamw(model.parameters(), hp["lr"], hp["adam_betas"], hp["weight_decay"], args.fused_adamw)
    upd = Updater("loss", list(model.parameters()), opt, hp["lr"], LRSchedule(hp["warmup_steps"]), hp["grad_clip"], "stop",
                  EMA(ema, model, lambda s: ema_decay_at(s, hp["ema_decay"])))
    s = TeacherState(model, upd, BatchRNG(device=device), partial(autocast, device, "bf16" if args.bf16 else "fp32"),
                     hp["p_mean"], hp["p_std"], hp["sigma_data"], hflip=True)
    b = args.batch_size
    x = images((b, 3, RESOLUTION, RESOLUTION), device, args.channels_last).clamp(-1, 1)
    y = labels(b, device)
    state = {"step": 0}

    def step() -> None:  # the runner's step: flips, sigma, loss, backward, clip, finite check, AdamW, EMA
        teacher_step(s, x, y, state["step"])
        state["step"] += 1

    mem.reset()
    out = timer(step, b)
    out["peak_mem_mb"] = mem.peak_mb()
    out["includes"] = "teacher_step: flips, denoising_loss forward, backward, grad clip, finite check, AdamW, EMA"
    del model, ema, opt
    return out


def build_unified(arch: dict[str, Any], device: torch.device, args: argparse.Namespace,
                  sigmas: tuple[float, ...] = (80.0,), gan: bool = False) -> tuple[UnifiedModel, DictConfig]:
    hp = stage_settings("distill")
    hp.denoising_sigmas, hp.gan_classifier = list(sigmas), gan
    model = distill_model(build(arch, device), hp).to(device)
    for net in (model.generator, model.guidance.real_unet, model.guidance.fake_unet):
        prepare(net, args)
    return model, hp


def distill_state(model: UnifiedModel, hp: DictConfig, device: torch.device,
                  args: argparse.Namespace) -> DistillState:
    """The distill runner's step state: its two updaters (generator, fake score), one process, random draws
    from the global RNG."""
    updaters = build_updaters(model, None, hp, args.fused_adamw)
    amp = partial(autocast, device, "bf16" if args.bf16 else "fp32")
    return DistillState(model, model.generator, model.guidance, updaters, BatchRNG(device=device), amp,
                        hp["dfake_gen_update_ratio"])


def bench_dmd2(arch: dict[str, Any], device: torch.device, args: argparse.Namespace, timer: Timer,
               mem: Memory) -> tuple[dict[str, Any], dict[str, Any]]:
    """Generator-update and fake-score-only DMD2 steps through the runner's own functions, and the bare passes.

    The two steps and every bare pass are timed in interleaved rounds (each round runs each of them once), so
    that the step / passes ratios compare measurements taken seconds apart even on a drifting, shared machine.
    """
    model, hp = build_unified(arch, device, args)
    s = distill_state(model, hp, device, args)
    opt_g, opt_f = s.updaters["generator"].optimizer, s.updaters["guidance"].optimizer
    b, clip = args.batch_size, hp["grad_clip"]
    precision = "bf16" if args.bf16 else "fp32"
    y = labels(b, device)
    state = {"step": 0}

    def batch() -> Batch:
        return Batch(y, images((model.num_steps, b, 3, RESOLUTION, RESOLUTION), device, args.channels_last), 0)

    def gen_update() -> None:  # distill_step for step % ratio == 0 (minus logging)
        bt = batch()
        x, _ = generator_step(s, bt, state["step"])
        fake_score_step(s, bt, x, state["step"])
        state["step"] += 1

    def fake_only() -> None:  # distill_step for the other steps (minus logging)
        bt = batch()
        with torch.no_grad(), s.amp():
            x = model.generate(bt.z, y, 0).float()
        fake_score_step(s, bt, x, state["step"])
        state["step"] += 1

    # ---- bare passes on the same batch size, networks in the modes the steps use them in ----
    gen, real, fake = model.generator, model.guidance.real_unet, model.guidance.fake_unet
    z = batch().z[0] * 80.0
    s80 = torch.full((b,), 80.0, device=device)
    sig = model.guidance.sigmas[torch.randint(model.guidance.min_step, model.guidance.max_step + 1, (b,),
                                              device=device)]
    x_t = images((b, 3, RESOLUTION, RESOLUTION), device, args.channels_last).clamp(-1, 1) + sig.view(-1, 1, 1, 1) * \
        images((b, 3, RESOLUTION, RESOLUTION), device, args.channels_last)

    def fwd_bwd(net: nn.Module, inp: torch.Tensor, sigma: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            net.zero_grad(set_to_none=True)
            with autocast(device, precision):
                out = net(inp, sigma, y)
            out.float().square().mean().backward()
        return run

    def fwd(net: nn.Module, inp: torch.Tensor, sigma: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(device, precision):
                net(inp, sigma, y)
        return run

    # the unavoidable non-network work of an update: clip + AdamW step (on separate probe optimizers, lr ~ 0)
    opt_g_probe = torch.optim.AdamW(gen.parameters(), lr=1e-12)
    opt_f_probe = torch.optim.AdamW(fake.parameters(), lr=1e-12)

    def update(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> Callable[[], None]:
        def run() -> None:
            grad_norm(params, clip)
            opt.step()
        return run

    # peak memory of each step alone (these runs also count as warm-up)
    mem.reset()
    gen_update()
    gen_peak = mem.peak_mb()
    mem.reset()
    fake_only()
    fake_peak = mem.peak_mb()
    # order matters only for the probes: each clip+AdamW follows the fwd+bwd that leaves its gradients
    fns = {
        "generator_update_step": gen_update,
        "fake_score_only_step": fake_only,
        "generator_fwd_bwd": fwd_bwd(gen, z, s80),
        "generator_clip_adamw": update(opt_g_probe, list(gen.parameters())),
        "teacher_fwd_nograd": fwd(real, x_t, sig),
        "fake_fwd_nograd": fwd(fake, x_t, sig),
        "fake_fwd_bwd": fwd_bwd(fake, x_t, sig),
        "fake_clip_adamw": update(opt_f_probe, list(fake.parameters())),
        "generator_fwd_nograd": fwd(gen, z, s80),
    }
    stats, rounds = timer.rounds(fns, b)

    res: dict[str, Any] = {"generator_update_step": stats.pop("generator_update_step"),
                           "fake_score_only_step": stats.pop("fake_score_only_step")}
    res["generator_update_step"]["peak_mem_mb"] = gen_peak
    res["fake_score_only_step"]["peak_mem_mb"] = fake_peak
    t_gen = res["generator_update_step"]["seconds_median"]
    t_fake = res["fake_score_only_step"]["seconds_median"]
    for r in (10, 5):
        avg = (t_gen + (r - 1) * t_fake) / r
        res[f"avg_ratio_{r}"] = {"seconds_per_step": avg, "images_per_sec": b / avg}
    res["includes"] = ("generator_step + fake_score_step (generator update); no-grad generate + fake_score_step "
                       "(fake-score only); one-step generator, no GAN head; logging, data loading and EMA excluded")

    gen_passes = ("generator_fwd_bwd", "teacher_fwd_nograd", "fake_fwd_nograd", "fake_fwd_bwd")
    fake_passes = ("generator_fwd_nograd", "fake_fwd_bwd")

    def summed(names: tuple[str, ...], i: int | None = None) -> float:
        return sum(stats[n]["seconds_median"] if i is None else rounds[n][i] for n in names)

    n = len(rounds["generator_update_step"])
    per_round = {
        "generator_update_step": [rounds["generator_update_step"][i] / summed(gen_passes, i) for i in range(n)],
        "fake_score_only_step": [rounds["fake_score_only_step"][i] / summed(fake_passes, i) for i in range(n)],
    }
    for r in (10, 5):
        per_round[f"avg_ratio_{r}"] = [
            (rounds["generator_update_step"][i] + (r - 1) * rounds["fake_score_only_step"][i])
            / (summed(gen_passes, i) + (r - 1) * summed(fake_passes, i)) for i in range(n)]
    opt_g_s, opt_f_s = stats["generator_clip_adamw"]["seconds_median"], stats["fake_clip_adamw"]["seconds_median"]
    gen_sum, fake_sum = summed(gen_passes), summed(fake_passes)
    overhead: dict[str, Any] = {
        "passes": stats,
        "generator_update_step": {
            "step_s": t_gen, "sum_of_passes_s": gen_sum, "ratio_of_medians": t_gen / gen_sum,
            "sum_of_passes_plus_optimizers_s": gen_sum + opt_g_s + opt_f_s,
            "ratio_incl_optimizers": t_gen / (gen_sum + opt_g_s + opt_f_s),
            "passes": "generator fwd+bwd, teacher fwd (no grad), fake fwd (no grad), fake fwd+bwd",
        },
        "fake_score_only_step": {
            "step_s": t_fake, "sum_of_passes_s": fake_sum, "ratio_of_medians": t_fake / fake_sum,
            "sum_of_passes_plus_optimizers_s": fake_sum + opt_f_s,
            "ratio_incl_optimizers": t_fake / (fake_sum + opt_f_s),
            "passes": "generator fwd (no grad), fake fwd+bwd",
        },
    }
    for r in (10, 5):
        step = (t_gen + (r - 1) * t_fake) / r
        bare = (gen_sum + (r - 1) * fake_sum) / r
        overhead[f"avg_ratio_{r}"] = {"step_s": step, "sum_of_passes_s": bare, "ratio_of_medians": step / bare}
    for key, ratios in per_round.items():
        overhead[key]["ratio"] = statistics.median(ratios)  # median over rounds of (step / its passes)
        overhead[key]["ratio_per_round"] = ratios
    overhead["target"] = "ratio <= 1.10 (step within 10% of its bare network passes)"
    overhead["method"] = ("steps and passes timed in interleaved rounds; ratio = median over rounds of step time / "
                          "sum of that round's pass times; ratio_of_medians from the medians")
    del model, opt_g, opt_f, opt_g_probe, opt_f_probe
    return res, overhead


def bench_full_method(arch: dict[str, Any], device: torch.device, args: argparse.Namespace, timer: Timer,
                      mem: Memory) -> dict[str, Any]:
    """The full method (experiment=cpu_smoke's: GAN classifier on the fake network's bottleneck, 2-step generator
    with backward simulation) through the same runner functions; k alternates 0, 1 as chain_step draws it."""
    model, hp = build_unified(arch, device, args, sigmas=(80.0, 2.5), gan=True)
    s = distill_state(model, hp, device, args)
    opt_g, opt_f = s.updaters["generator"].optimizer, s.updaters["guidance"].optimizer
    b = args.batch_size
    y = labels(b, device)
    real = images((b, 3, RESOLUTION, RESOLUTION), device, args.channels_last).clamp(-1, 1)
    state = {"step": 0}

    def batch() -> Batch:
        noise = images((model.num_steps, b, 3, RESOLUTION, RESOLUTION), device, args.channels_last)
        return Batch(y, noise, state["step"] % model.num_steps, real)

    def gen_update() -> None:
        bt = batch()
        x, _ = generator_step(s, bt, state["step"])
        fake_score_step(s, bt, x, state["step"])
        state["step"] += 1

    def fake_only() -> None:
        bt = batch()
        with torch.no_grad(), s.amp():
            x = model.generate(bt.z, y, bt.k).float()
        fake_score_step(s, bt, x, state["step"])
        state["step"] += 1

    # an even number of timed iterations, so k = 0 and k = 1 are equally represented
    iters = args.iters + args.iters % 2
    res: dict[str, Any] = {}
    mem.reset()
    res["generator_update_step"] = timer(gen_update, b, warmup=2, iters=iters)
    res["generator_update_step"]["peak_mem_mb"] = mem.peak_mb()
    mem.reset()
    res["fake_score_only_step"] = timer(fake_only, b, warmup=2, iters=iters)
    res["fake_score_only_step"]["peak_mem_mb"] = mem.peak_mb()
    t_gen = res["generator_update_step"]["seconds_median"]
    t_fake = res["fake_score_only_step"]["seconds_median"]
    for r in (10, 5, 2):
        avg = (t_gen + (r - 1) * t_fake) / r
        res[f"avg_ratio_{r}"] = {"seconds_per_step": avg, "images_per_sec": b / avg}
    res["includes"] = ("gan_classifier=true, denoising_sigmas=[80.0, 2.5] (k alternating 0/1), real images for the "
                       "classifier; generator EMA, logging and data loading excluded")
    del model, opt_g, opt_f
    return res


def bench_sampling(arch: dict[str, Any], device: torch.device, args: argparse.Namespace, timer: Timer,
                   mem: Memory) -> dict[str, Any]:
    net = prepare(build(arch, device).eval().requires_grad_(False), args)
    b = args.batch_size
    y = labels(b, device)
    amp = autocast(device, "bf16" if args.bf16 else "fp32")
    z1 = images((1, b, 3, RESOLUTION, RESOLUTION), device, args.channels_last)
    z4 = images((len(FOUR_STEP_SIGMAS), b, 3, RESOLUTION, RESOLUTION), device, args.channels_last)
    heun_sigmas = heun_sampler_sigmas(HEUN_STEPS).to(device)

    def one() -> None:
        with amp:
            multistep_sample(net, z1, y, (80.0,))

    def four() -> None:
        with amp:
            multistep_sample(net, z4, y, FOUR_STEP_SIGMAS)

    def heun() -> None:
        with amp:
            heun_sample(net, z1[0], y, heun_sigmas)

    mem.reset()
    res = {"one_step": timer(one, b), "four_step": timer(four, b)}
    # the network is warm from the runs above; with --tiny no extra (35-evaluation) warm-up run
    res["heun_35"] = timer(heun, b, warmup=0 if args.tiny else 1, iters=args.heun_iters)
    res["peak_mem_mb"] = mem.peak_mb()
    res["one_step"]["nfe"], res["four_step"]["nfe"], res["heun_35"]["nfe"] = 1, 4, heun_nfe(HEUN_STEPS)
    res["four_step"]["sigmas"] = list(FOUR_STEP_SIGMAS)
    res["speedup_one_step_vs_heun35"] = res["one_step"]["images_per_sec"] / res["heun_35"]["images_per_sec"]
    res["speedup_four_step_vs_heun35"] = res["four_step"]["images_per_sec"] / res["heun_35"]["images_per_sec"]
    # The same ratio from back-to-back pairs (Heun-35 run, then one-step runs right after it): on a shared,
    # drifting machine this is steadier than the ratio of two medians taken a minute apart.
    pairs = []
    for _ in range(args.heun_iters):
        t_heun = timer(heun, b, warmup=0, iters=1)["seconds_median"]
        t_one = timer(one, b, warmup=0, iters=3)["seconds_median"]
        pairs.append(t_heun / t_one)
    res["speedup_one_step_vs_heun35_paired"] = statistics.median(pairs)
    res["speedup_paired_samples"] = pairs
    res["target"] = "one-step / Heun-35 >= 30 (ideal 35 = the ratio of network evaluations)"
    return res






# ------------------------------------------------------------------------------------------------- driver


def bench_arch(name: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    arch = load_arch(name)
    if args.tiny:
        arch.update(TINY_WIDTHS.get(arch["name"], {}))
    torch.manual_seed(args.seed)
    timer, mem = Timer(device, args.warmup, args.iters), Memory(device)
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"arch": name, "arch_config": arch, "device": str(device),
                             "params": count_parameters(build(arch, torch.device("cpu"))),
                             "batch_size": args.batch_size, "memory_kind": mem.kind}
    print(f"[bench] {name}: {entry['params'] / 1e6:.2f}M parameters, batch {args.batch_size} on {device}",
          file=sys.stderr, flush=True)
    def section(name: str, run: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        result = run()
        print(f"[bench]   {name} done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        return result

    entry["teacher_step"] = section("teacher_step", lambda: bench_teacher(arch, device, args, timer, mem))
    entry["dmd2"], entry["overhead"] = section("dmd2", lambda: bench_dmd2(arch, device, args, timer, mem))
    entry["sampling"] = section("sampling", lambda: bench_sampling(arch, device, args, timer, mem))
    if args.full_method:
        entry["dmd2_full_method"] = section("dmd2_full_method",
                                            lambda: bench_full_method(arch, device, args, timer, mem))
    entry["fid_features"] = bench_features(device, args, timer, mem)
    entry["bench_seconds"] = time.perf_counter() - t0
    return entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--arch", nargs="+", default=None,
                   help=f"conf/arch presets (default {' '.join(DEFAULT_ARCHS)}; with --tiny {' '.join(TINY_ARCHS)})")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 32 on the CPU, 8 with --tiny")
    p.add_argument("--tiny", action="store_true", help="tiny widths, batch 8 and few iterations (< 60 s on a CPU)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--compile", action="store_true", help="torch.compile every network (nn.Module.compile)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as precision=bf16 (CUDA only; ignored on the CPU)")
    p.add_argument("--channels-last", action="store_true", help="networks and inputs in channels-last memory format")
    p.add_argument("--fused-adamw", action="store_true", help="AdamW's fused kernel (perf.fused_adamw=true)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="full fp32 matmuls/convolutions on CUDA (perf.tf32=false; TF32 is the runners' default)")
    p.add_argument("--data", default=None, metavar="FOLDER",
                   help="also time batch loading from this dataset (a class-folder tree, or EDM's .zip / folder with "
                        "dataset.json): DataLoader with each of "
                        "--data-workers workers, and the in-memory cache (perf.cache_dataset), incl. its build time")
    p.add_argument("--data-workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to time")
    p.add_argument("--data-batches", type=int, default=40, help="batches timed per loader (after the first)")
    p.add_argument("--data-only", action="store_true", help="only the --data section")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per measurement (default 2; tiny 1)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per measurement (default 5; tiny 3)")
    p.add_argument("--heun-iters", type=int, default=None, help="timed Heun-35 iterations, and back-to-back Heun/one-step pairs (default 3; tiny 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; 1 with --tiny on the CPU, because on a busy "
                        "shared CPU several OpenMP threads can be many times slower than one)")
    p.add_argument("--full-method", action="store_true",
                   help="also time DMD2 steps of the full method (GAN classifier, 2-step generator)")
    p.add_argument("--no-featnet", action="store_true", help="use the built-in conv net even if the TorchScript one exists")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.arch is None:
        args.arch = TINY_ARCHS if args.tiny else DEFAULT_ARCHS
    if args.batch_size is None:
        args.batch_size = 8 if args.tiny else 128 if args.device.startswith("cuda") else 32
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if args.iters is None:
        args.iters = 3 if args.tiny else 5
    if args.heun_iters is None:
        args.heun_iters = 1 if args.tiny else 3
    if args.threads is None and args.tiny and not args.device.startswith("cuda"):
        args.threads = 1
    if min(args.batch_size, args.iters, args.heun_iters) < 1 or args.warmup < 0:
        p.error("--batch-size, --iters and --heun-iters must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_backend_flags(perf_settings(args), device)
    if args.bf16 and device.type != "cuda":
        print("[bench] --bf16: the project's autocast is CUDA-only; this CPU run is fp32", file=sys.stderr)
    os.environ.setdefault("WANDB_MODE", "disabled")
    report: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
        else "bench.main(" + repr(argv) + ")",
        "machine": machine_info(device),
        "settings": {"batch_size": args.batch_size, "archs": args.arch, "device": str(device), "tiny": args.tiny,
                     "compile": args.compile, "bf16": args.bf16, "bf16_active": args.bf16 and device.type == "cuda",
                     "channels_last": args.channels_last, "fused_adamw": args.fused_adamw,
                     "tf32": args.tf32 and device.type == "cuda",
                     "full_method": args.full_method, "warmup": args.warmup, "iters": args.iters,
                     "heun_iters": args.heun_iters, "threads": torch.get_num_threads(),
                     "threads_set_by": "--threads" if args.threads else "torch default", "seed": args.seed, "timing": "median seconds per iteration "
                     "after warm-up; CUDA synchronised around each timed iteration; images/s = batch / median"},
        "load_average_start": load_average(),
        "complete": False,
        "results": [],
    }
    t0 = time.perf_counter()
    if args.data:
        report["data_loading"] = bench_data(Path(args.data), device, args)
        print(data_table(report["data_loading"]))
        if args.out:
            write_json(report, Path(args.out))
        if args.data_only:
            return report
    for name in args.arch:
        report["results"].append(bench_arch(name, device, args))
        report["complete"] = len(report["results"]) == len(args.arch)
        report["load_average_end"] = load_average()
        report["total_seconds"] = time.perf_counter() - t0
        report["table"] = table(report)
        if args.out:  # after every architecture, so a run cut short by a time limit still leaves its results
            write_json(report, Path(args.out))
    print(report["table"])
    if args.out:
        print(f"[bench] wrote {args.out}", file=sys.stderr)
    return report


def write_json(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
