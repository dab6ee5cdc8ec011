"""DMD2 beyond the minimal seed: the GAN classifier, backward simulation, generator EMA, presets."""
from __future__ import annotations

import pytest
import torch

from dmd2.config.settings import DistillSettings
from dmd2.io.checkpoint import load_checkpoint
from dmd2.io.weights import build_denoiser
from dmd2.method.losses import gan_discriminator_loss, gan_generator_loss
from dmd2.method.samplers import backward_simulation, multistep_sample
from dmd2.method.unified import UnifiedModel
from dmd2.networks.gan_head import GANHead
from dmd2.train.distill import chain_step, distill_model
from tests.conftest import compose_cfg

TINY_ARCH = {"name": "simple_unet", "channels": [8, 16, 16], "emb_dim": 16, "noise_emb_dim": 8, "groups": 4,
             "dropout": 0.0, "num_res_blocks": 1, "attn_resolutions": []}


def test_gan_classifier_learns_to_separate_real_from_fake():
    torch.manual_seed(0)
    head = GANHead(16, 4)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    pattern = torch.randn(16, 4, 4)  # real features carry a fixed spatial pattern, fake ones do not
    real, fake = torch.randn(32, 16, 4, 4) + 2 * pattern, torch.randn(32, 16, 4, 4)
    losses, gaps = [], []
    for _ in range(40):
        lr_, lf = head(real), head(fake)
        loss = gan_discriminator_loss(lr_, lf)
        losses.append(loss.item())
        gaps.append((lr_.mean() - lf.mean()).item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0] and gaps[-1] > gaps[0] + 1.0
    # the generator's loss on the same fakes is then high: it is pushed toward "real"
    assert gan_generator_loss(head(fake)).item() > gan_generator_loss(head(real)).item()


def make_model(**kwargs) -> UnifiedModel:
    torch.manual_seed(0)
    teacher = build_denoiser(TINY_ARCH, 10, 16, 0.5)
    return distill_model(teacher, DistillSettings(gan_classifier=True, cls_loss_weight=1.0, gen_cls_loss_weight=1.0,
                                                 **kwargs))


def test_generator_side_gan_gradient_reaches_only_the_generator():
    model = make_model()
    teacher_before = {k: v.clone() for k, v in model.guidance.real_unet.state_dict().items()}
    z, y = torch.randn(1, 4, 3, 16, 16), torch.randint(0, 10, (4,))
    x = model.generate(z, y)
    gan = model.guidance.generator_gan_loss(x, y)
    gan.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    for net in (model.guidance.fake_unet, model.guidance.gan_head, model.guidance.real_unet):
        assert all(p.grad is None for p in net.parameters())
    # trainable guidance parameters are trainable again afterwards; the teacher stays frozen
    assert all(p.requires_grad for p in model.guidance.trainable())
    assert not any(p.requires_grad for p in model.guidance.real_unet.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.guidance.real_unet.state_dict().items())


def test_guidance_loss_with_gan_trains_fake_score_and_head_not_generator():
    model = make_model()
    z, y = torch.randn(1, 4, 3, 16, 16), torch.randint(0, 10, (4,))
    with torch.no_grad():
        x = model.generate(z, y)
    loss, logs = model.guidance(x, y, torch.rand(4, 3, 16, 16) * 2 - 1, y)
    loss.backward()
    assert set(logs) == {"loss_fake", "loss_cls"}
    assert all(p.grad is not None for p in model.guidance.gan_head.parameters())
    assert any(p.grad is not None for p in model.guidance.fake_unet.parameters())
    assert all(p.grad is None for p in model.generator.parameters())
    assert all(p.grad is None for p in model.guidance.real_unet.parameters())


