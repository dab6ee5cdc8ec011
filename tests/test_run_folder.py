"""A run folder belongs to one run, and what a run writes besides its checkpoints never stops it: a full disk
while writing metrics or samples, an unusable rescue folder, a lock left on another host, several processes
taking over one stale lock, the files a killed export left, the modes of written files."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dmd2.io.checkpoint as checkpoint
import dmd2.train.context as run
import dmd2.train.logger as run_logger
from dmd2.config.errors import ConfigError, FileError
from dmd2.io.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from dmd2.io.files import atomic_write
from dmd2.train.folder import LOCK_FILE, acquire_lock
from tests.conftest import ROOT, SMOKE, compose_cfg

TAKE_OVER_ENV = "DMD2_TAKE_OVER_LOCK"


def teacher_cfg(tiny_data: Path, out: Path, *extra: str):
    return compose_cfg([*SMOKE, "data=image_folder", f"data.root={tiny_data}", f"output_dir={out}", *extra])


def metrics_rows(folder: Path) -> list[dict]:
    text = (folder / "metrics.jsonl").read_text()
    assert text == "" or text.endswith("\n"), "a cut-off last line"
    return [json.loads(line) for line in text.splitlines()]


def test_a_full_disk_mid_run_stops_no_side_write(monkeypatch, tiny_data, tmp_path, caplog):
    """The disk fills after the 4th metrics row: metrics rows, sample grids and checkpoints fail from then on (a
    row half-written), yet the run trains to its end and its final checkpoint goes to the rescue folder."""
    out, rescue = tmp_path / "run", tmp_path / "rescue"
    monkeypatch.setenv("DMD2_RESCUE_DIR", str(rescue))
    disk = {"full": False}
    real_write, real_save, real_image = os.write, checkpoint.save_checkpoint, run_logger.save_image
    real_picture = run_logger.save_picture
    real_log = run_logger.RunLogger.log

    def full() -> OSError:
        return OSError(errno.ENOSPC, "No space left on device")

    def log(self, metrics, step):
        disk["full"] = step > 4
        return real_log(self, metrics, step)

    def write(fd, data):
        if disk["full"] and os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            real_write(fd, data[: len(data) // 2])
            raise full()
        return real_write(fd, data)

    def save(state, path):
        if disk["full"] and str(out) in os.path.abspath(path):
            raise full()
        return real_save(state, path)

    def image(*args, **kwargs):
        if disk["full"]:
            raise full()
        return real_image(*args, **kwargs)

    def picture(*args, **kwargs):
        if disk["full"]:
            raise full()
        return real_picture(*args, **kwargs)

    monkeypatch.setattr(run_logger.RunLogger, "log", log)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    monkeypatch.setattr(run_logger, "save_image", image)
    monkeypatch.setattr(run_logger, "save_picture", picture)
    caplog.set_level("INFO")
    from train import train

    with pytest.raises(FileError, match="rescue"):
        train(teacher_cfg(tiny_data, out, "max_steps=8", "log_every=1", "save_every=3", "sample_every=2"))
    monkeypatch.undo()
    (saved,) = rescue.glob("*teacher_final.pt")
    assert load_checkpoint(str(saved))["step"] == 8, "trained to the end"
    assert [r["step"] for r in metrics_rows(out)] == [1, 2, 3, 4], "whole rows only"
    assert load_checkpoint(str(out / "teacher_000003.pt"))["step"] == 3
    errors = [r.getMessage() for r in caplog.records if "[logger] ERROR" in r.getMessage()]
    assert len(errors) == 2 and any("metrics.jsonl" in e for e in errors) and any(".png" in e for e in errors)
    assert not (out / LOCK_FILE).exists()


def test_resume_drops_rows_past_its_step_and_a_cut_off_line(tiny_data, tmp_path):
    from train import train

    train(teacher_cfg(tiny_data, tmp_path, "max_steps=4", "save_every=2", "log_every=1", "sample_every=0"))
    (tmp_path / "teacher_final.pt").unlink()  # killed after step 4 was logged: the newest checkpoint is step 2
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # and in the middle of a row
    train(teacher_cfg(tiny_data, tmp_path, "max_steps=4", "save_every=2", "log_every=1", "sample_every=0",
                      "resume=auto"))
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3, 4], "one timeline"


def test_an_unusable_rescue_folder_is_refused_at_start(monkeypatch, tiny_data, tmp_path):
    from train import train

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DMD2_RESCUE_DIR", str(blocker / "rescue"))
    with pytest.raises(FileError, match="DMD2_RESCUE_DIR"):
        train(teacher_cfg(tiny_data, tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_a_full_disk_at_start_leaves_no_lock(tmp_path):
    """RLIMIT_FSIZE = 0: no write may grow a file, as on a full disk."""
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))\n"
            "from dmd2.train.folder import acquire_lock\n"
            "try:\n    acquire_lock(sys.argv[1])\nexcept Exception as err:\n    print(type(err).__name__, err)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert "FileError" in proc.stdout and "run.lock" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_failing_lock_removal_does_not_hide_the_error(monkeypatch, tmp_path, caplog):
    lock = acquire_lock(str(tmp_path))
    real_remove = os.remove

    def read_only(path, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", read_only)
    lock.release()  # reported, not raised
    monkeypatch.undo()
    assert "could not remove" in caplog.text
    acquire_lock(str(tmp_path)).release()  # the left lock's process (this one) holds it no more


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_a_folder_made_read_only_mid_run_still_rescues_the_weights(monkeypatch, tiny_data, tmp_path):
    from train import train

    out, rescue = tmp_path / "run", tmp_path / "rescue"
    monkeypatch.setenv("DMD2_RESCUE_DIR", str(rescue))
    real_log = run_logger.RunLogger.log

    def log_then_lock_folder(self, metrics, step):
        real_log(self, metrics, step)
        if step == 2:
            out.chmod(0o500)
            (out / "samples").chmod(0o500)

    monkeypatch.setattr(run_logger.RunLogger, "log", log_then_lock_folder)
    try:
        with pytest.raises(FileError, match="rescue"):
            train(teacher_cfg(tiny_data, out, "max_steps=6", "log_every=1", "save_every=100", "sample_every=1"))
    finally:
        out.chmod(0o700)
        (out / "samples").chmod(0o700)
    (saved,) = rescue.glob("*teacher_final.pt")
    assert load_checkpoint(str(saved))["step"] == 6


def test_a_fresh_run_in_a_used_folder_is_refused(tiny_data, tmp_path):
    from train import train

    out = tmp_path / "run"
    train(teacher_cfg(tiny_data, out, "max_steps=1", "sample_every=0"))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigError, match="resume=auto"):
        train(teacher_cfg(tiny_data, out, "max_steps=1", "sample_every=0"))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    train(teacher_cfg(tiny_data, tmp_path / "new", "max_steps=1", "sample_every=0", "resume=auto"))  # starts fresh
    assert load_checkpoint(str(tmp_path / "new" / "teacher_final.pt"))["step"] == 1


def test_a_teacher_is_refused_in_a_distillation_folder(tiny_data, tmp_path):
    from train import train

    (tmp_path / "dmd2_000002.pt").write_bytes(b"a distillation checkpoint")
    (tmp_path / "config.yaml").write_text("stage: distill\n")
    with pytest.raises(ConfigError, match="stage=distill"):
        train(teacher_cfg(tiny_data, tmp_path, "resume=auto", "max_steps=1"))
    assert (tmp_path / "config.yaml").read_text() == "stage: distill\n"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_branch_in_the_same_folder_is_refused_and_pruning_spares_the_running_timeline(tiny_data, tmp_path):
    from train import train

    train(teacher_cfg(tiny_data, tmp_path, "max_steps=6", "save_every=2", "keep_last=2", "sample_every=0"))
    with pytest.raises(ConfigError, match="branch"):
        train(teacher_cfg(tiny_data, tmp_path, f"resume={tmp_path / 'teacher_000002.pt'}", "max_steps=6",
                          "save_every=2", "keep_last=2", "sample_every=0"))
    assert sorted(p.name for p in tmp_path.glob("teacher_*.pt")) == [
        "teacher_000002.pt", "teacher_000004.pt", "teacher_final.pt"]
    for step in (2, 4, 8):
        save_checkpoint({"kind": "teacher", "step": step}, str(tmp_path / f"p_{step:06d}.pt"))
    removed = prune_checkpoints(str(tmp_path), "p", 1, upto=4)  # step 8 is not this timeline's
    assert [Path(p).name for p in removed] == ["p_000002.pt"]


def hold_lock(folder: str, start, tried, results) -> None:
    start.wait()
    try:
        lock = acquire_lock(folder)
    except ConfigError:
        lock = None
    results.put(lock is not None)
    tried.wait()  # every process has tried while the holder still holds
    if lock is not None:
        lock.release()


@pytest.mark.slow
def test_one_holder_when_several_processes_take_over_a_stale_lock(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"})
    ctx = multiprocessing.get_context("fork")
    for trial in range(20):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        (folder / LOCK_FILE).write_text(stale)
        start, tried, results = ctx.Barrier(3), ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=hold_lock, args=(str(folder), start, tried, results)) for _ in range(3)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=600)
        assert sum(outcomes) == 1, f"trial {trial}: {sum(outcomes)} holders"


def test_a_lock_of_another_host_is_taken_over_only_when_named(monkeypatch, tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 4242, "host": "node-17", "started": "earlier"}))
    with pytest.raises(ConfigError, match=f"{TAKE_OVER_ENV}=node-17:4242"):
        acquire_lock(str(tmp_path))
    monkeypatch.setenv(TAKE_OVER_ENV, "node-17:4242")
    lock = acquire_lock(str(tmp_path))
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_killed_export_is_cleaned_up_and_a_crash_at_start_leaves_no_lock(monkeypatch, tiny_data, tmp_path):
    from train import train

    staging = tmp_path / ".tmp-export-abc123"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    train(teacher_cfg(tiny_data, tmp_path, "max_steps=1", "sample_every=0", "resume=auto"))
    assert not staging.exists() and not (tmp_path / LOCK_FILE).exists()

    def crash(folder):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(run, "remove_orphans", crash)
    with pytest.raises(RuntimeError, match="unexpected"):
        train(teacher_cfg(tiny_data, tmp_path, "max_steps=2", "resume=auto"))
    assert not (tmp_path / LOCK_FILE).exists()


def test_written_files_follow_the_umask(teacher_ckpt, tmp_path):
    from dmd2.io.export import export_generator

    previous = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a.json"), lambda f: f.write(b"{}"))
        save_checkpoint({"kind": "teacher", "step": 0}, str(tmp_path / "c.pt"))
        export_generator(str(teacher_ckpt), str(tmp_path / "export"))
        os.umask(0o077)
        atomic_write(str(tmp_path / "private.json"), lambda f: f.write(b"{}"))
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*tmp_path.iterdir(), *(tmp_path / "export").iterdir()]
             if p.is_file()}
    assert modes == {"a.json": 0o644, "c.pt": 0o644, "model.safetensors": 0o644, "config.json": 0o644,
                     "README.md": 0o644, "samples.png": 0o644, "private.json": 0o600}


def test_without_flock_the_lock_is_made_exclusively(monkeypatch, tmp_path, caplog):
    import dmd2.train.folder as run_folder

    monkeypatch.setattr(run_folder, "try_flock", lambda fd: None)  # a file system without flock
    caplog.set_level("INFO")
    lock = acquire_lock(str(tmp_path))
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        acquire_lock(str(tmp_path))
    lock.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    lock = acquire_lock(str(tmp_path))
    assert "taking over" in caplog.text and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_export_at_the_end_keeps_the_run(monkeypatch, teacher_ckpt, tiny_data, tmp_path, caplog):
    import dmd2.train.distill as distill
    from train import train

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(distill, "export_generator", full_disk)
    result = train(compose_cfg([*SMOKE, "stage=distill", "data=image_folder", f"data.root={tiny_data}",
                                f"teacher_checkpoint={teacher_ckpt}", f"output_dir={tmp_path}", "max_steps=2",
                                "sample_every=0"]))
    assert load_checkpoint(result["checkpoint"])["step"] == 2
    assert "python -m dmd2.export" in caplog.text and not (tmp_path / "generator").exists()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_failing_wandb_media_write_turns_wandb_off_and_keeps_the_grid(monkeypatch, tmp_path, caplog):
    import wandb

    class Run:
        logged: list = []

        def log(self, payload, step):
            self.logged.append(step)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    logger = run_logger.RunLogger(str(tmp_path), {"name": "none"}, {}, "teacher")
    logger.start()
    logger.run = Run()
    monkeypatch.setattr(wandb, "Image", full_disk)
    images, labels = torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])
    for step in (1, 2):
        assert logger.log_samples("samples/x", images, labels, None, 2, step) is not None
    assert (tmp_path / "samples" / "samples_x_000002.png").is_file()
    assert logger.run is None and caplog.text.count("W&B logging is off") == 1
    logger.finish()


@pytest.mark.slow
def test_a_killed_run_whose_workers_still_hold_the_lock_is_taken_over(tmp_path, caplog):
    """Data-loader workers forked with the lock open keep its flock for a moment after the run is killed."""
    code = ("import os, sys, time\nfrom dmd2.train.folder import acquire_lock\nlock = acquire_lock(sys.argv[1])\n"
            "if os.fork() == 0:\n    time.sleep(2)\n    os._exit(0)\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, check=True)
    caplog.set_level("INFO")
    lock = acquire_lock(str(tmp_path))
    assert "taking over" in caplog.text
    lock.release()


@pytest.mark.parametrize("take_over", ["", "any"])
def test_without_flock_one_holder_when_several_processes_take_over_a_stale_lock(monkeypatch, tmp_path, take_over):
    import dmd2.train.folder as run_folder

    monkeypatch.setattr(run_folder, "try_flock", lambda fd: None)  # flock failing with ENOLCK (forked: inherited)
    monkeypatch.setenv("DMD2_TAKE_OVER_LOCK", take_over)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"})
    ctx = multiprocessing.get_context("fork")
    for trial in range(12):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        (folder / LOCK_FILE).write_text(stale)
        start, tried, results = ctx.Barrier(4), ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=hold_lock, args=(str(folder), start, tried, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert sum(outcomes) == 1, f"trial {trial}: {sum(outcomes)} holders"
        assert sorted(p.name for p in folder.iterdir()) == []  # released, no guard left


def test_a_planted_lock_symlink_is_refused_and_its_target_left_alone(tmp_path):
    import dmd2.train.folder as run_folder

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(target)
    with pytest.raises(FileError, match="is a symbolic link"):
        acquire_lock(str(tmp_path / "run"))
    assert target.read_text() == "keep me"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_folder, "try_flock", lambda fd: None)
        with pytest.raises(FileError, match="is a symbolic link"):
            acquire_lock(str(tmp_path / "run"))
    assert target.read_text() == "keep me"


def test_without_flock_a_release_removes_only_its_own_lock_file(monkeypatch, tmp_path):
    import dmd2.train.folder as run_folder

    monkeypatch.setattr(run_folder, "try_flock", lambda fd: None)
    lock = acquire_lock(str(tmp_path))
    other = tmp_path / "other"  # taken over meanwhile: another process's lock now stands there
    other.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    os.replace(other, tmp_path / LOCK_FILE)
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getppid()
