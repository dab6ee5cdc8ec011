"""Hydra multirun sweeps: one folder and one W&B run per job, one W&B group per sweep, failures reported."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli


def test_two_job_sweep_writes_two_runs_in_one_wandb_group(tiny_data, tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-26" / "12-00-00-000001"
    proc = run_cli("train.py", "-m", "debug=smoke", "logger=wandb", "data=image_folder", f"data.root={tiny_data}",
                   "max_steps=1", "sample_every=0", "lr=1e-4,2e-4", f"hydra.sweep.dir={sweep}",
                   env={"WANDB_MODE": "offline"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [next((sweep / str(i) / "wandb").glob("offline-run-*/run-*.wandb")) for i in (0, 1)]
    assert all((sweep / str(i) / "teacher_final.pt").is_file() for i in (0, 1))
    group = b"2026-11-26_12-00-00-000001"
    for run, lr in zip(runs, (b"lr=0.0001", b"lr=0.0002")):
        data = Path(run).read_bytes()
        assert group in data and lr in data  # group and the run name made of the overrides
    assert runs[0].parent != runs[1].parent


def test_a_failing_job_is_reported_and_the_others_complete(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "-m", "debug=smoke", "logger=none", "data=image_folder", f"data.root={tiny_data}",
                   "max_steps=1", "sample_every=0", "lr=-1,1e-4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0  # the sweep as a whole reports failure ...
    assert "lr=-1" in proc.stderr and "config key 'lr' = -1" in proc.stderr  # ... which job and why
    assert (sweep / "1" / "teacher_final.pt").is_file()  # ... and the other job still ran
    assert not (sweep / "0" / "teacher_final.pt").exists()