class RecordingGenerator(torch.nn.Module):
    """A stub generator: remembers each call's input, sigma and whether autograd was recording."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[tuple[torch.Tensor, float, bool]] = []

    def forward(self, x, sigma, labels):
        self.calls.append((x.detach().clone(), float(sigma[0]), torch.is_grad_enabled()))
        return self.scale * x / (1 + sigma.view(-1, 1, 1, 1))


def test_backward_simulation_sigmas_fresh_noise_and_one_gradient_step():
    sigmas = [80.0, 10.0, 1.0, 0.1]
    noise = torch.randn(4, 2, 3, 4, 4)
    for k in range(4):
        gen = RecordingGenerator()
        out = backward_simulation(gen, noise, torch.zeros(2, dtype=torch.long), sigmas, k)
        assert [c[1] for c in gen.calls] == pytest.approx(sigmas[: k + 1])  # the configured sigmas, descending
        assert [c[2] for c in gen.calls] == [False] * k + [True]  # gradient through the last step only
        assert torch.equal(gen.calls[0][0], noise[0] * 80.0)
        for i in range(1, k + 1):  # each re-noising adds the next, fresh noise draw
            x0_prev = gen.scale.detach() * gen.calls[i - 1][0] / (1 + sigmas[i - 1])
            assert torch.allclose(gen.calls[i][0], x0_prev + sigmas[i] * noise[i], atol=1e-5)
        out.sum().backward()
        assert gen.scale.grad is not None
    # the sampler runs the whole chain without gradient
    gen = RecordingGenerator()
    multistep_sample(gen, noise, torch.zeros(2, dtype=torch.long), sigmas)
    assert len(gen.calls) == 4 and not any(c[2] for c in gen.calls)


def test_chain_depth_is_a_function_of_seed_and_step():
    draws = [chain_step(0, s, 4) for s in range(200)]
    assert draws == [chain_step(0, s, 4) for s in range(200)]  # same on every rank / after resume
    assert set(draws) == {0, 1, 2, 3} and chain_step(0, 5, 1) == 0


EDM_TINY = ["arch=edm_unet_small", "arch.model_channels=8", "arch.num_blocks=1"]


def run_ok(*args: str) -> None:
    """train.py's run of these overrides, in this process (the Hydra run folder overrides are the CLI's)."""
    from train import train

    train(compose_cfg([a for a in args if not a.startswith("hydra.")]))


@pytest.mark.parametrize("preset", ["seed_minimal", "cpu_smoke"])
def test_simple_unet_presets_run_two_steps(preset, teacher_ckpt, tiny_data, tmp_path):
    run_ok(f"experiment={preset}", "debug=smoke", "logger=none", "stage=distill", "max_steps=2",
           "data=image_folder", f"data.root={tiny_data}", f"teacher_checkpoint={teacher_ckpt}",
           f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'h'}")
    state = load_checkpoint(str(tmp_path / "dmd2_final.pt"), kind="dmd2")
    if preset == "cpu_smoke":
        assert state["denoising_sigmas"] == [80.0, 2.5] and "gan_head" in state and "generator_ema" in state


def test_seed_minimal_teacher_runs_two_steps(tiny_data, tmp_path):
    run_ok("experiment=seed_minimal", "debug=smoke", "logger=none", "stage=teacher", "max_steps=2",
           "data=image_folder", f"data.root={tiny_data}", f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'h'}")


@pytest.mark.slow
def test_edm_presets_run_two_steps(tiny_data, tmp_path):
    """edm_teacher_cifar10 -> dmd2_cifar10 and dmd2_cifar10_4step, with a narrow EDM UNet."""
    common = ["debug=smoke", "logger=none", "max_steps=2", "batch_size=4", "sample_every=0", "samples_per_class=1",
              "data=image_folder", f"data.root={tiny_data}"]
    teacher_dir = tmp_path / "teacher"
    run_ok("experiment=edm_teacher_cifar10", *common, *EDM_TINY, f"output_dir={teacher_dir}",
           f"hydra.run.dir={tmp_path / 'h0'}")
    assert load_checkpoint(str(teacher_dir / "teacher_final.pt"))["arch"]["name"] == "edm_unet"
    for i, preset in enumerate(["dmd2_cifar10", "dmd2_cifar10_4step"]):
        out = tmp_path / preset
        run_ok(f"experiment={preset}", *common, "arch=from_teacher",  # the preset's default (debug=smoke sets one)
               f"teacher_checkpoint={teacher_dir / 'teacher_final.pt'}",
               f"output_dir={out}", f"hydra.run.dir={tmp_path / f'h{i + 1}'}")
        state = load_checkpoint(str(out / "dmd2_final.pt"), kind="dmd2")
        assert "gan_head" in state and len(state["denoising_sigmas"]) == (1 if i == 0 else 4)
