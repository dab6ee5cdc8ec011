"""torchrun + DistributedDataParallel on the CPU (gloo): two processes with batch B follow one process with
batch 2B, rank 0 alone writes, and the batch is sharded by rank."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmd2.data.batches import EpochBatchSampler
from dmd2.io.checkpoint import load_checkpoint
from dmd2.method.randomness import BatchRNG
from tests.conftest import HANG_GUARD_S, ROOT, assert_trained_alike, compose_cfg, train_eval_args

# the torchrun runs (two processes each) run one at a time, on one test worker
pytestmark = pytest.mark.xdist_group("torchrun")

BASE = ["logger=none", "device=cpu", "data=image_folder", "max_steps=4", "save_every=2", "sample_every=0",
        "log_every=1", "warmup_steps=2", "data.num_workers=0", "samples_per_class=1", "sample_steps=2"]


def torchrun(*overrides: str, nproc: int = 2, timeout: int = HANG_GUARD_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def assert_written_once(folder: Path, prefix: str, steps: int) -> None:
    assert sorted(p.name for p in folder.glob(f"{prefix}_*.pt")) == [f"{prefix}_000002.pt", f"{prefix}_final.pt"]
    assert not list(folder.glob(".tmp-*")), "a half-written checkpoint was left behind"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in rows if any(k.startswith("train/") for k in r)]
    assert train == list(range(1, steps + 1)), "metrics must be written by rank 0 only"


def eval_rows(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/fd_tiny-featnet"] for r in rows if "eval/fd_tiny-featnet" in r}


@pytest.fixture(scope="module")
def teacher_pair(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A tiny teacher without dropout (dropout draws differ per rank by design), trained by one process
    (this one) with batch 8 and by two torchrun processes with batch 4 each."""
    from train import train

    root = tmp_path_factory.mktemp("ddp_teacher")
    common = [*BASE, "stage=teacher", "arch=simple_unet_tiny", "arch.dropout=0", f"data.root={tiny_data}"]
    train(compose_cfg([*common, "batch_size=8", f"output_dir={root / 'single'}"]))
    ddp = torchrun(*common, "batch_size=4", f"output_dir={root / 'ddp'}", f"hydra.run.dir={root / 'h2'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return root / "single", root / "ddp", ddp.stdout


@pytest.fixture(scope="module")
def distill_pair(teacher_pair, tiny_data: Path, featnet: Path, tmp_path_factory: pytest.TempPathFactory):
    """``distill_pair(gan)``: the folders of one distillation run by one process (this one) with batch 8 and by
    two torchrun processes with batch 4 each (generator every 2nd step, a 2-step generator, its EMA, the FD
    measured every 2 steps), and the common overrides; each run once per module (the resume test continues the
    two-process run with the GAN classifier)."""
    from train import train

    teacher = teacher_pair[0] / "teacher_final.pt"
    root = tmp_path_factory.mktemp("ddp_distill")
    runs: dict[bool, tuple[Path, Path, list[str]]] = {}

    def pair(gan: bool) -> tuple[Path, Path, list[str]]:
        if gan not in runs:
            folder = root / f"gan_{gan}"
            common = [*BASE, "stage=distill", f"data.root={tiny_data}", f"teacher_checkpoint={teacher}",
                      "dfake_gen_update_ratio=2", f"gan_classifier={str(gan).lower()}", "generator_lr=1e-3",
                      "guidance_lr=1e-3", "denoising_sigmas=[80.0,2.0]", "generator_ema_decay=0.9",
                      *train_eval_args(featnet, tiny_data, folder / "fid_stats", every=2, num=30)]
            train(compose_cfg([*common, "batch_size=8", f"output_dir={folder / 'single'}"]))
            ddp = torchrun(*common, "batch_size=4", f"output_dir={folder / 'ddp'}",
                           f"hydra.run.dir={folder / 'h2'}")
            assert ddp.returncode == 0, ddp.stderr[-3000:]
            runs[gan] = folder / "single", folder / "ddp", common
        return runs[gan]

    return pair


@pytest.mark.slow
def test_teacher_two_processes_match_one_process_with_the_global_batch(teacher_pair):
    single, ddp, stdout = teacher_pair
    assert "2 processes (torchrun): batch_size 4 per process, global batch 8" in stdout
    assert_written_once(ddp, "teacher", 4)
    a, b = load_checkpoint(str(single / "teacher_final.pt")), load_checkpoint(str(ddp / "teacher_final.pt"))
    lr = a["config"]["lr"]
    assert_trained_alike(a["model"], b["model"], lr, "teacher weights")
    assert_trained_alike(a["ema"], b["ema"], lr, "teacher EMA")
    assert b["config"]["world_size"] == 2 and b["config"]["global_batch_size"] == 8
    assert len(b["rng_ranks"]) == 2
    before = load_checkpoint(str(single / "teacher_000002.pt"))["model"]
    assert any(not torch.equal(before[k], a["model"][k]) for k in before), "training must change the weights"


@pytest.mark.slow
@pytest.mark.parametrize("gan", [False, True])
def test_distill_two_processes_match_one_process_with_the_global_batch(gan, distill_pair):
    """The two-network update in lockstep: generator every 2nd step, fake score every step, with the GAN
    classifier's batched forward and a 2-step generator (backward simulation). The FD measured during training
    (its samples sharded over the ranks, 15 each) equals the single process's."""
    single, ddp, _ = distill_pair(gan)
    assert_written_once(ddp, "dmd2", 4)
    a = load_checkpoint(str(single / "dmd2_final.pt"))
    b = load_checkpoint(str(ddp / "dmd2_final.pt"))
    for key in ["generator", "fake_unet", "generator_ema"] + (["gan_head"] if gan else []):
        assert_trained_alike(a[key], b[key], 1e-3, f"distill {key}")
    assert a["generator_updater"]["optimizer"]["state"][0]["step"] == b["generator_updater"]["optimizer"]["state"][0]["step"] == 2
    assert b["guidance_updater"]["optimizer"]["state"][0]["step"] == 4
    single_fd, ddp_fd = eval_rows(single), eval_rows(ddp)
    assert sorted(single_fd) == sorted(ddp_fd) == [0, 2, 4]
    assert single_fd[0] == pytest.approx(ddp_fd[0], rel=1e-5)  # the same (teacher-copy) generator
    for step in (2, 4):  # generators trained alike, up to summation order
        assert single_fd[step] == pytest.approx(ddp_fd[step], rel=1e-2)


def test_batch_sampler_shards_each_global_batch_between_ranks():
    one = iter(EpochBatchSampler(20, 8, seed=3))
    ranks = [iter(EpochBatchSampler(20, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):  # across an epoch boundary (2 global batches per epoch)
        assert next(one) == next(ranks[0]) + next(ranks[1])


def test_batch_rng_gives_each_rank_its_slice_of_the_global_draw():
    full = BatchRNG(7).randn(2, 6, 3, dim=1)
    parts = [BatchRNG(7, rank=r, world_size=3).randn(2, 2, 3, dim=1) for r in range(3)]
    assert torch.equal(torch.cat(parts, dim=1), full)
    ints = [BatchRNG(7, rank=r, world_size=2).randint(0, 100, 5) for r in range(2)]
    assert torch.equal(torch.cat(ints), BatchRNG(7).randint(0, 100, 10))


@pytest.mark.slow
def test_two_process_run_resumes_exactly(distill_pair, tmp_path):
    """A two-process distillation (with the GAN classifier) stopped at step 2 and resumed to step 4 ends with the
    weights of its 4 straight steps (every rank's random state, the shared batch stream and the data position
    come back), with the FD measured inside training every 2 steps on the way. The straight run is the one
    test_distill_two_processes_match_one_process_with_the_global_batch checks; the stopped one is its folder as
    it was after step 2 (its periodic checkpoint)."""
    _, straight, common = distill_pair(True)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(straight / "dmd2_000002.pt", resumed_dir)
    resumed = torchrun(*common, "batch_size=4", "resume=auto", f"output_dir={resumed_dir}",
                       f"hydra.run.dir={tmp_path / 'h3'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[resume] continuing" in resumed.stdout
    a = load_checkpoint(str(straight / "dmd2_final.pt"))
    b = load_checkpoint(str(resumed_dir / "dmd2_final.pt"))
    assert a["step"] == b["step"] == 4
    for key in ("generator", "fake_unet", "gan_head", "generator_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), f"{key} differs after resume"
    assert eval_rows(resumed_dir)[4] == eval_rows(straight)[4]


def test_a_global_batch_larger_than_the_dataset_is_refused():
    with pytest.raises(ValueError, match="batch_size = 8 x 3 processes is larger than the dataset"):
        EpochBatchSampler(20, 8, seed=0, world_size=3)


@pytest.mark.slow
def test_a_stop_signal_under_torchrun_saves_one_checkpoint_at_a_step_all_ranks_agree_on(tiny_data, tmp_path):
    """SIGTERM to torchrun as soon as the training loop has started (metrics.jsonl appears then, after the ranks
    built their networks together: both have their signal handlers), long before the run's 120 steps end; every
    rank stops after the same step, and the checkpoint resumes in two processes to a longer run."""
    import time

    args = [*BASE, "stage=teacher", "arch=simple_unet_tiny", f"data.root={tiny_data}", "batch_size=4",
            "max_steps=120", "num_epochs=1000", "save_every=1000", "log_every=1000", f"output_dir={tmp_path / 'out'}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py")]
    proc = subprocess.Popen([*cmd, *args, f"hydra.run.dir={tmp_path / 'h1'}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + HANG_GUARD_S
    while not (tmp_path / "out" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.terminate()  # SIGTERM to torchrun, which passes it on to every rank
    _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    (saved,) = (tmp_path / "out").glob("teacher_0*.pt")
    step = load_checkpoint(str(saved))["step"]
    assert 0 < step < 120 and f"stopped at step {step}" in stderr
    resumed = torchrun(*args, "resume=auto", "max_steps=130", f"hydra.run.dir={tmp_path / 'h2'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[resume] continuing {saved} (step {step})" in resumed.stdout + resumed.stderr
    assert load_checkpoint(str(tmp_path / "out" / "teacher_final.pt"))["step"] == 130
