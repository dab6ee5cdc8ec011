"""What a run does when its disk fills, its folder is taken, it is resumed with other settings, or it is told to
stop: it survives or refuses with a clear message, and never loses or mixes work."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dmd2.io.checkpoint as checkpoint
from dmd2.config.errors import ConfigError, FileError
from dmd2.io.checkpoint import load_checkpoint
from dmd2.train.folder import LOCK_FILE, acquire_lock
from tests.conftest import HANG_GUARD_S, ROOT, SMOKE, compose_cfg, run_cli


def teacher_cfg(tiny_data: Path, out: Path, *extra: str):
    return compose_cfg([*SMOKE, "data=image_folder", f"data.root={tiny_data}", f"output_dir={out}", *extra])


def test_a_failing_periodic_write_of_any_kind_is_survived(monkeypatch, tiny_data, tmp_path):
    """torch.save on a full disk raises RuntimeError ("unexpected pos"), not OSError: the run must go on."""
    from train import train

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if obj["step"] == 2:  # the periodic checkpoint of step 2 (the final one is step 4)
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    train(teacher_cfg(tiny_data, tmp_path))
    assert (tmp_path / "teacher_final.pt").is_file() and not (tmp_path / "teacher_000002.pt").exists()
    assert not list(tmp_path.glob(".tmp-*")), "the half-written temporary file must be removed"


def test_a_failing_final_write_keeps_the_weights(monkeypatch, tiny_data, tmp_path):
    from train import train

    real_save = checkpoint.save_checkpoint
    rescue = tmp_path / "rescue"
    monkeypatch.setenv("DMD2_RESCUE_DIR", str(rescue))

    def unwritable_output(state, path):
        if str(tmp_path / "run") in os.path.abspath(path):
            raise OSError(30, "Read-only file system")
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", unwritable_output)
    with pytest.raises(FileError, match="rescue"):  # the output folder that took no file
        train(teacher_cfg(tiny_data, tmp_path / "run", "save_every=100"))
    (saved,) = rescue.glob("*teacher_final.pt")
    assert load_checkpoint(str(saved))["step"] == 4


@pytest.mark.slow
def test_an_unwritable_output_dir_is_refused_before_any_work(tiny_data, tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    try:
        if os.access(target, os.W_OK):  # running as root: a file where a folder is expected instead
            target.chmod(0o700)
            target = tmp_path / "file"
            target.write_text("not a folder")
        proc = run_cli("train.py", *SMOKE, "data=image_folder", f"data.root={tiny_data}", f"output_dir={target}",
                       f"hydra.run.dir={tmp_path / 'h'}")
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert proc.returncode != 0 and "'output_dir'" in proc.stderr and "writable" in proc.stderr, proc.stderr[-2000:]
    assert "[teacher]" not in proc.stdout  # refused before the data and the model


def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_owner_is_taken_over(tmp_path, caplog):
    caplog.set_level("INFO")
    lock = acquire_lock(str(tmp_path))
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        acquire_lock(str(tmp_path))
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    # a lock left by a process that no longer exists (SIGKILL, reboot) is taken over, with a message
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                  "started": "earlier"}))
    lock = acquire_lock(str(tmp_path))
    assert "taking over" in caplog.text
    lock.release()


@pytest.mark.slow
def test_two_runs_started_together_in_one_folder_do_not_mix(tiny_data, tmp_path):
    common = [sys.executable, str(ROOT / "train.py"), *SMOKE, "data=image_folder", f"data.root={tiny_data}",
              f"output_dir={tmp_path / 'shared'}", "max_steps=6"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    procs = [subprocess.Popen([*common, f"seed={s}", f"hydra.run.dir={tmp_path / f'h{s}'}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for s in (1, 2)]
    results = [(p.wait(timeout=HANG_GUARD_S), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    refused = next(err for code, err in results if code != 0)
    assert "is in use by" in refused
    rows = [json.loads(line) for line in (tmp_path / "shared" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)), "one run's metrics only"


def test_orphan_temporary_checkpoints_are_removed_at_the_next_start(tiny_data, tmp_path):
    from train import train

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".tmp-abc123.pt").write_bytes(b"half a checkpoint")
    train(teacher_cfg(tiny_data, tmp_path, "max_steps=1"))
    assert not (tmp_path / ".tmp-abc123.pt").exists()


def test_resume_applies_safe_changes_and_refuses_the_others(tiny_data, tmp_path):
    from train import train

    train(teacher_cfg(tiny_data, tmp_path, "max_steps=2", "lr=1e-4"))
    with pytest.raises(ConfigError, match="batch_size"):
        train(teacher_cfg(tiny_data, tmp_path, "resume=auto", "max_steps=4", "batch_size=4"))
    assert load_checkpoint(str(tmp_path / "teacher_final.pt"))["step"] == 2, "a refused resume changes nothing"
    assert "batch_size: 8" in (tmp_path / "config.yaml").read_text()
    train(teacher_cfg(tiny_data, tmp_path, "resume=auto", "max_steps=4", "lr=5e-4", "weight_decay=0.1"))
    state = load_checkpoint(str(tmp_path / "teacher_final.pt"))
    groups = state["updater"]["optimizer"]["param_groups"]
    assert state["step"] == 4 and state["config"]["lr"] == 5e-4
    assert groups[0]["lr"] == 5e-4 and groups[0]["weight_decay"] == 0.1  # the new values really ran
    # explicitly allowed: the change runs and is recorded
    train(teacher_cfg(tiny_data, tmp_path, "resume=auto", "max_steps=6", "batch_size=4", "resume_allow_changes=true"))
    state = load_checkpoint(str(tmp_path / "teacher_final.pt"))
    assert state["step"] == 6 and state["config"]["batch_size"] == 4


@pytest.mark.slow
def test_a_stop_signal_saves_a_checkpoint_and_resume_loses_nothing(tiny_data, tmp_path, caplog):
    """SIGUSR1, the signal schedulers send before a time limit (SIGTERM: the torchrun test). The signal is sent to
    a real run as soon as its training loop has started (metrics.jsonl appears then; the loop checks for a stop
    after each step, so it stops at step 1 or later), long before its 100 steps end; the resume and the
    uninterrupted run for comparison run in this process."""
    from train import train

    sig = signal.SIGUSR1
    args = [*SMOKE, "data=image_folder", f"data.root={tiny_data}", "max_steps=100", "save_every=1000",
            "log_every=1000", "sample_every=0"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"output_dir={out}",
                             f"hydra.run.dir={tmp_path / 'h1'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    deadline = time.time() + HANG_GUARD_S
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:  # training has started
        time.sleep(0.05)
    proc.send_signal(sig)
    code = proc.wait(timeout=HANG_GUARD_S)
    stderr = proc.stderr.read()
    assert code == 128 + int(sig) == 138, stderr[-2000:]
    (saved,) = out.glob("teacher_0*.pt")
    step = load_checkpoint(str(saved))["step"]
    assert 0 < step < 100 and f"stopped at step {step}" in stderr
    caplog.set_level("INFO")
    assert train(compose_cfg([*args, f"output_dir={out}", "resume=auto", "max_steps=100"]))["steps"] == 100
    assert f"[resume] continuing {saved}" in caplog.text
    train(compose_cfg([*args, f"output_dir={tmp_path / 'whole'}"]))
    a = load_checkpoint(str(out / "teacher_final.pt"))
    b = load_checkpoint(str(tmp_path / "whole" / "teacher_final.pt"))
    assert a["step"] == b["step"] == 100
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_start_refused_while_building_leaves_the_folder_as_it_was(teacher_ckpt, tiny_data, tmp_path):
    """The explicit arch contradicts the teacher: refused after the teacher is loaded, before anything is written."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("kept\n")
    proc = run_cli("train.py", *SMOKE, "stage=distill", "data=image_folder", f"data.root={tiny_data}",
                   f"teacher_checkpoint={teacher_ckpt}", "arch=simple_unet_small", f"output_dir={out}",
                   f"hydra.run.dir={tmp_path / 'h'}")
    assert proc.returncode != 0 and "contradicts the teacher checkpoint" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "kept\n"
