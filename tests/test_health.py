"""Health diagnostics of a distillation: the gradient balance and saturated pixels (dmd2.method.health), the
alerts (dmd2.train.health) and the denoiser panels; none of them changes what training computes."""
from __future__ import annotations

import math

import pytest
import torch

from dmd2.config.settings import DistillSettings
from dmd2.io.weights import build_denoiser
from dmd2.method.guidance import DM_GRAD_NORM
from dmd2.method.health import (GAN_GRAD_NORM, GRAD_RATIO, balance_ratio, per_sample_gradient_norms,
                                saturated_fraction)
from dmd2.method.randomness import BatchRNG
from dmd2.train.distill import distill_model
from tests.test_full_method import TINY_ARCH


def test_per_sample_gradient_norms_are_in_the_dm_gradients_units():
    x0 = torch.randn(4, 3, 2, 2)
    w = torch.randn(4, 3, 2, 2)
    x = x0.clone().requires_grad_(True)
    y = x * 2.0
    loss = (w * y).sum(dim=(1, 2, 3)).mean()  # d loss / d x_b = 2 w_b / B
    norms = per_sample_gradient_norms(loss, y)
    torch.testing.assert_close(norms, (w / 4 * y.numel()).flatten(1).norm(dim=1))
    # the DM surrogate: its gradient in these units is g itself
    g = torch.randn_like(x0)
    xs = x0.clone().requires_grad_(True)
    dm = 0.5 * torch.nn.functional.mse_loss(xs, (xs - g).detach())
    torch.testing.assert_close(per_sample_gradient_norms(dm, xs), g.flatten(1).norm(dim=1))
    assert x.grad is None  # nothing accumulated


def test_balance_ratio_and_saturation():
    assert balance_ratio(0.5, torch.tensor(4.0), torch.tensor(2.0)).item() == 1.0
    assert math.isnan(balance_ratio(1.0, torch.tensor(1.0), torch.tensor(0.0)).item())  # undefined at step 0
    x = torch.tensor([-1.5, -1.0, -0.99, 0.0, 0.5, 1.0, 2.0, 0.3])
    assert saturated_fraction(x).item() == pytest.approx(4 / 8)


def test_generator_loss_logs_the_gradient_balance_and_leaves_the_update_unchanged():
    def model_and_inputs():
        torch.manual_seed(0)
        teacher = build_denoiser(TINY_ARCH, 10, 16, 0.5)
        model = distill_model(teacher, DistillSettings(gan_classifier=True, gen_cls_loss_weight=0.3))
        with torch.no_grad():  # a fake score network unlike the teacher: a non-zero DM gradient
            for p in model.guidance.fake_unet.parameters():
                p.add_(0.01 * torch.randn_like(p))
        z, y = torch.randn(1, 4, 3, 16, 16), torch.arange(4)
        return model, z, y

    grads = []
    for with_balance in (True, False):
        model, z, y = model_and_inputs()
        if not with_balance:
            model.gradient_balance = lambda *args: {}
        x = model.generate(z, y)
        loss, logs = model.generator_loss(x, y, BatchRNG(3))
        loss.backward()
        grads.append([p.grad.clone() for p in model.generator.parameters()])
        if with_balance:
            assert logs[GAN_GRAD_NORM] > 0 and logs[DM_GRAD_NORM] > 0
            ratio = 0.3 * logs[GAN_GRAD_NORM] / logs[DM_GRAD_NORM]
            torch.testing.assert_close(logs[GRAD_RATIO], ratio)
            for net in (model.guidance.fake_unet, model.guidance.gan_head):
                assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # bitwise: the diagnostic does not touch the update


def monitor(tmp_path, **overrides):
    from omegaconf import OmegaConf

    from dmd2.config.settings import HealthSettings
    from dmd2.train.health import HealthMonitor
    from dmd2.train.logger import RunLogger

    logger = RunLogger(str(tmp_path), {"name": "none"}, {}, "distill")
    h = OmegaConf.merge(OmegaConf.structured(HealthSettings), overrides)
    return HealthMonitor(h, "eval/mixture_fd", logger).attach(), logger


def test_rising_run():
    from dmd2.train.health import rising_run

    assert rising_run([3.0]) == 0 and rising_run([3.0, 2.0]) == 0 and rising_run([1.0, 2.0, 3.0]) == 2
    assert rising_run([5.0, 1.0, 2.0, 2.0]) == 0 and rising_run([5.0, 1.0, 2.0, 4.0, 9.0]) == 3


