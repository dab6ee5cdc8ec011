"""benchmarks/cifar10_quality.sh end to end on the CPU, on a tiny fake CIFAR-10 tarball and feature network."""
from __future__ import annotations

import json
import math
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HANG_GUARD_S, ROOT

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class TinyFeatnet(torch.nn.Module):
    """Random conv net: float images [B,3,H,W] in [0,255] -> [B,8]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x / 127.5 - 1.0))
        return 10.0 * torch.relu(self.conv2(h)).mean(dim=(2, 3))


def make_assets(folder: Path, train_per_class: int = 4, test_per_class: int = 3) -> Path:
    """cifar10-jpeg.tar.gz (cifar10-jpeg/{train,test}/<class>/NNNN.jpg) and cifar10-featnet-dev.ts.pt."""
    rng = np.random.default_rng(0)
    tree = folder / "tree"
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(CLASSES):
            classdir = tree / "cifar10-jpeg" / split / name
            classdir.mkdir(parents=True)
            for i in range(per_class):
                base = np.array([20 + 20 * c, 200 - 15 * c, 100 + 10 * (i % 3)], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(classdir / f"{i:04d}.jpg", quality=75)
    assets = folder / "assets"
    assets.mkdir()
    with tarfile.open(assets / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(tree / "cifar10-jpeg", arcname="cifar10-jpeg")
    torch.manual_seed(0)
    torch.jit.script(TinyFeatnet().eval()).save(str(assets / "cifar10-featnet-dev.ts.pt"))
    return assets


@pytest.mark.slow
def test_cpu_run_reports_three_finite_fds_and_every_stage_throughput(tmp_path: Path) -> None:
    assets = make_assets(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "cifar10_quality.sh"), "--device", "cpu",
                           "--assets", str(assets), "--out", str(out), "--work", str(work),
                           "--samples", "40", "--teacher-steps", "6", "--distill-steps", "4"],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_ok"] and summary["metric"] == "FD (cifar10-featnet-dev)"
    assert summary["reference"]["split"] == "test" and summary["reference"]["num_images"] == 30
    assert [s["name"] for s in summary["stages"]] == ["extract", "reference", "teacher", "fd_teacher_35nfe",
                                                      "fd_teacher_1nfe", "distill", "fd_student", "total"]
    fds = summary["fd"]
    assert set(fds) == {"teacher_35nfe", "teacher_1nfe", "student"}
    for name, nfe in (("teacher_35nfe", 35), ("teacher_1nfe", 1), ("student", 1)):
        assert math.isfinite(fds[name]["value"]) and fds[name]["value"] >= 0, (name, fds[name])
        assert fds[name]["num_samples"] == 40 and fds[name]["nfe"] == nfe
    speeds = summary["images_per_sec"]
    assert set(speeds) == {"teacher_training", "distillation", "sampling_teacher_35nfe", "sampling_teacher_1nfe",
                           "sampling_student"}
    assert all(isinstance(v, float) and v > 0 for v in speeds.values()), speeds
    assert summary["training"]["teacher"]["steps_done"] == 6 and summary["training"]["distill"]["steps_done"] == 4

    text = (out / "summary.txt").read_text()
    assert "FD (cifar10-featnet-dev)" in text and "FID" not in text
    assert "teacher, 35 NFE" in text and "one-step generator" in text
