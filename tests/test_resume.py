"""Reliability: exact resume after SIGKILL, corrupted checkpoints, safe loading, non-finite guards."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmd2.config.errors import FormatError
from dmd2.io.checkpoint import latest_valid_checkpoint, load_checkpoint, prune_checkpoints
from dmd2.train.optim import LRSchedule, NonFiniteError
from tests.conftest import ROOT, SMOKE, compose_cfg, run_cli


def launch(*overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_after_first_checkpoint(proc: subprocess.Popen, folder: Path, prefix: str) -> int:
    """SIGKILL the run as soon as its first periodic checkpoint exists; return that checkpoint's step."""
    deadline = time.time() + 240
    while time.time() < deadline:
        found = sorted(folder.glob(f"{prefix}_0*.pt"))
        if found:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return int(found[0].stem.split("_")[-1])
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(stage, teacher_ckpt, tiny_data, tmp_path, caplog):
    """A real run is killed (SIGKILL) after its first periodic checkpoint; resumed (in this process, as the
    uninterrupted run for comparison), it ends with the uninterrupted run's weights. A distillation step costs
    several teacher steps: 15 of them leave as much time to kill the run after step 3 as the teacher's 30."""
    from train import train

    prefix, steps = ("teacher", 30) if stage == "teacher" else ("dmd2", 15)
    common = [*SMOKE, f"stage={stage}", "data=image_folder", f"data.root={tiny_data}", f"max_steps={steps}",
              "save_every=3", "sample_every=0", "log_every=1", "data.num_workers=0"]
    if stage == "distill":
        common += [f"teacher_checkpoint={teacher_ckpt}", "dfake_gen_update_ratio=2", "gan_classifier=true",
                   "denoising_sigmas=[80.0,2.0]", "generator_ema_decay=0.9", "warmup_steps=5"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = launch(*common, f"output_dir={killed}", f"hydra.run.dir={tmp_path / 'h1'}")
    killed_at = kill_after_first_checkpoint(proc, killed, prefix)
    assert not (killed / f"{prefix}_final.pt").exists(), "the run finished before it could be killed"
    caplog.set_level("INFO")
    train(compose_cfg([*common, f"output_dir={killed}", "resume=auto"]))
    assert "[resume] continuing" in caplog.text
    train(compose_cfg([*common, f"output_dir={straight}"]))

    a = load_checkpoint(str(straight / f"{prefix}_final.pt"))
    b = load_checkpoint(str(killed / f"{prefix}_final.pt"))
    keys = ["model", "ema"] if stage == "teacher" else ["generator", "fake_unet", "gan_head", "generator_ema"]
    for key in keys:
        assert states_equal(a[key], b[key]), f"{key} differs after resume (killed after step {killed_at})"
    assert a["step"] == b["step"] == steps


def write_run(folder: Path, steps: list[int]) -> None:
    for s in steps:
        torch.save({"kind": "teacher", "step": s, "w": torch.full((3,), float(s))}, folder / f"teacher_{s:06d}.pt")


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    write_run(tmp_path, [2, 4, 6])
    newest = tmp_path / "teacher_000006.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short by a crash
    path, state = latest_valid_checkpoint(str(tmp_path), "teacher", "teacher")
    assert path.endswith("teacher_000004.pt") and state["step"] == 4
    assert "teacher_000006.pt" in caplog.text and caplog.records[-1].levelname == "WARNING"
    with pytest.raises(FormatError, match="teacher_000006.pt.*truncated"):
        load_checkpoint(str(newest))


def test_a_pickled_object_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "teacher", "step": 1, "payload": Path("/etc/passwd")}, path)  # arbitrary class
    with pytest.raises(FormatError, match="evil.pt"):
        load_checkpoint(str(path))


def test_keep_last_prunes_only_periodic_checkpoints(tmp_path):
    write_run(tmp_path, [2, 4, 6, 8])
    (tmp_path / "teacher_final.pt").write_bytes(b"")
    removed = prune_checkpoints(str(tmp_path), "teacher", 2)
    assert sorted(Path(p).name for p in removed) == ["teacher_000002.pt", "teacher_000004.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_000006.pt", "teacher_000008.pt", "teacher_final.pt"]


