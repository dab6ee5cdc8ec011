"""Image quality inside training (eval_every): FID / FD on evaluate.py's code path, its value for sweepers,
and the Optuna search config; plus the distillation settings that follow the official DMD2 training."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

import train as train_script
from dmd2.config.errors import EVALUATION_ERROR, ConfigError, FileError
from dmd2.config.settings import DistillSettings
from dmd2.config.validate import validate
from dmd2.io.checkpoint import load_checkpoint
from dmd2.io.weights import build_denoiser
from dmd2.method.unified import UnifiedModel
from dmd2.train.distill import distill_model
from dmd2.train.optim import EMA, LRSchedule, Updater, adamw, warmup_lr
from tests.conftest import SMOKE, compose_cfg, needs_sweeper, run_cli, train_eval_args

TINY_ARCH = {"name": "simple_unet", "channels": [8, 16], "num_res_blocks": 1, "attn_resolutions": [],
             "noise_emb_dim": 8, "emb_dim": 16, "dropout": 0.1, "groups": 4}
KEY = "eval/fd_tiny-featnet"


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def eval_curve(folder: Path) -> dict[int, float]:
    return {r["step"]: r[KEY] for r in rows(folder) if KEY in r}


# ------------------------------------------------------------------------------------ fidelity to the official DMD2


def dm_gradient(model: UnifiedModel) -> torch.Tensor:
    """The gradient the DM loss sends into the generator's output x, per sample [B]."""
    torch.manual_seed(1)
    z, y = torch.randn(1, 4, 3, 8, 8), torch.randint(0, 10, (4,))
    x = model.generate(z, y).detach().requires_grad_(True)
    loss, _ = model.guidance.dm_loss(x, y)
    loss.backward()
    return x.grad.flatten(1).norm(dim=1)


