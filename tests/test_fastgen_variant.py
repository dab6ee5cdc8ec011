"""FastGen's DMD2 choices (gan_features=teacher, update_schedule=alternate, fake_score_weighting=none,
fake_score_timesteps=dm, dm_eps, r1_weight): what each one changes, on tiny networks on the CPU. Their equality
with FastGen's own functions on identical inputs was measured outside the suite (the closing note of the issue);
here the facts are held that can be stated without FastGen's code."""
from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from conftest import SMOKE, compose_cfg

from dmd2.config.errors import ConfigError
from dmd2.config.settings import DistillSettings
from dmd2.io.weights import build_denoiser
from dmd2.method import losses as L
from dmd2.method.randomness import BatchRNG
from dmd2.networks.discriminator import FeatureDiscriminator, feature_channels, norm_groups
from dmd2.train.distill import Batch, DistillState, build_updaters, distill_model, distill_step, generator_turn

TINY = {"name": "simple_unet", "channels": [8, 16, 16], "emb_dim": 16, "noise_emb_dim": 8, "groups": 4,
        "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
FASTGEN = dict(gan_classifier=True, gan_features="teacher", gan_feature_resolutions=[16, 8], update_schedule="alternate",
               fake_score_timesteps="dm", fake_score_weighting="none", dm_eps=1e-6, min_step_percent=0.002,
               max_step_percent=0.998, cls_loss_weight=1.0, gen_cls_loss_weight=1e-3, dfake_gen_update_ratio=5,
               discriminator_lr=1e-3)


def test_the_alternate_schedule_is_fastgens_and_every_is_the_official():
    """FastGen's trainer runs iterations 1, 2, ... and updates the generator alone when the iteration is a
    multiple of 5 (its dmd2.py), so step s here is its iteration s + 1; the official code updates the generator on
    steps 0, 5, 10 (and the fake score network on every step)."""
    assert [s for s in range(12) if generator_turn(s, 5, "alternate")] == [4, 9]
    assert [s for s in range(12) if generator_turn(s, 5, "every")] == [0, 5, 10]


def test_the_recipe_size_discriminator_has_fastgens_parameter_count():
    """FastGen's CIFAR-10 discriminator (three heads on 256-channel features at 32, 16, 8 px) has 9,444,867
    parameters (counted on its own module); the heads' logits are concatenated."""
    disc = FeatureDiscriminator([256, 256, 256], [32, 16, 8])
    assert sum(p.numel() for p in disc.parameters()) == 9_444_867
    logits = disc([torch.randn(2, 256, r, r) for r in (32, 16, 8)])
    assert logits.shape == (2, 3)
    assert norm_groups(256) == 32 and norm_groups(24) == 24 and norm_groups(48) == 24
    with pytest.raises(ValueError, match="power-of-two"):
        FeatureDiscriminator([8], [12])


def test_teacher_features_are_the_last_encoder_output_at_each_size():
    teacher = build_denoiser(TINY, 10, 16, 0.5).eval()
    assert feature_channels(teacher.net, 16, [16, 8]) == [16, 16]
    x, sigma, y = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 3, 9])
    feats = teacher.features(x, sigma, y, [16, 8])
    assert [tuple(f.shape) for f in feats] == [(3, 16, 16, 16), (3, 16, 8, 8)]
    with pytest.raises(ValueError, match="no output at \\[4\\] px"):
        teacher.features(x, sigma, y, [4])


def test_fake_score_weighting_none_is_the_plain_mse_and_the_dm_eps_enters_the_normaliser():
    d, x0, sigma = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0.01, 0.1, 1.0, 10.0])
    assert torch.allclose(L.fake_score_loss(d, x0, sigma, 0.5, "none"), ((d - x0) ** 2).mean())
    edm = L.fake_score_loss(d, x0, sigma, 0.5, "edm")
    assert not torch.allclose(edm, ((d - x0) ** 2).mean())  # the EDM weight (1/sigma^2 + 4) matters
    x = torch.zeros(1, 3, 2, 2)
    real, fake = torch.full_like(x, 1e-3), torch.full_like(x, 2e-3)  # mean |x - real| = 1e-3, fake - real = 1e-3
    assert torch.allclose(L.dm_gradient(x, real, fake), torch.full_like(x, 1.0))
    assert torch.allclose(L.dm_gradient(x, real, fake, eps=1e-3), torch.full_like(x, 0.5))


