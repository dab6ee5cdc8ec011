"""DMD2: the DM gradient's properties, a toy problem with a known answer, the update schedule, and the CLIs."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext

import pytest
import torch
from PIL import Image
from torch import nn

from dmd2.config.settings import DistillSettings
from dmd2.io.checkpoint import load_checkpoint
from dmd2.io.weights import build_denoiser
from dmd2.method.edm import dmd_timestep_sigmas
from dmd2.method.losses import denoising_loss, distribution_matching_loss, dm_gradient
from dmd2.method.mixture import gaussian_optimal_denoiser
from dmd2.method.randomness import BatchRNG
from dmd2.train.distill import Batch, DistillState, distill_model, distill_step
from dmd2.train.optim import LRSchedule, Updater, adamw
from tests.conftest import SMOKE, compose_cfg, run_cli

TINY_ARCH = {"name": "simple_unet", "channels": [8, 16], "emb_dim": 16, "noise_emb_dim": 8, "groups": 4,
             "dropout": 0.0, "num_res_blocks": 1, "attn_resolutions": []}


def test_dm_gradient_vanishes_when_fake_equals_real():
    den = build_denoiser(TINY_ARCH, 10, 8, 0.5).eval()
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    loss, grad = distribution_matching_loss(x, den, den, torch.full((4,), 2.0), y, torch.randn_like(x))
    loss.backward()
    assert torch.count_nonzero(grad) == 0 and torch.count_nonzero(x.grad) == 0 and loss.item() == 0


def test_surrogate_loss_gradient_is_the_dm_direction():
    x = torch.randn(3, 3, 4, 4, requires_grad=True)
    real = gaussian_optimal_denoiser(torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.5))
    fake = gaussian_optimal_denoiser(torch.full((3, 4, 4), 0.2), torch.full((3, 4, 4), 0.9))
    sigma, noise = torch.tensor([0.3, 1.0, 5.0]), torch.randn(3, 3, 4, 4)
    loss, grad = distribution_matching_loss(x, real, fake, sigma, torch.zeros(3, dtype=torch.long), noise)
    loss.backward()
    assert torch.allclose(x.grad, grad / x.numel(), atol=1e-9)
    # and the direction is (p_real - p_fake) / mean|p_real| with p = x - D(x + sigma n)
    x_t = x.detach() + sigma.view(-1, 1, 1, 1) * noise
    p_real, p_fake = x.detach() - real(x_t, sigma, None), x.detach() - fake(x_t, sigma, None)
    expected = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_dm_gradient_is_nan_safe():
    x = torch.zeros(2, 1, 2, 2)
    g = dm_gradient(x, torch.zeros_like(x), torch.ones_like(x))  # |p_real| = 0 -> division by zero
    assert torch.isfinite(g).all()


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(m, diag(exp(log_s)^2)), with m and log_s learnable: a fake score model whose
    family contains the generator's distribution."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.m, self.log_s = nn.Parameter(mean.clone()), nn.Parameter(std.log().clone())

    def forward(self, x, sigma, labels):
        return gaussian_optimal_denoiser(self.m, self.log_s.exp())(x, sigma, labels)


def test_dm_training_pulls_a_generator_to_the_data_distribution():
    """Data N(mu, s^2) in 4 dims; generator x = a*z + b starts at N(0, 1); the real score is the exact
    denoiser, the fake score starts as a copy of it (as in DMD2) and is trained on generator samples.
    Measured: the distance |b - mu| + ||a| - s| falls from 4.4 to ~0.03 in 1000 steps (> 100x); we require 20x."""
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -0.5, 0.3, 0.0]).view(4, 1, 1)
    s = torch.tensor([0.3, 0.5, 0.2, 0.4]).view(4, 1, 1)
    real, fake = gaussian_optimal_denoiser(mu, s), GaussianDenoiser(mu, s)
    a, b = nn.Parameter(torch.ones(4, 1, 1)), nn.Parameter(torch.zeros(4, 1, 1))
    gen_opt, fake_opt = torch.optim.Adam([a, b], lr=1e-2), torch.optim.Adam(fake.parameters(), lr=3e-2)
    sigmas, batch, labels = dmd_timestep_sigmas(1000), 256, torch.zeros(256, dtype=torch.long)

    def distance() -> float:
        return ((b - mu).abs().sum() + (a.abs() - s).abs().sum()).item()

    start = distance()
    for step in range(1000):
        x = a * torch.randn(batch, 4, 1, 1) + b
        if step % 5 == 0:
            t = torch.randint(20, 981, (batch,))
            loss, _ = distribution_matching_loss(x, real, fake, sigmas[t], labels, torch.randn_like(x))
            gen_opt.zero_grad()
            loss.backward()
            gen_opt.step()
        t = torch.randint(0, 1000, (batch,))
        fake_opt.zero_grad()
        # the fake score's loss: EDM denoising on detached samples (weight 1/sigma^2 + 1/sigma_data^2)
        denoising_loss(fake, x.detach(), sigmas[t], labels, torch.randn_like(x)).backward()
        fake_opt.step()
    assert start > 4 and distance() < start / 20, (start, distance())


def test_update_schedule_and_frozen_teacher():
    """Over N steps the generator is updated ceil(N / ratio) times, the fake score N times, the teacher never."""
    torch.manual_seed(0)
    teacher = build_denoiser(TINY_ARCH, 10, 8, 0.5)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = distill_model(teacher, DistillSettings())
    gen_before = [p.detach().clone() for p in model.generator.parameters()]
    opts = {"generator": adamw(model.generator.parameters(), 1e-3, (0.9, 0.999), 0.01),
            "guidance": adamw(model.guidance.fake_unet.parameters(), 1e-3, (0.9, 0.999), 0.01)}
    upds = {"generator": Updater("generator loss", list(model.generator.parameters()), opts["generator"], 1e-3, LRSchedule(0),
                                 10.0, "stop"),
            "guidance": Updater("guidance loss", model.guidance.trainable(), opts["guidance"], 1e-3, LRSchedule(0), 10.0, "stop")}
    steps, ratio = 7, 3
    s = DistillState(model, model.generator, model.guidance, upds, BatchRNG(), nullcontext, ratio)
    updates = 0
    for step in range(steps):  # the runner's schedule
        logs = distill_step(s, Batch(torch.randint(0, 10, (4,)), torch.randn(1, 4, 3, 8, 8), 0), step)
        updates += "loss_dm" in logs
        assert all(p.grad is None for p in model.guidance.real_unet.parameters())
    adam_steps = lambda opt: {int(s["step"]) for s in opt.state_dict()["state"].values()}  # noqa: E731
    assert updates == 3 and adam_steps(opts["generator"]) == {3} and adam_steps(opts["guidance"]) == {7}
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.guidance.real_unet.state_dict().items())
    assert not any(p.requires_grad for p in model.guidance.real_unet.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.generator.parameters(), gen_before))


def test_generator_and_fake_start_as_copies_of_the_teacher():
    teacher = build_denoiser(TINY_ARCH, 10, 8, 0.5)
    model = distill_model(teacher, DistillSettings())
    ref = teacher.state_dict()
    for net in (model.generator, model.guidance.fake_unet):
        assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(net.parameters(), teacher.parameters()))


def test_teacher_distill_generate_end_to_end(dmd2_run, teacher_ckpt, tmp_path):
    out = dmd2_run  # train.py stage=distill max_steps=5 dfake_gen_update_ratio=2 (tests/conftest.py)
    state = load_checkpoint(str(out / "dmd2_final.pt"), kind="dmd2")
    assert state["step"] == 5 and state["conditioning_sigma"] == 80.0
    steps = {int(s["step"]) for s in state["generator_updater"]["optimizer"]["state"].values()}
    assert steps == {3}  # ceil(5 / 2) generator updates, at steps 0, 2, 4
    assert {int(s["step"]) for s in state["guidance_updater"]["optimizer"]["state"].values()} == {5}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss_dm" in r] == [1, 3, 5]
    assert all("train/loss_fake" in r and "train/guidance_grad_norm" in r for r in rows)
    assert (out / "samples" / "samples_teacher_000000.png").is_file()
    assert (out / "samples" / "samples_generator_000005.png").is_file()
    # the teacher (step 0) and the generator EMA from the same noise, side by side, class names on the left
    beside = Image.open(out / "samples" / "samples_teacher_vs_generator_000005.png")
    single = Image.open(out / "samples" / "samples_generator_ema_000005.png")
    assert beside.width > single.width + 2 * 32 and beside.height == single.height  # two panels of 2 columns

    gen_out = tmp_path / "generated"
    proc = run_cli("generate.py", f"checkpoint={out / 'dmd2_final.pt'}", f"output_dir={gen_out}", "seeds=0-29",
                   "device=cpu", f"hydra.run.dir={tmp_path / 'h2'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DMD2 generator checkpoint" in proc.stdout
    assert sorted(p.name for p in (gen_out / "class03").iterdir()) == ["000003.png", "000013.png", "000023.png"]
    assert len(list(gen_out.glob("*/*.png"))) == 30 and (gen_out / "grid.png").is_file()
    assert "generate.py" not in (tmp_path / "h2" / "generate.log").read_text() and \
        "wrote 30 images" in (tmp_path / "h2" / "generate.log").read_text()  # messages reach Hydra's log file

    # a teacher checkpoint: the Heun sampler with sampler.steps (2 steps = 3 NFE); generate.py's own function
    import generate as generate_script

    result = generate_script.generate(compose_cfg([f"checkpoint={teacher_ckpt}", f"output_dir={tmp_path / 'gen_t'}",
                                                   "seeds=0-9", "sampler.steps=2", "device=cpu"], "generate"))
    assert (result["kind"], result["nfe"], result["num_images"]) == ("teacher", 3, 10)


def test_generate_is_reproducible(teacher_ckpt, tmp_path):
    from dmd2.io.checkpoint import load_checkpoint
    from dmd2.io.sampler import generate_uint8, sampler_from_checkpoint

    sampler = sampler_from_checkpoint(load_checkpoint(str(teacher_ckpt)), "cpu", heun_steps=1)
    a = torch.cat([im for im, _ in generate_uint8(sampler, 12, seed=3, batch_size=5)])
    b = torch.cat([im for im, _ in generate_uint8(sampler, 12, seed=3, batch_size=12)])
    labels = torch.cat([lab for _, lab in generate_uint8(sampler, 12, seed=3, batch_size=12)])
    assert torch.equal(a, b) and labels.tolist() == [i % 10 for i in range(12)]


@pytest.mark.parametrize("overrides,message", [
    (["dfake_gen_update_ratio=0"], "'dfake_gen_update_ratio'"),
    (["min_step_percent=0.9", "max_step_percent=0.5"], "min_step_percent < max_step_percent"),
    (["teacher_checkpoint=/nonexistent/teacher.pt"], "teacher_checkpoint"),
    (["arch.channels=[8,8]"], "contradicts the teacher checkpoint"),
    (["fake_warmup_steps=4"], "config key 'fake_warmup_steps' = 4: the generator's first update would be at step 4"),
])
def test_distill_bad_inputs(overrides, message, teacher_ckpt, tiny_data, tmp_path):
    start = time.perf_counter()
    proc = run_cli("train.py", *SMOKE, "stage=distill", "data=image_folder", f"data.root={tiny_data}",
                   f"teacher_checkpoint={teacher_ckpt}", *overrides, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert time.perf_counter() - start < 120  # refused at the start, not after a run (generous: a loaded machine)


def test_a_non_teacher_checkpoint_is_refused(tiny_data, tmp_path):
    bogus = tmp_path / "not_a_teacher.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    proc = run_cli("train.py", *SMOKE, "stage=distill", "data=image_folder", f"data.root={tiny_data}",
                   f"teacher_checkpoint={bogus}", f"hydra.run.dir={tmp_path / 'h'}")
    assert proc.returncode != 0 and "not a checkpoint of this project" in proc.stderr


def test_the_smoke_distillation_makes_real_generator_updates(dmd2_run):
    """README's "Try it first" settings (debug=smoke, dfake_gen_update_ratio=2): the update at step 0 has a zero DM
    gradient (fake = teacher), the one at step 2 a non-zero one."""
    rows = [json.loads(line) for line in (dmd2_run / "metrics.jsonl").read_text().splitlines()]
    grads = [row["train/dm_grad_norm"] for row in rows if "train/dm_grad_norm" in row]
    assert len(grads) >= 2 and grads[0] == 0.0 and grads[1] > 0.0