def test_distillation_dropout_is_zero_so_the_dm_gradient_starts_at_exactly_zero():
    torch.manual_seed(0)
    teacher = build_denoiser(TINY_ARCH, 10, 8, 0.5)  # trained with dropout 0.1
    model = distill_model(teacher, DistillSettings())  # the default: dropout 0 for generator and fake score network
    assert model.generator.training and model.guidance.fake_unet.training and not model.guidance.real_unet.training
    assert torch.equal(dm_gradient(model), torch.zeros(4))
    # the teacher's own architecture is untouched (its dropout layers keep p = 0.1)
    assert {m.p for m in teacher.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    # keeping the teacher's dropout (dropout=None) pushes pure dropout noise into the generator
    noisy = distill_model(build_denoiser(TINY_ARCH, 10, 8, 0.5), DistillSettings(dropout=None))
    assert dm_gradient(noisy).min() > 0


def test_edm_unet_dropout_is_switched_off_the_same_way():
    arch = {"name": "edm_unet", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
            "attn_resolutions": [4], "dropout": 0.13}
    model = distill_model(build_denoiser(arch, 10, 8, 0.5), DistillSettings())
    assert torch.equal(dm_gradient(model), torch.zeros(4))


@pytest.mark.slow
def test_warmup_counts_training_iterations_for_both_networks(teacher_ckpt, tiny_data, tmp_path):
    """Generator every 2nd iteration, warm-up 4 iterations: the generator's last update (iteration 4) runs at the
    full learning rate, like the fake score network's; counted in generator updates it would be at 3/4."""
    assert [warmup_lr(1.0, s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    train_script.train(compose_cfg([*SMOKE, "stage=distill", "data=image_folder", f"data.root={tiny_data}",
                                    f"teacher_checkpoint={teacher_ckpt}", f"output_dir={tmp_path}", "max_steps=5",
                                    "dfake_gen_update_ratio=2", "warmup_steps=4", "generator_lr=1e-3",
                                    "guidance_lr=2e-3"]))
    state = load_checkpoint(str(tmp_path / "dmd2_final.pt"))
    assert state["generator_updater"]["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert state["guidance_updater"]["optimizer"]["param_groups"][0]["lr"] == 2e-3
    logged = {r["step"]: (r["train/generator_lr"], r["train/guidance_lr"]) for r in rows(tmp_path)}
    assert logged[1] == (0.25e-3, 0.5e-3) and logged[3] == (0.75e-3, 1.5e-3) and logged[5] == (1e-3, 2e-3)


def test_without_diffusion_gan_the_classifier_sees_clean_images_at_sigma_min():
    guidance = distill_model(build_denoiser(TINY_ARCH, 10, 8, 0.5), DistillSettings(gan_classifier=True, diffusion_gan=False)).guidance
    x = torch.randn(3, 3, 8, 8)
    seen, sigma = guidance.gan_noise(x)
    assert torch.equal(seen, x) and torch.equal(sigma, torch.full((3,), guidance.sigmas[0].item()))
    noisy, sigma = distill_model(build_denoiser(TINY_ARCH, 10, 8, 0.5), DistillSettings(gan_classifier=True)).guidance.gan_noise(x)
    assert not torch.equal(noisy, x) and sigma.shape == (3,)


@pytest.mark.parametrize("with_ema", [True, False])
def test_a_skipped_update_changes_nothing_and_is_counted(with_ema):
    """One behaviour for both stages: weights, optimizer state and EMA stay as they were."""
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    params = list(net.parameters())
    upd = Updater("loss", params, adamw(params, 0.1, (0.9, 0.999), 0.0), 0.1, LRSchedule(0), 1.0, "skip",
                  EMA(ema, net, lambda _: 0.5) if with_ema else None)
    upd.update(net(torch.ones(1, 3)).sum(), 0)
    before = [t.detach().clone() for t in [*net.parameters(), *ema.parameters()]]
    adam_before = upd.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    assert upd.update(net(torch.ones(1, 3)).sum() * float("nan"), 1) is None
    assert upd.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, [*net.parameters(), *ema.parameters()]))
    assert torch.equal(upd.optimizer.state_dict()["state"][0]["exp_avg"], adam_before)
    assert upd.update(net(torch.ones(1, 3)).sum(), 2) is not None and upd.skipped == 1
    assert not torch.equal(before[0], net.weight) and (not with_ema or not torch.equal(before[2], ema.weight))


# ------------------------------------------------------------------------------------ evaluation inside training


def distill_with_eval(teacher_ckpt: Path, tiny_data: Path, featnet: Path, out: Path, *extra: str) -> None:
    """A 4-step distillation measuring the FD every 2 steps, trained in this process."""
    train_script.train(compose_cfg([*SMOKE, "stage=distill", "data=image_folder", f"data.root={tiny_data}",
                                    f"teacher_checkpoint={teacher_ckpt}", f"output_dir={out}", "max_steps=4",
                                    "dfake_gen_update_ratio=2", "generator_ema_decay=0.5",
                                    *train_eval_args(featnet, tiny_data, out.parent / "fid_stats", every=2, num=30),
                                    *extra]))


@pytest.mark.slow
def test_distill_logs_the_fd_curve_equal_to_evaluate_py(teacher_ckpt, tiny_data, featnet, tmp_path, caplog):
    import evaluate as evaluate_script

    caplog.set_level("INFO")
    out = tmp_path / "run"
    distill_with_eval(teacher_ckpt, tiny_data, featnet, out)
    curve = eval_curve(out)
    assert sorted(curve) == [0, 2, 4] and all(v > 0 for v in curve.values())
    costs = [r for r in rows(out) if KEY in r]
    assert all(r[f"{KEY}_std"] > 0 for r in costs)  # each value with its bootstrap standard deviation
    assert "(fd_tiny-featnet@30: 30 samples" in caplog.text
    assert all(r["eval/seconds"] > 0 and r["eval/images_per_sec"] > 0 and r["eval/nfe"] == 1 for r in costs)
    assert "[eval] step 4: FD (tiny-featnet)" in caplog.text and "images/s" in caplog.text
    state = load_checkpoint(str(out / "dmd2_final.pt"))
    assert state["evaluation"]["best"] == min(curve.values()) and state["evaluation"]["last"] == curve[4]
    # evaluate.py on the final checkpoint (its generator EMA, the same samples) gives the value logged at step 4
    evaluate_script.evaluate(compose_cfg([f"checkpoint={out / 'dmd2_final.pt'}",
                                          *train_eval_args(featnet, tiny_data, tmp_path / "fid_stats", num=30,
                                                           prefix=""),
                                          "num_workers=0", "logger=none", f"output_dir={tmp_path / 'eval'}"],
                                         config_name="evaluate"))
    (row,) = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert row["weights"] == "ema" and row["value"] == pytest.approx(curve[4], rel=1e-6)


@pytest.mark.slow
def test_evaluation_does_not_change_training(teacher_ckpt, tiny_data, featnet, tmp_path):
    """The random streams are left as they were: with or without evaluation, the same weights."""
    for name, extra in (("with", []), ("without", ["eval_every=0"])):
        distill_with_eval(teacher_ckpt, tiny_data, featnet, tmp_path / name, "gan_classifier=true", *extra)
    a, b = (load_checkpoint(str(tmp_path / n / "dmd2_final.pt")) for n in ("with", "without"))
    for key in ("generator", "fake_unet", "gan_head", "generator_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert eval_curve(tmp_path / "without") == {}


def test_teacher_evaluation_and_the_objective_for_sweepers(tiny_data, featnet, tmp_path):
    cfg = compose_cfg([*SMOKE, "data=image_folder", f"data.root={tiny_data}", f"output_dir={tmp_path}",
                       "eval.sampler_steps=2", *train_eval_args(featnet, tiny_data, tmp_path / "fid_stats")])
    result = train_script.train(cfg)
    curve = eval_curve(tmp_path)
    assert sorted(curve) == [2, 4]  # the teacher is not measured at step 0 (a random network)
    assert result["objective_key"] == f"{KEY}_best"
    assert train_script.objective(result, None) == min(curve.values())
    assert train_script.objective(result, KEY) == curve[4]
    assert train_script.objective(result, "train/loss") == result["metrics"]["train/loss"]
    with pytest.raises(ConfigError, match="'optimized_metric' = 'eval/fid'"):
        train_script.objective(result, "eval/fid")
    assert result["metrics"][f"{KEY}_std"] > 0  # the last value's bootstrap standard deviation
    # without evaluation there is no default objective: a loss only when named
    cfg = compose_cfg([*SMOKE, "data=image_folder", f"data.root={tiny_data}", f"output_dir={tmp_path / 'off'}"])
    result = train_script.train(cfg)
    assert result["objective_key"] is None and train_script.objective(result, None) is None
    assert math.isfinite(train_script.objective(result, "train/loss"))


@pytest.mark.parametrize("overrides, message", [
    (["data.resolution=16"], "the images measured are 16x16, the reference images (tiny) 32x32"),
    (["eval.num_samples=8"], "'eval.num_samples' = 8: fewer samples than the feature dimension (8)"),
])
def test_an_evaluation_that_does_not_fit_stops_the_run_before_its_first_step(overrides, message, tiny_data, featnet,
                                                                             tmp_path):
    cfg = compose_cfg([*SMOKE, "data=image_folder", f"data.root={tiny_data}", f"output_dir={tmp_path}",
                       *train_eval_args(featnet, tiny_data, tmp_path / "fid_stats"), *overrides])
    with pytest.raises(Exception, match=re.escape(message)):
        train_script.train(cfg)
    assert not (tmp_path / "teacher_000002.pt").exists()


@pytest.mark.slow
@needs_sweeper
def test_optuna_search_minimises_the_eval_metric(teacher_ckpt, tiny_data, featnet, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "hparams_search=distill_optuna", "hydra.sweeper.n_trials=2",
                   "hydra.sweeper.sampler.n_startup_trials=2", *SMOKE, "data=image_folder", f"data.root={tiny_data}",
                   f"teacher_checkpoint={teacher_ckpt}", "max_steps=2", "sample_every=0",
                   *train_eval_args(featnet, tiny_data, tmp_path / "fid_stats", every=2, num=20),
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alembic" not in proc.stdout + proc.stderr  # no set-up chatter of optuna's storage before the search
    best = [min(eval_curve(sweep / str(i)).values()) for i in (0, 1)]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(min(best))
    assert set(result["best_params"]) == {"generator_lr", "guidance_lr", "dfake_gen_update_ratio"}


def test_missing_inception_weights_stop_a_distill_run_at_once(teacher_ckpt, tiny_data, tmp_path):
    proc = run_cli("train.py", *SMOKE, "stage=distill", "data=image_folder", f"data.root={tiny_data}",
                   f"teacher_checkpoint={teacher_ckpt}", "eval_every=2",
                   f"eval.feature_network.inception_weights={tmp_path / 'inception-2015-12-05.pt'}",
                   f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert proc.returncode == EVALUATION_ERROR, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # stopped before training started
    assert "eval_every=2" in proc.stderr and "inception-2015-12-05.pt" in proc.stderr and "eval_every=0" in proc.stderr
    assert not (tmp_path / "out" / "dmd2_final.pt").exists()


@pytest.mark.parametrize("overrides,message", [
    (["eval_every=-1"], "'eval_every'"),
    (["eval_every=10", "eval.num_samples=1"], "'eval.num_samples'"),
    (["eval_every=10", "eval.feature_network.name=torchscript"], "'eval.feature_network.path'"),
    (["eval_every=10", "eval.reference.name=folder"], "'eval.reference.folder'"),
    (["eval_every=10", "eval.sampler_steps=0"], "'eval.sampler_steps'"),
    (["optimized_metric=loss"], "'optimized_metric'"),
    (["stage=distill", "teacher_checkpoint=x.pt", "dropout=1.5"], "'dropout'"),
])
def test_bad_evaluation_settings_name_the_key(overrides, message, tiny_data):
    cfg = compose_cfg([*SMOKE, "data=image_folder", f"data.root={tiny_data}", *overrides])
    with pytest.raises((ConfigError, FileError), match=message):  # a path key without its file: FileError
        validate(cfg)


@needs_sweeper
def test_hparams_search_configs_compose_with_a_search_space():
    for name, stage in (("distill_optuna", "distill"), ("teacher_optuna", "teacher")):
        cfg = compose_cfg([f"hparams_search={name}"], return_hydra_config=True)
        assert cfg.stage == stage and cfg.optimized_metric is None
        assert cfg.hydra.sweeper.direction == "minimize" and len(cfg.hydra.sweeper.params) >= 3
