"""benchmarks/bench.py's FID feature-network and data-loading measurements."""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_tools import FEATNET, INCEPTION, RESOLUTION, Memory, Timer  # noqa: E402
from torch import nn  # noqa: E402

from dmd2.data.batches import CachedBatches, build_loader  # noqa: E402
from dmd2.data.datasets import EDMDataset, build_dataset


def small_feature_net() -> nn.Module:
    """Stand-in with the shape of cifar10-featnet-dev: three conv stages (32/64/128), global max-pool, 128-d."""
    def stage(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                             nn.ReLU(), nn.MaxPool2d(2))
    body = nn.Sequential(stage(3, 32), stage(32, 64), stage(64, 128), nn.AdaptiveMaxPool2d(1), nn.Flatten())

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x / 127.5 - 1.0)

    return Net().eval()


def bench_features(device: torch.device, args: argparse.Namespace, timer: Timer, mem: Memory) -> dict[str, Any]:
    b = args.batch_size
    if FEATNET.is_file() and not args.no_featnet:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.jit.load(str(FEATNET), map_location=device).eval()
        name = f"TorchScript {FEATNET} (cifar10-featnet-dev, 128-d, native 32x32)"
    else:
        net = small_feature_net().to(device)
        name = "small conv net built in bench.py (3 conv stages 32/64/128, max-pool, 128-d; random weights)"
    u8 = torch.randint(0, 256, (b, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8, device=device)

    def run() -> None:
        with torch.no_grad():
            net(u8.float())

    mem.reset()
    res = timer(run, b)
    res["peak_mem_mb"] = mem.peak_mb()
    res["network"] = name
    res["input"] = "uint8 [B,3,32,32] -> float in [0, 255], no resize"
    if INCEPTION.is_file():
        res["inception"] = bench_inception(device, args, timer)
    else:
        res["inception"] = {"skipped": f"clean-fid's Inception weights are not at {INCEPTION} (offline machine); "
                                       "not measured"}
    return res


def bench_inception(device: torch.device, args: argparse.Namespace, timer: Timer) -> dict[str, Any]:
    try:
        from cleanfid.inception_torchscript import InceptionV3W

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = InceptionV3W(str(INCEPTION.parent), download=False, resize_inside=False).to(device).eval()
    except Exception as err:  # a stand-in file, an old clean-fid, ...
        return {"skipped": f"could not load clean-fid's Inception from {INCEPTION}: {type(err).__name__}: {err}"}
    b = args.batch_size
    x = torch.rand(b, 3, 299, 299, device=device) * 255

    def run() -> None:
        with torch.no_grad():
            net(x)

    res = timer(run, b, warmup=1, iters=max(2, args.iters // 2))
    res["input"] = "float [B,3,299,299] in [0, 255] (the clean resize itself, on the CPU, is not included)"
    return res


# ----------------------------------------------------------------------------------------------- data


def data_settings(path: Path) -> dict[str, Any]:
    """The ``data`` settings of a dataset path: EDM's format (a .zip, or a folder with dataset.json) at its own
    image size, or a class-folder tree at 32x32."""
    if path.is_file() or (path / "dataset.json").is_file():
        raw = EDMDataset(str(path), lambda image: image)
        num_classes = max(raw.targets) + 1 if raw.labelled else 0
        return {"name": "edm_dataset", "root": str(path), "num_classes": num_classes,
                "resolution": raw[0][0].size[0]}
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    return {"name": "image_folder", "root": str(path), "num_classes": len(classes), "resolution": RESOLUTION}


def bench_data(folder: Path, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of the runners' batch sources on a dataset (decoding, transform, collation, copy to ``device``):
    DataLoader with N workers, and CachedBatches (after its one-time decode, timed separately)."""
    settings = data_settings(folder)
    ds = build_dataset(settings)
    b, n = args.batch_size, args.data_batches
    out: dict[str, Any] = {"folder": str(folder), "format": settings["name"], "resolution": settings["resolution"],
                           "images": len(ds), "batch_size": b, "batches_timed": n}

    def rate(batches: Any) -> float:
        it = iter(batches)
        next(it)  # workers start, first batch
        t = time.perf_counter()
        for _ in range(n):
            x, y = next(it)
            x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return b * n / (time.perf_counter() - t)

    for w in args.data_workers:
        out[f"loader_workers_{w}"] = {"images_per_sec": rate(build_loader(ds, b, w, 0, device.type == "cuda"))}
        print(f"[bench]   data: DataLoader, {w} workers done", file=sys.stderr, flush=True)
    t = time.perf_counter()
    cached = CachedBatches(ds, b, 0, device, num_workers=max(args.data_workers))
    out["cache"] = {"build_seconds": time.perf_counter() - t, "decode_workers": max(args.data_workers),
                    "bytes": cached.images.numel() if cached.images is not None else 0,
                    "images_per_sec": rate(cached)}
    return out