def fastgen_state(**overrides):
    torch.manual_seed(0)
    settings = DistillSettings(**{**FASTGEN, **overrides})
    model = distill_model(build_denoiser(TINY, 10, 16, 0.5), settings)
    upds = build_updaters(model, None, settings, fused=False)
    return model, upds, DistillState(model, model.generator, model.guidance, upds, BatchRNG(), nullcontext, 5,
                                     "alternate")


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def moved(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_alternate_steps_update_either_the_generator_or_the_critic_never_both():
    model, upds, s = fastgen_state(r1_weight=10.0)
    g = model.guidance
    assert g.gan_head is None and g.discriminator is not None
    lrs = [group["lr"] for group in upds["guidance"].optimizer.param_groups]
    assert len(lrs) == 2 and upds["guidance"].optimizer.param_groups[1]["base_lr"] == 1e-3
    batch = Batch(torch.randint(0, 10, (4,)), torch.randn(1, 4, 3, 16, 16), 0, torch.rand(4, 3, 16, 16) * 2 - 1)
    teacher = snapshot(g.real_unet)
    for step in range(6):
        before = {"generator": snapshot(model.generator), "fake": snapshot(g.fake_unet),
                  "disc": snapshot(g.discriminator)}
        logs = distill_step(s, batch, step)
        generator_step = step == 4
        assert moved(before["generator"], model.generator) == generator_step, step
        assert moved(before["fake"], g.fake_unet) == (not generator_step), step
        assert moved(before["disc"], g.discriminator) == (not generator_step), step
        assert ("loss_dm" in logs and "loss_gen_gan" in logs) == generator_step
        assert ("loss_fake" in logs and "loss_cls" in logs and "loss_r1" in logs) == (not generator_step)
    assert not moved(teacher, g.real_unet)
    assert all(p.grad is None for p in g.real_unet.parameters())


def test_the_generators_gan_gradient_flows_through_the_frozen_teacher_encoder_only():
    model, _, _ = fastgen_state()
    g = model.guidance
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    gan = g.feature_gan_generator_loss(x, (torch.tensor([2, 300, 600, 998]), torch.randn(4, 3, 16, 16)),
                                       torch.tensor([0, 1, 2, 3]))
    gan.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in g.discriminator.parameters())  # frozen while the generator's loss is taken
    assert all(p.grad is None for p in g.real_unet.parameters())
    assert math.isfinite(float(gan))


def test_the_fake_score_loss_draws_the_dm_range_with_fake_score_timesteps_dm():
    model, _, _ = fastgen_state()
    drawn = []
    g = model.guidance
    real_randint = BatchRNG.randint

    class Spy(BatchRNG):
        def randint(self, low, high, n):  # noqa: D102
            drawn.append((low, high))
            return real_randint(self, low, high, n)

    g(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), torch.rand(2, 3, 16, 16), torch.tensor([0, 1]), Spy())
    assert drawn[0] == (2, 999) and drawn[1] == (2, 999)  # the fake score loss, then the real images' timesteps
    official, _, _ = fastgen_state(fake_score_timesteps="all")
    drawn.clear()
    official.guidance(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), torch.rand(2, 3, 16, 16), torch.tensor([0, 1]),
                      Spy())
    assert drawn[0] == (0, 1000)


def test_an_r1_weight_without_the_teacher_discriminator_is_refused():
    from dmd2.config.validate import validate

    base = [*SMOKE, "stage=distill", f"teacher_checkpoint={__file__}"]
    with pytest.raises(ConfigError, match="'r1_weight'"):
        validate(compose_cfg(base + ["r1_weight=10"]))
    validate(compose_cfg(base + ["r1_weight=10", "gan_classifier=true", "gan_features=teacher"]))


@pytest.mark.slow
def test_a_fastgen_run_resumes_to_the_same_weights(teacher_ckpt, tiny_data, tmp_path):
    """The discriminator is kept in checkpoints with its optimizer state: 4 steps straight equal 2 steps, then a
    resumed run's 2 more (alternate schedule at ratio 2: steps 1 and 3 update the generator)."""
    from dmd2.io.checkpoint import load_checkpoint
    from train import train

    base = [*SMOKE, "stage=distill", f"teacher_checkpoint={teacher_ckpt}", "data=image_folder", f"data.root={tiny_data}",
            "sample_every=0", "gan_classifier=true", "gan_features=teacher", "gan_feature_resolutions=[32]",
            "update_schedule=alternate", "dfake_gen_update_ratio=2", "discriminator_lr=1e-3", "save_every=2"]
    train(compose_cfg([*base, "max_steps=4", f"output_dir={tmp_path / 'straight'}"]))
    train(compose_cfg([*base, "max_steps=2", f"output_dir={tmp_path / 'split'}"]))
    train(compose_cfg([*base, "max_steps=4", f"output_dir={tmp_path / 'split'}", "resume=auto"]))
    a, b = (load_checkpoint(str(tmp_path / run / "dmd2_final.pt")) for run in ("straight", "split"))
    assert "discriminator" in a and "gan_head" not in a
    for key in ("generator", "fake_unet", "discriminator"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
