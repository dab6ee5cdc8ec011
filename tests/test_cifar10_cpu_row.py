"""benchmarks/cifar10_cpu_row.sh: its refusals of bad input before any run starts, and its flow with train.py and
evaluate.py stood in for (a full run takes hours: README)."""
from __future__ import annotations

import os
import subprocess
import sys

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


def test_refuses_an_unknown_variant_and_names_the_choices(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
    net = tmp_path / "net.ts.pt"
    net.write_bytes(b"x")
    for bad in ("official,fastgen", "", "official,,ema"):
        r = row("--data", str(tmp_path / "data"), "--featnet", str(net), "--out", str(tmp_path / "out"),
                "--variants", bad, cwd=tmp_path)
        assert r.returncode == 2 and "--variants must be a comma-separated list of official, remedies, ema" in r.stderr
    assert not (tmp_path / "out").exists()
    assert "ema " in row("--help", cwd=tmp_path).stdout


FAKE_PYTHON = """#!/usr/bin/env bash
# train.py / evaluate.py stand-ins that log their arguments and write what the script reads; the rest is Python
case "$1" in
  train.py|evaluate.py)
    echo "$*" >> "$CALLS"
    for a in "$@"; do case "$a" in output_dir=*) out="${a#output_dir=}" ;; checkpoint=*) ck="${a#checkpoint=}" ;;
                                    seed=*) seed="${a#seed=}" ;; esac; done
    mkdir -p "$out"
    if [ "$1" = train.py ]; then mkdir -p "$out/generator"; touch "$out/teacher_final.pt"
    else printf '[{"checkpoint": "%s", "seed": %s, "value": 1.5, "std": 0.1}]' "$ck" "$seed" > "$out/results.json"; fi ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def test_runs_each_variant_named_and_reuses_a_teacher_measurement(tmp_path):
    """The script's flow with train.py / evaluate.py stood in for: one distillation per --variants entry, each with
    its overrides, one summary row each; a rerun with --teacher keeps the teacher FDs that measured that checkpoint."""
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
    net = tmp_path / "net.ts.pt"
    net.write_bytes(b"x")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "CALLS": str(calls)}
    args = ["bash", str(SCRIPT), "--data", str(tmp_path / "data"), "--featnet", str(net), "--out", str(tmp_path / "out"),
            "--variants", "official,ema", "--distill-epochs", "1"]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    distills = [line for line in lines if line.startswith("train.py stage=distill")]
    assert len(distills) == 2 and sum("stage=teacher" in line for line in lines) == 1
    ema = next(line for line in distills if "distill_ema" in line)
    assert "generator_ema_decay=0.99" in ema and "generator_ema_warmup=true" in ema and "lr_decay=none" in ema
    assert not any("distill_remedies" in line for line in lines)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "| student, official | 1.50 | 0.10 |" in summary and "| student, ema | 1.50 |" in summary
    assert "remedies" not in summary
    # a second seed on the same teacher, its FDs measured with the first seed: only the students are redone
    teacher = tmp_path / "out" / "teacher" / "teacher_final.pt"
    calls.unlink()
    r = subprocess.run(args + ["--teacher", str(teacher), "--seed", "1", "--teacher-seed", "0"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    assert not any("stage=teacher" in line for line in lines)
    assert sum(line.startswith("evaluate.py") for line in lines) == 2     # the two students only
    assert "seed 1 (teacher's FDs: seed 0)" in (tmp_path / "out" / "summary.txt").read_text()