def poison_third_loss(monkeypatch):
    import dmd2.train.teacher as teacher

    calls = {"n": 0}
    real_loss = teacher.denoising_loss

    def loss_with_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(teacher, "denoising_loss", loss_with_nan)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(monkeypatch, tiny_data, tmp_path):
    from train import train

    poison_third_loss(monkeypatch)
    cfg = compose_cfg([*SMOKE, "data=image_folder", f"data.root={tiny_data}", f"output_dir={tmp_path}",
                       "max_steps=6", "save_every=2"])
    with pytest.raises(NonFiniteError, match="non-finite loss .* at step 2"):
        train(cfg)
    assert load_checkpoint(str(tmp_path / "teacher_000002.pt"))["step"] == 2
    assert not (tmp_path / "teacher_final.pt").exists() and not (tmp_path / "teacher_000004.pt").exists()


def test_nan_loss_can_be_skipped(monkeypatch, tiny_data, tmp_path):
    from train import train

    poison_third_loss(monkeypatch)
    cfg = compose_cfg([*SMOKE, "data=image_folder", f"data.root={tiny_data}", f"output_dir={tmp_path}",
                       "max_steps=4", "on_nonfinite=skip"])
    train(cfg)
    state = load_checkpoint(str(tmp_path / "teacher_final.pt"))
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert {int(s["step"]) for s in state["updater"]["optimizer"]["state"].values()} == {3}  # 4 steps, one skipped
    assert state["updater"]["skipped"] == 1


