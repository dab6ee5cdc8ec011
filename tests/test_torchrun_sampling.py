"""evaluate.py and generate.py under torchrun (two CPU processes, gloo): the same images and the same FD as one
process, rank 0 alone writing results, each seed's file written once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dmd2.runtime.distributed import Dist, batch_shard
from tests.conftest import HANG_GUARD_S, ROOT, compose_cfg, train_eval_args

# the torchrun runs (two processes each) run one at a time, on one test worker
pytestmark = pytest.mark.xdist_group("torchrun")


def torchrun(script: str, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, cwd=ROOT)


def in_process(script: str, *overrides: str) -> None:
    """The one-process run to compare with: ``script``'s own function, in this process (as its main runs it)."""
    import torch

    if script == "generate.py":
        import generate

        with torch.no_grad():  # generate.py's main samples without autograd
            generate.generate(compose_cfg(list(overrides), config_name="generate"))
    else:
        import evaluate

        evaluate.evaluate(compose_cfg(list(overrides), config_name="evaluate"))


@pytest.mark.parametrize("n, batch, world", [(30, 8, 2), (30, 8, 3), (5, 8, 2), (17, 4, 4), (0, 3, 2)])
def test_shards_are_whole_batches_in_rank_order_covering_every_item_once(n, batch, world):
    shares = [batch_shard(n, batch, Dist(rank, world)) for rank in range(world)]
    assert [i for s in shares for i in s] == list(range(n))
    assert all(s.start % batch == 0 for s in shares if len(s))
    assert all(len(s) % batch == 0 for s in shares if s.stop < n)


@pytest.mark.slow
def test_two_processes_write_the_same_images_and_measure_the_same_fd_as_one(dmd2_run, featnet, tiny_data, tmp_path):
    gen = dmd2_run / "generator"
    common = [f"checkpoint={gen}", "device=cpu", "seeds=0-20", "batch_size=4"]
    for fmt in ("png", "npz"):
        in_process("generate.py", *common, f"format={fmt}", f"output_dir={tmp_path / fmt / 'one'}")
        two = torchrun("generate.py", *common, f"format={fmt}", f"output_dir={tmp_path / fmt / 'two'}",
                       f"hydra.run.dir={tmp_path / fmt / 'h2'}")
        assert two.returncode == 0, two.stderr[-3000:]
        assert two.stdout.count("[generate] wrote 21 images") + two.stderr.count("[generate] wrote 21 images") == 1
        a, b = tmp_path / fmt / "one", tmp_path / fmt / "two"
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert len(files) == (23 if fmt == "png" else 3)  # 21 seeds (or samples.npz), grid.png, generate.json
        for f in files:
            if f.suffix == ".npz":
                x, y = np.load(a / f), np.load(b / f)
                assert all(np.array_equal(x[k], y[k]) for k in ("arr_0", "arr_1", "seeds", "class_names"))
            else:
                assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs"

    args = train_eval_args(featnet, tiny_data, tmp_path / "cache", num=30, prefix="") + [
        f"checkpoint={gen}", "device=cpu", "logger=none", "uncertainty_resamples=20"]
    in_process("evaluate.py", *args, f"output_dir={tmp_path / 'eval1'}")
    two = torchrun("evaluate.py", *args, f"output_dir={tmp_path / 'eval2'}", f"hydra.run.dir={tmp_path / 'e2'}")
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "eval1" / "results.json").read_text())
    r2 = json.loads((tmp_path / "eval2" / "results.json").read_text())
    assert len(r1) == len(r2) == 1 and r2[0]["world_size"] == 2 and r1[0]["world_size"] == 1
    assert (r2[0]["value"], r2[0]["std"], r2[0]["num_samples"]) == (r1[0]["value"], r1[0]["std"], 30)
    listing = sorted(p.name for p in (tmp_path / "eval2").iterdir())
    assert listing == sorted(p.name for p in (tmp_path / "eval1").iterdir()) == ["metrics.jsonl", "results.json"]
    assert len((tmp_path / "eval2" / "metrics.jsonl").read_text().splitlines()) == 1, "rank 0 alone logs"


@pytest.mark.slow
def test_a_known_answer_model_gets_the_same_exact_scores_from_two_processes(tmp_path):
    """data=gaussian_mixture: the samples are sharded and gathered to rank 0, which alone scores them and measures
    the teacher's denoising error."""
    from train import train

    quick = ["debug=smoke", "logger=none", "data=gaussian_mixture", "data.num_classes=2",
             "data.synthetic_per_class=64", "eval_every=0", "max_steps=2"]
    train(compose_cfg([*quick, f"output_dir={tmp_path / 't'}"]))
    args = [f"checkpoint={tmp_path / 't' / 'teacher_final.pt'}", "num_samples=40", "batch_size=8",
            "sampler.steps=2", "device=cpu", "logger=none"]
    in_process("evaluate.py", *args, f"output_dir={tmp_path / 'e1'}")
    two = torchrun("evaluate.py", *args, f"output_dir={tmp_path / 'e2'}", f"hydra.run.dir={tmp_path / 'h2'}")
    assert two.returncode == 0, two.stderr[-3000:]
    (r1,) = json.loads((tmp_path / "e1" / "results.json").read_text())
    (r2,) = json.loads((tmp_path / "e2" / "results.json").read_text())
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    for key in ("value", "mixture_scores", "mixture_floor", "denoising_error"):
        assert r1[key] == r2[key], key
