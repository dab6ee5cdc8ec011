"""What a person sees during a run: status lines without a terminal (also in train.log), rates and ETAs that count
training steps only, progress lines of long phases, and one folder per run (none for a refused start)."""
from __future__ import annotations

import logging
import re
import time

import pytest
import torch

from dmd2.runtime.progress import Progress, clock
from dmd2.train.loop import Plan, TrainingProgress
from tests.conftest import SMOKE, run_cli

STATUS = re.compile(r"\[teacher\] step +(\d+)/4 kimg ([\d.]+) +s/step ([\d.]+) +eta [\d:]+ +loss [\d.]+ +cpumem")


def test_the_status_line_has_step_kimg_seconds_per_step_eta_losses_and_memory():
    shown = TrainingProgress("lines", Plan(0, 1000, 100, 64), "distill", "train/loss_fake", torch.device("cpu"), True)
    line = shown.status(500, {"train/loss_fake": 0.797, "train/loss_dm": 0.125, "train/kimg": 32.0})
    assert shown.bar is None  # lines: no bar
    assert re.match(r"\[distill\] step  500/1000 kimg 32\.000 +s/step [\d.]+ +eta \d:\d\d:\d\d +loss_fake 0\.7970 +"
                    r"loss_dm 0\.1250 +cpumem [\d.]+ GB$", line), line


def test_time_spent_in_evaluations_is_not_training_time():
    shown = TrainingProgress("lines", Plan(0, 100, 10, 8), "teacher", "train/loss", torch.device("cpu"), True)
    with shown.paused():  # an evaluation of 0.3 s after no training at all
        time.sleep(0.3)
    assert shown.seconds_per_step(10) < 0.02


def test_a_long_phase_without_a_terminal_logs_count_share_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="dmd2.runtime.progress")
    with Progress(100, "[reference]", "images", bar=False, every_s=0.0) as p:
        p.update(25)
        p.update(75)
    lines = [r.getMessage() for r in caplog.records]
    assert re.match(r"\[reference\] 25/100 images \(25%\), [\d.]+ images/s, ETA \d:\d\d:\d\d$", lines[0]), lines
    assert lines[-1].startswith("[reference] 100/100 images in 0:00:00")
    assert clock(3725) == "1:02:05" and clock(float("nan")) == "?"


@pytest.mark.slow
def test_a_run_without_a_terminal_writes_status_lines_and_keeps_its_log_in_output_dir(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train.py", *SMOKE, f"output_dir={out}", cwd=tmp_path)  # stdout, stderr: pipes
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = [m.groups() for m in map(STATUS.search, proc.stdout.splitlines()) if m]
    assert [int(step) for step, _, _ in printed] == [1, 2, 3, 4]  # log_every=1
    assert float(printed[-1][1]) == pytest.approx(4 * 8 / 1000)  # kimg: 4 steps of 8 images
    assert "it/s]" not in proc.stderr and "\r" not in proc.stderr  # no bar
    log = (out / "train.log").read_text()  # the run's log and Hydra's record beside its checkpoints
    assert len(STATUS.findall(log)) == 4 and (out / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_refused_start_leaves_no_folder_behind(tmp_path):
    for extra in ([f"output_dir={tmp_path / 'new' / 'run'}"], []):
        proc = run_cli("train.py", *SMOKE, "lr=-1", *extra, cwd=tmp_path)
        assert proc.returncode == 2 and "config key 'lr'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_reference_statistics_report_their_progress_with_a_count(featnet, tiny_data, tmp_path, caplog, monkeypatch):
    import dmd2.runtime.progress as progress
    from dmd2.eval.features import build_feature_network
    from dmd2.eval.references import reference_statistics

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a line at every update (30 s apart in a real run)
    caplog.set_level(logging.INFO)
    net = build_feature_network("torchscript", torch.device("cpu"), path=str(featnet), resize="none")
    reference_statistics("folder", net, str(tmp_path / "stats"), folder=str(tiny_data), batch_size=8)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[reference]")]
    assert any(re.match(r"\[reference\] hashing .*tiny: 20/20 files in", line) for line in lines), lines
    assert any(re.match(r"\[reference\] tiny: features of 8/20 images \(40%\), .*ETA", line) for line in lines), lines
    assert any(re.match(r"\[reference\] tiny: features of 20/20 images in", line) for line in lines), lines


@pytest.mark.slow
def test_a_refused_start_in_an_earlier_runs_folder_leaves_its_record_as_it_was(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train.py", *SMOKE, "max_steps=1", f"output_dir={out}", cwd=tmp_path).returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_cli("train.py", *SMOKE, "max_steps=2", f"output_dir={out}", cwd=tmp_path)  # no resume: refused
    assert proc.returncode == 2 and "holds an earlier run" in proc.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