@pytest.mark.parametrize("overrides,message", [
    (["resume=auto"], "'resume' = 'auto' needs output_dir"),
    (["resume=/nonexistent/teacher_000002.pt"], "'resume'"),
    (["keep_last=0"], "'keep_last'"),
    (["on_nonfinite=ignore"], "'on_nonfinite'"),
    (["precision=fp16"], "'precision'"),
])
def test_bad_reliability_settings_are_refused_fast(overrides, message, tiny_data, tmp_path):
    start = time.perf_counter()
    proc = run_cli("train.py", *SMOKE, "data=image_folder", f"data.root={tiny_data}", *overrides,
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert time.perf_counter() - start < 30


def test_a_finished_run_resumed_returns_its_objective(teacher_ckpt, tiny_data, tmp_path):
    """A distillation resumed from step 2 with no generator update in its own steps (ratio 4), and resume=auto on
    the finished folder, still return the run's final train/loss_dm (kept in the checkpoints): a sweeper gets a
    value and a requeue-on-failure loop ends (before: 'the run has no such final metric', a failed job)."""
    from train import objective, train

    base = [*SMOKE, "stage=distill", f"teacher_checkpoint={teacher_ckpt}", "data=image_folder",
            f"data.root={tiny_data}", "dfake_gen_update_ratio=4",
            "sample_every=0", "optimized_metric=train/loss_dm", f"output_dir={tmp_path}"]
    first = objective(train(compose_cfg(base)), "train/loss_dm")
    assert math.isfinite(first)
    again = train(compose_cfg([*base, f"resume={tmp_path / 'dmd2_000002.pt'}",  # steps 2, 3: no generator update
                               f"output_dir={tmp_path / 'again'}"]))
    assert objective(again, "train/loss_dm") == first
    finished = train(compose_cfg([*base, "resume=auto"]))  # a finished folder: nothing left to train
    assert finished["steps"] == 4 and objective(finished, "train/loss_dm") == first


def test_an_objective_the_run_never_logs_is_refused_at_start(tmp_path):
    from dmd2.config.errors import ConfigError
    from dmd2.train.objective import check_objective

    for stage, metric in (("teacher", "train/loss_dm"), ("distill", "train/loss"), ("distill", "train/loss_cls")):
        extra = ["teacher_checkpoint=missing.pt"] if stage == "distill" else []
        with pytest.raises(ConfigError, match=f"'optimized_metric' = '{metric}'.*never logs it"):
            check_objective(compose_cfg([*SMOKE, f"stage={stage}", *extra, f"optimized_metric={metric}"]), False)
    check_objective(compose_cfg([*SMOKE, "stage=distill", "gan_classifier=true", "optimized_metric=train/loss_cls",
                                 f"teacher_checkpoint={__file__}"]), False)
    proc = run_cli("train.py", *SMOKE, "optimized_metric=train/loss_dm", f"output_dir={tmp_path / 'out'}",
                   f"hydra.run.dir={tmp_path / 'hydra'}")
    assert proc.returncode == 2 and "never logs it" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # before the lock, the data and the models


def test_a_teacher_overwritten_at_the_same_path_is_refused_on_resume(teacher_ckpt, tiny_data, tmp_path):
    """The teacher's SHA-256 is recorded in the run (config, checkpoints, export provenance); resuming with
    another file at the same path is refused, naming the file and both hashes (before: accepted, one generator
    trained against two teachers)."""
    import shutil

    import yaml

    from dmd2.config.errors import FileError
    from dmd2.io.files import file_sha256
    from train import train

    teacher, out = tmp_path / "teacher.pt", tmp_path / "run"
    shutil.copy(teacher_ckpt, teacher)
    original = file_sha256(str(teacher))
    base = [*SMOKE, "stage=distill", f"teacher_checkpoint={teacher}", "data=image_folder", f"data.root={tiny_data}",
            "sample_every=0", f"output_dir={out}"]
    train(compose_cfg([*base, "max_steps=2"]))
    state = load_checkpoint(str(out / "dmd2_final.pt"))
    assert state["teacher_sha256"] == state["config"]["teacher_sha256"] == original
    assert yaml.safe_load((out / "config.yaml").read_text())["teacher_sha256"] == original
    provenance = json.loads((out / "generator" / "config.json").read_text())["provenance"]
    assert provenance["teacher_sha256"] == original

    other = load_checkpoint(str(teacher))
    other["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in other["ema"].items()}
    torch.save(other, teacher)
    changed = file_sha256(str(teacher))
    with pytest.raises(FileError, match=rf"'teacher_checkpoint'.*{changed}.*{original}"):
        train(compose_cfg([*base, "max_steps=4", "resume=auto"]))
    assert load_checkpoint(str(out / "dmd2_final.pt"))["step"] == 2  # nothing trained against the other teacher


def test_a_run_whose_every_update_was_skipped_fails_without_a_final_checkpoint(tmp_path):
    """p_mean=1000 makes every noise level infinite, so every loss is NaN: with on_nonfinite=skip the run used to
    end with status 0 and an untrained teacher_final.pt; now it fails (status 5) and writes no final checkpoint."""
    from dmd2.config.errors import TRAINING_FAILED

    out = tmp_path / "out"
    proc = run_cli("train.py", *SMOKE, "p_mean=1000", "on_nonfinite=skip", f"output_dir={out}",
                   f"hydra.run.dir={tmp_path / 'hydra'}")
    assert proc.returncode == TRAINING_FAILED, proc.stderr[-2000:]
    assert "every one of the 4 teacher updates of this run was skipped" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "teacher_final.pt").exists()


def test_non_finite_weights_fail_the_run():
    from dmd2.config.errors import TrainingFailed
    from dmd2.train.optim import Updater, adamw, check_trained

    net = torch.nn.Linear(2, 2)
    upd = Updater("loss", list(net.parameters()), adamw(net.parameters(), 1e-3, (0.9, 0.999), 0.0), 1e-3, LRSchedule(0), None,
                  "skip")
    upd.update(net(torch.ones(1, 2)).sum(), 0)
    check_trained({"net": upd}, {"net": net}, "teacher_final.pt")  # trained and finite: passes
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(TrainingFailed, match="the net weights are not finite. teacher_final.pt was not written"):
        check_trained({"net": upd}, {"net": net}, "out/teacher_final.pt")
    fresh = Updater("loss", list(net.parameters()), adamw(net.parameters(), 1e-3, (0.9, 0.999), 0.0), 1e-3, LRSchedule(0), None,
                    "skip")
    fresh.update(net(torch.ones(1, 2)).sum(), 0)  # NaN weights: a NaN loss, skipped
    with pytest.raises(TrainingFailed, match="every one of the 1 net updates"):
        check_trained({"net": fresh}, {}, "teacher_final.pt")


class PickledObject:
    """Stands for any Python object a foreign .pt file may hold."""


def test_a_file_with_pickled_objects_is_refused_without_advising_weights_only_false(tmp_path):
    """torch's refusal advised retrying with weights_only=False (running code from the file); the message now says
    what the file holds and what is expected instead, for training checkpoints and for sampling."""
    from dmd2.io.loaded import load_generator

    path = tmp_path / "foreign.pt"
    torch.save({"kind": "teacher", "step": 0, "object": PickledObject()}, path)
    for load, error in ((load_checkpoint, FormatError), (load_generator, FormatError)):
        with pytest.raises(error) as err:
            load(str(path))
        message = str(err.value)
        assert "weights_only" not in message and "trust" not in message, message
        assert "pickled Python objects" in message and "PickledObject" in message and "expected a checkpoint" in message
