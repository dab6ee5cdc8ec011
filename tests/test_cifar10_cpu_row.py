"""benchmarks/cifar10_cpu_row.sh refuses bad input before any run starts (its full run takes hours: README)."""
from __future__ import annotations

import subprocess

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "cifar10_cpu_row.sh"


def row(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_refuses_a_data_folder_without_its_splits(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    net = tmp_path / "net.ts.pt"
    net.write_bytes(b"x")
    r = row("--data", str(tmp_path / "data"), "--featnet", str(net), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and "--data must hold train/ and test/" in r.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_a_missing_feature_network_and_unknown_arguments(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
    r = row("--data", str(tmp_path / "data"), "--featnet", str(tmp_path / "nope.pt"), cwd=tmp_path)
    assert r.returncode == 2 and "--featnet must name a TorchScript file" in r.stderr and "nope.pt" in r.stderr
    r = row("--epochs", "3", cwd=tmp_path)
    assert r.returncode == 2 and "unknown argument --epochs" in r.stderr


def test_help_states_the_runs_and_their_cost(tmp_path):
    r = row("--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "official" in r.stdout and "remedies" in r.stdout and "Cost on 2 CPU cores" in r.stdout
    assert "set -euo" not in r.stdout


def test_refuses_a_teacher_seed_that_is_not_a_seed(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
    net = tmp_path / "net.ts.pt"
    net.write_bytes(b"x")
    r = row("--data", str(tmp_path / "data"), "--featnet", str(net), "--out", str(tmp_path / "out"),
            "--teacher-seed", "-1", cwd=tmp_path)
    assert r.returncode == 2 and "--teacher-seed must be a non-negative integer" in r.stderr
    assert not (tmp_path / "out").exists()
