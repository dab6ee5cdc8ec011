"""Gradient accumulation: one global batch gives the same update whatever its split into processes and rounds.

Float64 on the CPU, tiny networks without dropout: one process with the whole global batch (one round) against
one process x 2 rounds and 2 gloo processes x 2 rounds, for the teacher and for distillation (the GAN head on the
fake score network's bottleneck, and the discriminator on the teacher's features), after each of a few steps.
The stage code itself runs: the data order (EpochBatchSampler), the draws (BatchRNG), DDP (no_sync on all but the
last round), the Updater's accumulate / step, clipping and the EMAs."""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmd2.config.settings import DistillSettings
from dmd2.data.batches import EpochBatchSampler, accumulation_rounds
from dmd2.io.checkpoint import load_checkpoint
from dmd2.io.weights import build_denoiser
from dmd2.method.randomness import BatchRNG
from dmd2.runtime.distributed import Dist, wrap
from dmd2.train.distill import DistillState, build_updaters, distill_model, distill_rounds, make_batch
from dmd2.train.optim import EMA, LRSchedule, Updater, adamw, ema_decay_at
from dmd2.train.teacher import TeacherState, teacher_rounds
from tests.conftest import compose_cfg, run_cli

TINY = {"name": "simple_unet", "channels": [8, 16, 16], "emb_dim": 16, "noise_emb_dim": 8, "groups": 4,
        "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
GLOBAL, NUM_ITEMS, RES, STEPS = 8, 16, 16, 3  # images per step; the data: 2 global batches per epoch
KINDS = ("teacher", "distill_head", "distill_teacher_features")
DISTILL = {"distill_head": dict(gan_classifier=True, dfake_gen_update_ratio=2, generator_ema_decay=0.9,
                                denoising_sigmas=[80.0, 2.0], grad_clip=1.0, generator_lr=1e-3, guidance_lr=1e-3),
           "distill_teacher_features": dict(gan_classifier=True, gan_features="teacher",
                                            gan_feature_resolutions=[16, 8], fake_score_timesteps="dm",
                                            dm_eps=1e-6, r1_weight=1.0, cls_loss_weight=1.0,
                                            gen_cls_loss_weight=1e-1, dfake_gen_update_ratio=2, grad_clip=1.0,
                                            generator_lr=1e-3, guidance_lr=1e-3, discriminator_lr=1e-3)}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(NUM_ITEMS, 3, RES, RES, generator=g) * 2 - 1, torch.randint(0, 10, (NUM_ITEMS,), generator=g)


def snapshot(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def teacher_run(d: Dist, rounds: int, batches) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_denoiser(TINY, 10, RES, 0.5)
    ema = build_denoiser(TINY, 10, RES, 0.5).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    upd = Updater("loss", list(model.parameters()), adamw(model.parameters(), 1e-3, (0.9, 0.999), 0.0), 1e-3, LRSchedule(1),
                  1.0, "stop", EMA(ema, model, lambda step: ema_decay_at(step, 0.999)))
    s = TeacherState(wrap(model, d, torch.device("cpu")), upd, BatchRNG(5, "cpu", d.rank, d.world_size),
                     nullcontext, -1.2, 1.2, 0.5, True)
    out = []
    for step in range(STEPS):
        teacher_rounds(s, [next(batches) for _ in range(rounds)], step)
        out.append(snapshot(model, ema))
    return out


def distill_run(kind: str, d: Dist, rounds: int, batches) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    settings = DistillSettings(**DISTILL[kind])
    model = distill_model(build_denoiser(TINY, 10, RES, 0.5).eval(), settings)
    ema = None
    if settings.generator_ema_decay is not None:
        ema = build_denoiser(TINY, 10, RES, 0.5).requires_grad_(False)
        ema.load_state_dict(model.generator.state_dict())
    upds = build_updaters(model, ema, settings, fused=False)
    rng = BatchRNG(5, "cpu", d.rank, d.world_size)
    s = DistillState(model, wrap(model.generator, d, torch.device("cpu")),
                     wrap(model.guidance, d, torch.device("cpu")), upds, rng,
                     nullcontext, settings.dfake_gen_update_ratio)
    cfg = SimpleNamespace(gan_classifier=True, seed=0, data=SimpleNamespace(hflip=True, resolution=RES))
    nets = [model.generator, model.guidance.fake_unet] + [m for m in (ema, model.guidance.gan_head,
                                                                      model.guidance.discriminator) if m is not None]
    out = []
    for step in range(STEPS):
        loaded = [next(batches) for _ in range(rounds)]
        made = [make_batch(cfg, rng, *loaded[r], step, model.num_steps, torch.device("cpu"))
                for r in rng.rounds(rounds)]
        distill_rounds(s, made, step)
        out.append(snapshot(*nets))
    return out


def run_split(rank: int, world: int, rounds: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Every kind's weights after each step, trained by this rank of ``world`` with ``rounds`` rounds."""
    torch.set_default_dtype(torch.float64)
    images, labels = data()
    d = Dist(rank, world)
    results = {}
    for kind in KINDS:
        sampler = iter(EpochBatchSampler(NUM_ITEMS, GLOBAL // (world * rounds), 3, 0, rank, world, rounds))
        batches = ((images[i], labels[i]) for i in sampler)
        results[kind] = teacher_run(d, rounds, batches) if kind == "teacher" else distill_run(kind, d, rounds,
                                                                                              batches)
    return results


def worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        results = run_split(rank, world, 2)
        if rank == 0:
            torch.save(results, os.path.join(folder, "results.pt"))
    finally:
        dist.destroy_process_group()


def max_difference(a: list[dict], b: list[dict]) -> float:
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in x)


@pytest.mark.slow
def test_one_global_batch_gives_one_update_whatever_the_split(tmp_path):
    default = torch.get_default_dtype()
    try:
        whole = run_split(0, 1, 1)
        two_rounds = run_split(0, 1, 2)
    finally:
        torch.set_default_dtype(default)
    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    two_processes = torch.load(tmp_path / "results.pt", weights_only=True)
    for kind in KINDS:
        first, last = whole[kind][0], whole[kind][-1]
        assert all(v.dtype == torch.float64 for v in first.values() if v.is_floating_point())
        assert any(not torch.equal(first[k], last[k]) for k in first), "the updates must move the weights"
        for split, other in (("1 process x 2 rounds", two_rounds), ("2 processes x 2 rounds", two_processes)):
            diff = max_difference(whole[kind], other[kind])
            print(f"{kind}, {split}: max difference {diff:.3g}")
            assert diff < 1e-10, (kind, split, diff)


def test_accumulation_rounds_and_their_refusal():
    assert accumulation_rounds(None, 4, 2) == 1
    assert accumulation_rounds(16, 4, 2) == 2
    for bad in (6, 4, 12):
        with pytest.raises(ValueError, match="'global_batch_size' = .* 'batch_size' = 4 x 2 processes"):
            accumulation_rounds(bad, 4, 2)


def test_the_sampler_cuts_a_global_batch_into_rounds_x_ranks_slices():
    one = iter(EpochBatchSampler(20, 8, seed=3))
    split = [iter(EpochBatchSampler(20, 2, seed=3, rank=r, world_size=2, rounds=2)) for r in range(2)]
    for _ in range(5):  # across an epoch boundary (2 global batches per epoch)
        parts = [[next(s) for _ in range(2)] for s in split]  # parts[rank][round]
        assert next(one) == parts[0][0] + parts[1][0] + parts[0][1] + parts[1][1]


def test_batch_rng_rounds_keep_the_slice_of_the_global_draw():
    for rank in range(2):
        full = BatchRNG(7)
        want = (full.randn(8, 3), full.rand(8))
        rng = BatchRNG(7, rank=rank, world_size=2)
        got = [(rng.randn(2, 3), rng.rand(2)) for _ in rng.rounds(2)]
        for r, (a, b) in enumerate(got):
            part = r * 2 + rank
            assert torch.equal(a, want[0][2 * part:2 * part + 2]) and torch.equal(b, want[1][2 * part:2 * part + 2])
        # afterwards the stream is where one full draw leaves it
        assert torch.equal(rng.randn(4), full.randn(8)[4 * rank:4 * rank + 4])


@pytest.mark.slow
def test_a_run_with_accumulation_resumes_exactly_and_logs_its_batch(tiny_data, tmp_path, caplog):
    """A teacher with batch_size 4 and global_batch_size 8 (2 rounds): 4 straight steps equal 2 steps, then a
    resume to 4; the schedule states the global batch and the rounds, the logs the kimg. The runs train in this
    process; the refusal of a global batch that is no multiple of the batch is the command line's."""
    common = ["stage=teacher", "logger=none", "device=cpu", "data=image_folder", f"data.root={tiny_data}",
              "arch=simple_unet_tiny", "arch.dropout=0", "batch_size=4", "global_batch_size=8", "save_every=2",
              "sample_every=0", "log_every=1", "warmup_steps=2", "data.num_workers=0", "samples_per_class=1",
              "sample_steps=2"]
    from train import train

    caplog.set_level("INFO")
    train(compose_cfg([*common, "max_steps=4", f"output_dir={tmp_path / 'a'}"]))
    assert "global batch 8 = batch_size 4 x 1 process x 2 accumulation rounds" in caplog.text
    train(compose_cfg([*common, "max_steps=2", f"output_dir={tmp_path / 'b'}"]))
    caplog.clear()
    train(compose_cfg([*common, "max_steps=4", "resume=auto", f"output_dir={tmp_path / 'b'}"]))
    assert "[resume] continuing" in caplog.text
    a = load_checkpoint(str(tmp_path / "a" / "teacher_final.pt"))
    b = load_checkpoint(str(tmp_path / "b" / "teacher_final.pt"))
    assert a["step"] == b["step"] == 4 and a["config"]["global_batch_size"] == 8
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), f"{key} differs after resume"
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    kimg = [r["train/kimg"] for r in rows if "train/kimg" in r]
    assert kimg == [0.008, 0.016, 0.024, 0.032]
    refused = run_cli("train.py", *common, "global_batch_size=6", f"output_dir={tmp_path / 'c'}",
                      f"hydra.run.dir={tmp_path / 'h4'}")
    assert refused.returncode != 0 and "'global_batch_size' = 6" in refused.stderr
    assert not Path(tmp_path / "c" / "metrics.jsonl").exists()
