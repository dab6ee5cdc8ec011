"""Shared fixtures: tiny generated image-folder data, config composition and CLI runs. No network."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

if os.environ.get("PYTEST_XDIST_WORKER"):
    # parallel test workers (pytest-xdist, one per core): one torch thread each, and in the scripts they start,
    # instead of every process using every core
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
HANG_GUARD_S = 1800  # subprocess timeouts only catch a hung process: a loaded machine must not fail a test

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
os.environ.setdefault("WANDB_SILENT", "true")


def make_image_folder(root: Path, num_classes: int = 10, per_class: int = 2, size: int = 32) -> Path:
    """Class folders of solid-ish coloured PNGs: class c has mean brightness rising with c."""
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([20 + 20 * c, 200 - 15 * c, 100 + 10 * (i % 3)], dtype=np.float64)
            img = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``build`` once per test run. Under pytest-xdist every worker has its own
    session; the workers share such a folder in their common temporary folder: the first one builds it under a
    file lock, the others wait for it and reuse it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir(parents=True)
            build(folder)
            (folder / ".built").touch()
    return folder


# the Optuna sweeper is opt-in (pip install -e ".[sweep]"; CI installs it): its tests skip without it
needs_sweeper = pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                                   reason='the Optuna sweeper is not installed (pip install -e ".[sweep]")')


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_once(tmp_path_factory, "data", lambda folder: make_image_folder(folder / "tiny")) / "tiny"


def compose_cfg(overrides: list[str], config_name: str = "config", return_hydra_config: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)


def run_cli(script: str, *overrides: str, env: dict[str, str] | None = None, timeout: int = HANG_GUARD_S,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would (a subprocess, real Hydra CLI)."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


SMOKE = ["debug=smoke", "logger=none"]


class TinyFeatures(torch.nn.Module):
    """Random two-layer conv net: float images [B,3,H,W] in [0,255] -> [B,8]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x / 127.5 - 1.0))
        return 10.0 * torch.relu(self.conv2(h)).mean(dim=(2, 3))


@pytest.fixture(scope="session")
def featnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small TorchScript feature network file (tiny-featnet.ts.pt: its distances are "FD (tiny-featnet)")."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("featnet") / "tiny-featnet.ts.pt"
    torch.jit.script(TinyFeatures().eval()).save(str(path))
    return path


def train_eval_args(featnet: Path, reference: Path, cache: Path, every: int = 2, num: int = 30,
                    prefix: str = "eval.") -> list[str]:
    """Overrides for the evaluation inside training (or evaluate.py with prefix ""), measured with the tiny
    feature network against a reference folder at native resolution."""
    return [f"{prefix}feature_network.name=torchscript", f"{prefix}feature_network.path={featnet}",
            f"{prefix}feature_network.resize=none", f"{prefix}reference.name=folder",
            f"{prefix}reference.folder={reference}", f"{prefix}reference.cache_dir={cache}",
            f"{prefix}num_samples={num}", f"{prefix}batch_size=8"] + ([f"eval_every={every}"] if prefix else [])


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A tiny teacher trained for a few steps through the real CLI (shared by the distill tests)."""
    def train(out: Path) -> None:
        proc = run_cli("train.py", *SMOKE, "stage=teacher", "data=image_folder", f"data.root={tiny_data}",
                       f"output_dir={out}", "hydra.run.dir=" + str(out / "hydra"))
        assert proc.returncode == 0, proc.stderr[-3000:]

    return build_once(tmp_path_factory, "teacher", train) / "teacher_final.pt"


@pytest.fixture(scope="session")
def dmd2_run(tmp_path_factory: pytest.TempPathFactory, teacher_ckpt: Path, tiny_data: Path) -> Path:
    """A tiny distillation (5 steps, generator every 2nd, generator EMA) through the real CLI, logged to an
    offline W&B run with ``logger.log_checkpoints``: its output folder (dmd2_final.pt, generator/, wandb/)."""
    def distill(out: Path) -> None:
        proc = run_cli("train.py", "debug=smoke", "logger=wandb", "logger.log_checkpoints=true", "stage=distill",
                       "data=image_folder", f"data.root={tiny_data}", f"teacher_checkpoint={teacher_ckpt}",
                       f"output_dir={out}", "max_steps=5", "dfake_gen_update_ratio=2", "generator_ema_decay=0.9",
                       f"hydra.run.dir={out / 'hydra'}", env={"WANDB_MODE": "offline"})
        assert proc.returncode == 0, proc.stderr[-3000:]

    return build_once(tmp_path_factory, "dmd2", distill)


def wandb_records(run_folder: Path) -> list:
    """The records of the offline W&B run under ``run_folder``/wandb (W&B's .wandb file: a 7-byte header, then
    LevelDB-log framing of protobuf ``Record`` messages in 32 KiB blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list(Path(run_folder).glob("wandb/offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, records, buffer = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buffer = chunk if kind in (1, 2) else buffer + chunk  # FULL / FIRST start a record, MIDDLE / LAST extend
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buffer)
            records.append(record)
            buffer = b""
    return records


def wandb_artifacts(records: list) -> dict[str, tuple[str, list[str]]]:
    """Artifacts a run logged (tables' own run_table artifacts left out): name -> (type, sorted aliases)."""
    return {r.artifact.name: (r.artifact.type, sorted(r.artifact.aliases)) for r in records
            if r.WhichOneof("record_type") == "artifact" and r.artifact.type != "run_table"}


def assert_trained_alike(a: dict, b: dict, lr: float, what: str) -> None:
    """Two state dicts equal up to rounding. Kernels that sum in another order differ in the last bits, and Adam
    turns such a difference on a near-zero gradient entry (e.g. an attention key bias) into up to one whole step
    (lr); a real mismatch moves most entries. So: every entry within a quarter step, and the mean over all
    entries within a thousandth of a step."""
    assert a.keys() == b.keys(), f"{what}: different tensors"
    diffs = [(a[k].float() - b[k].float()).abs().flatten() for k in a]
    for key, diff in zip(a, diffs):
        assert diff.max() <= 0.25 * lr, f"{what}: {key} differs by up to {diff.max():.2e} (lr {lr})"
    mean = torch.cat(diffs).mean()
    assert mean <= 1e-3 * lr, f"{what}: entries differ by {mean:.2e} on average (lr {lr})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (stable otherwise): the parallel workers start the long runs together and fill the end with
    short tests, instead of one worker finishing a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