def test_alerts_fire_once_per_event_with_their_step_and_rearm_after_clearing(tmp_path, caplog):
    import json

    mon, logger = monitor(tmp_path, fd_rise_evals=2)
    rows = [(0, {"eval/mixture_fd": 2.0, "eval/recall": 0.0}),  # the starting point: never an alert
            (1, {"train/saturated_fraction": 0.0, "train/gan_dm_grad_ratio": float("nan")}),
            (2, {"train/saturated_fraction": 0.5}),               # fires
            (3, {"train/saturated_fraction": 0.6}),               # still holds: quiet
            (4, {"train/saturated_fraction": 0.0}),               # clears
            (5, {"train/saturated_fraction": 0.7, "train/gan_dm_grad_ratio": 50.0}),  # fires again, and the band
            (10, {"eval/mixture_fd": 1.0, "eval/recall": 0.9, "eval/class_entropy": 1.0}),
            (20, {"eval/mixture_fd": 1.1, "eval/recall": 0.2, "eval/class_entropy": 0.1}),
            (30, {"eval/mixture_fd": 1.2, "eval/recall": 0.1})]
    with caplog.at_level("WARNING"):
        for step, metrics in rows:
            logger.log(metrics, step)
    logger.finish()
    fired = [(e.name, e.step) for e in mon.events]
    assert fired == [("saturated_pixels", 2), ("saturated_pixels", 5), ("grad_ratio_out_of_band", 5),
                     ("recall_low", 20), ("class_entropy_low", 20), ("fd_rising", 30)]  # 2.0 -> 1.0 -> 1.1 -> 1.2
    assert caplog.text.count("ALERT") == 6 and "[health] step 20: ALERT recall_low" in caplog.text
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    alerts = [(r["alert"], r["step"]) for r in events if "alert" in r]
    assert alerts == fired


def test_fd_rising_needs_a_rise_beyond_the_tolerance(tmp_path):
    def fired(fds, **overrides):
        mon, logger = monitor(tmp_path / str(len(list(tmp_path.iterdir()))), **overrides)
        for step, fd in enumerate(fds):
            logger.log({"eval/mixture_fd": fd}, step)
        logger.finish()
        return [(e.name, e.step) for e in mon.events]

    creep = [2.0, 1.0, 1.01, 1.02, 1.03]  # three rises in a row, 3 % in all: evaluation noise at the default 5 %
    assert fired(creep) == []
    assert fired(creep, fd_rise_min=0.0) == [("fd_rising", 4)]  # control: any rise, as before the tolerance
    assert fired(creep, fd_rise_min=0.02) == [("fd_rising", 4)]
    assert fired([2.0, 1.0, 1.02, 1.04, 1.06]) == [("fd_rising", 4)]  # 6 % over the run
    # the run's rise counts from its start, so a long slow climb alerts once it has added up
    assert fired([2.0, 1.0, 1.01, 1.02, 1.03, 1.04, 1.07]) == [("fd_rising", 6)]
    assert fired([2.0, 1.0, 1.1, 1.2, 1.3], fd_rise_evals=4) == []  # too few rises, however large


def test_healthy_numbers_raise_nothing(tmp_path):
    mon, logger = monitor(tmp_path)
    for step, fd in enumerate([5.0, 3.0, 3.5, 2.0, 2.1, 1.5]):
        logger.log({"eval/mixture_fd": fd, "eval/recall": 0.7, "eval/class_entropy": 0.99,
                    "train/saturated_fraction": 0.001, "train/gan_dm_grad_ratio": 0.5}, step)
    logger.finish()
    assert mon.events == []


def test_denoiser_panels_are_written_and_touch_no_random_stream(tmp_path):
    from dmd2.train.health import DenoiserPanels
    from dmd2.train.logger import RunLogger

    torch.manual_seed(0)
    teacher = build_denoiser(TINY_ARCH, 10, 16, 0.5)
    model = distill_model(teacher, DistillSettings(denoising_sigmas=[80.0, 2.5]))
    z, y = torch.randn(2, 20, 3, 16, 16), torch.arange(20) // 2
    panels = DenoiserPanels.build(z, y, 2, 4, [0.5, 2.0, 10.0], model.denoising_sigmas, seed=0)
    assert panels.y.tolist() == [0, 1, 2, 3]
    logger = RunLogger(str(tmp_path), {"name": "none"}, {}, "distill")
    state = torch.random.get_rng_state()
    panels.log(logger, model.generator, model.guidance.real_unet, model.guidance.fake_unet, 7)
    assert torch.equal(state, torch.random.get_rng_state())
    assert model.generator.training and model.guidance.fake_unet.training
    for name in ("diagnostics_denoiser_000007.png", "diagnostics_chain_000007.png"):
        assert (tmp_path / "samples" / name).stat().st_size > 1000


@pytest.mark.slow
def test_a_distillation_trains_bitwise_the_same_with_the_panels_and_alerts(teacher_ckpt, tiny_data, tmp_path):
    """experiment=cpu_smoke (GAN head, two-step generator, EMA): final weights with health.panels and
    health.alerts on and off are bitwise equal (the gradient balance is always computed; unit-tested above)."""
    from tests.conftest import compose_cfg
    from train import train

    finals = []
    for on in ("true", "false"):
        out = tmp_path / on
        train(compose_cfg(["experiment=cpu_smoke", f"teacher_checkpoint={teacher_ckpt}", "logger=none",
                           "data=image_folder", f"data.root={tiny_data}", f"health.panels={on}",
                           f"health.alerts={on}", f"output_dir={out}"]))
        finals.append(torch.load(out / "dmd2_final.pt", map_location="cpu", weights_only=True))
    assert any((tmp_path / "true" / "samples").glob("diagnostics_chain_*.png"))
    assert not any((tmp_path / "false" / "samples").glob("diagnostics_*.png"))
    for key in ("generator", "fake_unet", "gan_head", "generator_ema"):
        assert all(torch.equal(finals[0][key][n], finals[1][key][n]) for n in finals[0][key]), key
