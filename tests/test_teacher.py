"""The teacher stage through the real CLI, its checkpoint, and fast refusal of bad input."""
from __future__ import annotations

import json
import time

import pytest
import torch

from dmd2.data.batches import total_steps
from dmd2.io.checkpoint import load_checkpoint, network_from_checkpoint
from dmd2.io.weights import build_denoiser
from dmd2.train.logger import RunningMeans
from dmd2.train.optim import ema_decay_at, ema_update
from tests.conftest import SMOKE, run_cli, wandb_artifacts, wandb_records


@pytest.mark.slow
def test_teacher_cli_writes_checkpoints_samples_and_offline_wandb(tiny_data, tmp_path):
    out = tmp_path / "teacher"
    proc = run_cli("train.py", "debug=smoke", "logger=wandb", "logger.log_checkpoints=true", "stage=teacher",
                   "data=image_folder", f"data.root={tiny_data}", f"output_dir={out}",
                   f"hydra.run.dir={tmp_path / 'hydra'}", env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = load_checkpoint(str(out / "teacher_final.pt"))["wandb_run_id"]
    assert wandb_artifacts(wandb_records(out)) == {f"teacher-{run_id}": ("model", ["final", "latest", "step-4"])}
    log = (tmp_path / "hydra" / "train.log").read_text()  # Hydra's log file holds the run's messages
    assert "[INFO]" in log and "[teacher] done" in log
    assert (out / "teacher_final.pt").is_file() and (out / "teacher_000002.pt").is_file()  # save_every=2, 4 steps
    assert not (out / "teacher_000004.pt").exists()  # the last step is saved once, as teacher_final.pt
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run folder missing"
    assert (out / "samples" / "samples_teacher_ema_000004.png").is_file()
    assert (tmp_path / "hydra" / ".hydra" / "config.yaml").is_file()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["train/loss"] > 0 for r in rows)

    state = load_checkpoint(str(out / "teacher_final.pt"), kind="teacher")
    assert state["step"] == 4 and state["config"]["lr"] == 1e-4 and state["config"]["stage"] == "teacher"
    assert {"model", "ema", "updater"} <= set(state) and state["updater"]["skipped"] == 0
    # the file alone rebuilds an identical network
    net = network_from_checkpoint(state, "ema").eval()
    fresh = build_denoiser(state["arch"], state["num_classes"], state["resolution"], 0.5).eval()
    fresh.load_state_dict(state["ema"])
    x, s, y = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 5.0]), torch.tensor([1, 2])
    assert torch.equal(net(x, s, y), fresh(x, s, y))
    # EMA differs from the raw weights after training
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])


@pytest.mark.slow
def test_the_smoke_command_runs_in_a_fresh_folder_without_data(tmp_path):
    """README's first command, as a new user types it, in an empty folder on a machine with no data."""
    proc = run_cli("train.py", "debug=smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (final,) = list(tmp_path.glob("outputs/*/*/teacher_final.pt"))
    assert load_checkpoint(str(final))["class_names"][:3] == ["red", "orange", "yellow"]  # data=synthetic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # nothing downloaded, nothing else written


@pytest.mark.slow
def test_two_runs_in_the_same_second_get_their_own_directories(tiny_data, tmp_path):
    dirs = set()
    for _ in range(2):
        proc = run_cli("train.py", *SMOKE, "max_steps=1", "data=image_folder", f"data.root={tiny_data}",
                       "sample_every=0", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    dirs = {p.parent for p in tmp_path.glob("outputs/*/*/teacher_final.pt")}
    assert len(dirs) == 2


def test_bad_inputs_exit_fast_with_clear_messages(tiny_data, tmp_path):
    cases = [
        (["lrr=1e-4"], "lrr"),
        (["lr=-1"], "'lr' = -1"),
        ([f"data.root={tmp_path / 'nowhere'}"], "data.root"),
        (["batch_size=0"], "'batch_size'"),
    ]
    for overrides, message in cases:
        start = time.perf_counter()
        proc = run_cli("train.py", *SMOKE, "data=image_folder", f"data.root={tiny_data}", *overrides,
                       f"hydra.run.dir={tmp_path / 'h'}")
        assert proc.returncode != 0 and message in proc.stderr, (overrides, proc.stderr[-2000:])
        assert time.perf_counter() - start < 30


def test_schedule_helpers():
    assert total_steps(100, 390, None) == 39000 and total_steps(100, 390, 50) == 50
    assert ema_decay_at(0, 0.9999) == 0.1 and ema_decay_at(10**7, 0.9999) == 0.9999
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.75)
    assert torch.allclose(a.weight, 0.75 * before + 0.25 * b.weight)


def test_running_means_skip_non_finite_values_and_reset():
    window = RunningMeans()
    for v in (1.0, float("nan"), 3.0):
        window.add({"train/loss": torch.tensor(v), "train/bad": torch.tensor(float("inf"))})
    assert window.pop() == {"train/loss": 2.0}  # NaN left out of the mean; an all-inf key left out entirely
    assert window.pop() == {}
