"""Shared pieces of benchmarks/bench.py: settings from conf/, the machine, timers, memory, inputs."""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from dmd2.config.settings import TeacherSettings  # noqa: E402
from dmd2.io.weights import build_denoiser  # noqa: E402
from dmd2.runtime.perf import prepare_network  # noqa: E402

CONF = ROOT / "conf"
FEATNET = Path("/work/shared/models/cifar10-featnet-dev.ts.pt")
INCEPTION = Path("/tmp/inception-2015-12-05.pt")  # clean-fid's default location of its Inception weights
NUM_CLASSES, RESOLUTION = 10, 32
FOUR_STEP_SIGMAS = (80.0, 2.5, 0.6, 0.1)  # the README's 4-step example (conf/experiment/dmd2_cifar10_4step.yaml)
HEUN_STEPS = 18  # 2 * 18 - 1 = 35 network evaluations
DEFAULT_ARCHS = ["simple_unet_small", "simple_unet"]
TINY_ARCHS = ["simple_unet", "edm_unet"]
# --tiny: widths small enough for a whole run in well under a minute on two CPU cores
TINY_WIDTHS = {
    "simple_unet": {"channels": [16, 32], "noise_emb_dim": 16, "emb_dim": 32, "groups": 4, "attn_resolutions": []},
    "edm_unet": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [16]},
}


# --------------------------------------------------------------------------------------------- configuration


def stage_settings(stage: str, arch: str | None = None) -> DictConfig:
    """The settings a ``python train.py stage=<stage> [arch=<arch>]`` run would use, composed by Hydra from conf/
    and the schemas of dmd2/config/settings.py (the one place they are defined)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    overrides = [f"stage={stage}", "logger=none"] + ([f"arch={arch}"] if arch else [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        try:
            return compose(config_name="config", overrides=overrides)
        except MissingConfigException as err:
            available = sorted(p.stem for p in (CONF / "arch").glob("*.yaml"))
            raise SystemExit(f"--arch {arch}: not in conf/arch (available: {', '.join(available)})") from err


def load_arch(name: str) -> dict[str, Any]:
    """The arch dict of ``python train.py arch=<name>``."""
    arch = OmegaConf.to_container(stage_settings("teacher", name).arch, resolve=True)
    if arch.get("name") == "from_teacher":  # type: ignore[union-attr]
        raise SystemExit("--arch from_teacher names no network; pick a preset such as simple_unet")
    return arch  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_num_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "device": str(device), "device_name": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------- timing


class Timer:
    """Median wall time of a callable after warm-up; CUDA synchronised around every timed iteration."""

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], Any], batch: int, warmup: int | None = None, iters: int | None = None
                 ) -> dict[str, Any]:
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.iters if iters is None else iters):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return self.summary(times, batch)

    @staticmethod
    def summary(times: list[float], batch: int) -> dict[str, Any]:
        med = statistics.median(times)
        return {"seconds_median": med, "seconds_min": min(times), "seconds_max": max(times), "iters": len(times),
                "images_per_sec": batch / med}

    def rounds(self, fns: dict[str, Callable[[], Any]], batch: int, warmup: int | None = None,
               iters: int | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
        """Time several callables in interleaved rounds (each round runs each once, in order).
        Returns (summary per name, the per-round times per name)."""
        for _ in range(self.warmup if warmup is None else warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(self.iters if iters is None else iters):
            for name, fn in fns.items():
                self.sync()
                t0 = time.perf_counter()
                fn()
                self.sync()
                times[name].append(time.perf_counter() - t0)
        return {name: self.summary(t, batch) for name, t in times.items()}, times


class Memory:
    """Peak memory of a section: CUDA max_memory_allocated (reset per section), or on the CPU the process's
    max RSS so far (ru_maxrss: a high-water mark of the whole process, so it never goes down between sections)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ("torch.cuda.max_memory_allocated, reset before each section" if device.type == "cuda"
                     else "process max RSS so far (resource.getrusage ru_maxrss; cumulative over sections)")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ----------------------------------------------------------------------------------------------- networks


def perf_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The runners' ``perf`` config node as this benchmark's switches set it."""
    return {"tf32": args.tf32, "cudnn_benchmark": True, "channels_last": args.channels_last, "compile": args.compile,
            "fused_adamw": args.fused_adamw}


def prepare(net: nn.Module, args: argparse.Namespace) -> nn.Module:
    """--channels-last / --compile, in place, as the runners apply them (dmd2.runtime.perf.prepare_network)."""
    return prepare_network(net, perf_settings(args))


def images(shape: tuple[int, ...], device: torch.device, channels_last: bool) -> torch.Tensor:
    """Standard normal [..., C, H, W]; with channels_last every [B, C, H, W] slice has channels-last strides."""
    if not channels_last:
        return torch.randn(shape, device=device)
    *lead, c, h, w = shape
    return torch.randn(*lead, h, w, c, device=device).movedim(-1, -3)


def labels(batch: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (batch,), device=device)


def build(arch: dict[str, Any], device: torch.device) -> nn.Module:
    return build_denoiser(arch, NUM_CLASSES, RESOLUTION, TeacherSettings().sigma_data).to(device)
