"""FastGen's DMD2 variant against the official one: the step time on this machine, and the GPU memory FastGen's
global batch of 2048 needs on 1, 4 and 8 GPUs with gradient accumulation, counted from the tensors a step keeps.

    python benchmarks/bench_fastgen.py                      # CPU: simple_unet_small, batch 16; memory at edm_unet
    python benchmarks/bench_fastgen.py --tiny --out r.json  # seconds (tests use it)

Step time: one generator iteration and one critic iteration of each variant through the runner's distill_step
(official: the generator iteration also updates the fake score network; FastGen: either-or), averaged over the
ratio-5 cycle: official (t_gen + 4 t_fake) / 5, FastGen (t_gen + 4 t_critic) / 5.

Memory (per GPU, float32 as FastGen trains): the weights, gradients and AdamW moments of the generator, fake score
network and discriminator, the frozen teacher's weights, and the activations a step keeps for its backward: every
tensor autograd saves, counted by a saved-tensors hook over one step at micro-batch 2 and scaled per sample (the
larger of the generator and the critic step). Upper bound: nothing is freed early, no allocator overhead.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_tools import CONF, Timer, load_arch  # noqa: E402

from dmd2.io.weights import build_denoiser  # noqa: E402
from dmd2.method.randomness import BatchRNG  # noqa: E402
from dmd2.train.distill import Batch, DistillState, build_updaters, distill_model, distill_step  # noqa: E402

GLOBAL_BATCH = 2048
GPU_GIB = 80.0  # an H100's memory (the H200 has 141)


def settings(experiment: str, arch: str, feature_resolutions: list[int]) -> Any:
    """The composed settings of ``experiment`` (no teacher file is read: the networks are built here)."""
    from hydra import compose, initialize_config_dir

    import dmd2.config.settings  # noqa: F401  (registers the schemas)

    overrides = [f"experiment={experiment}", "logger=none", "teacher_checkpoint=none"]
    if experiment == "fastgen_dmd2_cifar10":
        overrides.append(f"gan_feature_resolutions=[{','.join(map(str, feature_resolutions))}]")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def variant(experiment: str, arch: str, device: torch.device, resolutions: list[int]) -> tuple[DistillState, Any]:
    hp = settings(experiment, arch, resolutions)
    torch.manual_seed(0)
    model = distill_model(build_denoiser(load_arch(arch), 10, 32, 0.5).to(device), hp).to(device)
    upds = build_updaters(model, None, hp, fused=False)
    return DistillState(model, model.generator, model.guidance, upds, BatchRNG(device=device), nullcontext, 5,
                        hp.update_schedule), hp


def batch(b: int, device: torch.device) -> Batch:
    return Batch(torch.arange(b, device=device) % 10, torch.randn(1, b, 3, 32, 32, device=device), 0,
                 torch.rand(b, 3, 32, 32, device=device) * 2 - 1)


def step_times(arch: str, b: int, device: torch.device, timer: Timer, resolutions: list[int]) -> dict[str, Any]:
    """Seconds per generator and critic iteration of each variant and the ratio-5 average."""
    out = {}
    for name, experiment, gen_step, critic_step in (("official", "dmd2_cifar10", 0, 1),
                                                    ("fastgen", "fastgen_dmd2_cifar10", 4, 0)):
        s, _ = variant(experiment, arch, device, resolutions)
        x = batch(b, device)
        t_gen = timer(lambda: distill_step(s, x, gen_step), b)["seconds_median"]
        t_critic = timer(lambda: distill_step(s, x, critic_step), b)["seconds_median"]
        out[name] = {"generator_iteration_s": t_gen, "critic_iteration_s": t_critic,
                     "ratio5_mean_s": (t_gen + 4 * t_critic) / 5, "images_per_s": b / ((t_gen + 4 * t_critic) / 5)}
    return out


def saved_bytes(fn: Any) -> int:
    """Bytes of every tensor autograd saves for backward while ``fn`` runs."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def memory(arch: str, resolutions: list[int]) -> dict[str, Any]:
    """FastGen's recipe at ``arch``: static bytes, activation bytes per sample, and per GPU count the largest
    micro-batch that fits GPU_GIB with the accumulation rounds it needs."""
    s, _ = variant("fastgen_dmd2_cifar10", arch, torch.device("cpu"), resolutions)
    g = s.model.guidance
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    trained = count(s.model.generator) + count(g.fake_unet) + count(g.discriminator)
    static = 4 * (trained * 4 + count(g.real_unet))  # weights + gradients + two AdamW moments; the teacher's weights
    probe = 2
    x = batch(probe, torch.device("cpu"))
    per_sample = max(saved_bytes(lambda: distill_step(s, x, 4)), saved_bytes(lambda: distill_step(s, x, 0))) / probe
    rows = []
    for gpus in (1, 4, 8):
        fits = [m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1)
                if GLOBAL_BATCH % (m * gpus) == 0 and static + m * per_sample <= GPU_GIB * 2**30]
        m = fits[0] if fits else None
        rows.append({"gpus": gpus, "micro_batch": m, "rounds": GLOBAL_BATCH // (m * gpus) if m else None,
                     "gib_per_gpu": (static + m * per_sample) / 2**30 if m else None,
                     "gib_at_256": (static + 256 * per_sample) / 2**30})
    return {"arch": arch, "trained_parameters": trained, "teacher_parameters": count(g.real_unet),
            "static_gib": static / 2**30, "activation_mib_per_sample": per_sample / 2**20, "gpus": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny widths (seconds)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    arch, mem_arch = ("simple_unet_tiny", "simple_unet_tiny") if args.tiny else ("simple_unet_small", "edm_unet")
    resolutions = [32] if args.tiny else [32, 16, 8]
    timer = Timer(torch.device("cpu"), 1, 2 if args.tiny else 5)
    report = {"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
              "steps": step_times(arch, 8 if args.tiny else 16, torch.device("cpu"), timer, resolutions),
              "memory": memory(mem_arch, [32] if args.tiny else [32, 16, 8])}
    for name, r in report["steps"].items():
        print(f"{name:9s} generator iteration {r['generator_iteration_s'] * 1e3:8.1f} ms, critic iteration "
              f"{r['critic_iteration_s'] * 1e3:8.1f} ms, ratio-5 mean {r['ratio5_mean_s'] * 1e3:8.1f} ms")
    m = report["memory"]
    print(f"memory at {m['arch']}: {m['trained_parameters'] / 1e6:.1f}M trained + {m['teacher_parameters'] / 1e6:.1f}M "
          f"teacher parameters, static {m['static_gib']:.2f} GiB, activations {m['activation_mib_per_sample']:.1f} "
          f"MiB per sample")
    for r in m["gpus"]:
        print(f"  {r['gpus']} GPU(s): micro-batch {r['micro_batch']} x {r['rounds']} rounds = {GLOBAL_BATCH}, "
              f"{r['gib_per_gpu']:.1f} GiB per GPU (256 per GPU would need {r['gib_at_256']:.1f} GiB)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
