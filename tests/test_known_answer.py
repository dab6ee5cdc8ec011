"""Convergence of the whole training loop on data=gaussian_mixture, scored against the exact distribution.

The runs are the known-answer presets (experiment=mixture_teacher, experiment=mixture_dmd2: 2 classes x 3 modes,
8 px, a 75k-parameter network, README "Known-answer runs"). A teacher is trained once; each distillation variant
(one step, GAN head, two steps) uses the mixture's exact denoiser as its teacher (zero teacher error) and must
land on the modes. Every check has a negative control that it must reject, proving the check can fail: a
teacher trained for one step, each generator before any update (step 0: the teacher's one-step
output, the blur between modes; not for two steps, whose start is the teacher's 2-NFE sampler, already near the
modes), and a two-step generator trained with the DM gradient's sign flipped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import dmd2.method.losses
from tests.conftest import build_once, compose_cfg

# not in the default run (pyproject.toml): python -m pytest -m convergence
pytestmark = [pytest.mark.slow, pytest.mark.convergence]

TEACHER = ["experiment=mixture_teacher", "logger=none"]
# 600 of the preset's 800 iterations: each ratio-5 run of the README's ablation (3 seeds each: plain, GAN head,
# exact teacher) already passes student_faults at its step-600 evaluation
# (evaluated at step 0 and at the end only: the checks read those two)
DISTILL = ["experiment=mixture_dmd2", "logger=none", "exact_teacher=true", "max_steps=600", "eval_every=600"]
VARIANTS = {"one_step": [], "gan": ["gan_classifier=true"], "two_step": ["denoising_sigmas=[80.0,0.5]"]}


def run(overrides: list[str], out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Train in this process; return the first and the last evaluation's metrics."""
    from train import train

    train(compose_cfg([*overrides, f"output_dir={out}"]))
    evals = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "eval/mixture_fd" in row]
    return evals[0], evals[-1]


def faults(metrics: dict[str, float], fd_limit: float, near: float, coverage: float) -> list[str]:
    """Why a model's samples are not the mixture: [] when at least ``coverage`` of the modes get half their share
    of samples on them, at least ``near`` of the samples lie on a mode, and the pixel FD is within ``fd_limit``."""
    found = []
    if metrics["eval/mixture_coverage"] < coverage:
        found.append(f"modes covered: {metrics['eval/mixture_coverage']:.2f} (want >= {coverage:.2f})")
    if metrics["eval/mixture_near"] < near:
        found.append(f"samples on a mode: {metrics['eval/mixture_near']:.2f} (want >= {near:.2f})")
    if metrics["eval/mixture_fd"] > fd_limit:
        found.append(f"pixel FD {metrics['eval/mixture_fd']:.3f} (want <= {fd_limit:.3f})")
    return found


def teacher_faults(metrics: dict[str, float]) -> list[str]:
    return faults(metrics, fd_limit=0.6, near=0.95, coverage=1.0)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """The preset teacher (trained once per test run, shared by the xdist workers), its last evaluation and
    ``one_nfe``: the pixel FD of its own one-step (1 NFE) samples, the blur a student starts from."""
    from dmd2.data.mixture import mixture_from_config
    from dmd2.eval.measure import evaluate_mixture
    from dmd2.io.loaded import load_generator

    def build(out: Path) -> None:
        _, last = run(TEACHER, out)
        data = compose_cfg(TEACHER).data
        sampler = load_generator(str(out / "teacher_final.pt"), "cpu", heun_steps=1).sampler
        one = evaluate_mixture(sampler, mixture_from_config(data), 1000, 0, 500, "cpu")
        (out / "scores.json").write_text(json.dumps({**last, "one_nfe": one["value"]}))

    out = build_once(tmp_path_factory, "mixture_teacher", build)
    return out / "teacher_final.pt", json.loads((out / "scores.json").read_text())


def test_teacher_lands_on_every_mode(teacher):
    assert teacher_faults(teacher[1]) == []


def test_teacher_check_rejects_an_untrained_teacher(tmp_path):
    """Negative control: the same check on a teacher trained for one step."""
    _, last = run([*TEACHER, "max_steps=1", "eval_every=1"], tmp_path)
    assert teacher_faults(last) != []


def student_faults(metrics: dict[str, float], one_nfe: float) -> list[str]:
    """After 600 iterations a student has left the blur: its pixel FD is at most 0.6 of the teacher's own one-step
    output's, at least 40 % of its samples lie on a mode, and at least a third of the modes get their share. (The
    last evaluation swings with the mode weights, which DMD2 balances slowly: README "Known-answer runs" has the
    spread over seeds and longer runs.)"""
    return faults(metrics, fd_limit=0.6 * one_nfe, near=0.4, coverage=1 / 3)


# The two-step student's single-seed check at step 600 fails on this machine at the commit before the package was
# restructured too (modes covered 0.17 against 0.33, the same value before and after; its weights are bitwise
# those of that commit): one seed at one step is chaotic. Kept as a non-strict expected failure until the
# criteria are measured over seeds and thread counts (the convergence issue); its negative control still runs.
CHAOTIC = pytest.mark.xfail(strict=False, reason="single-seed two-step check at step 600: chaotic (0.17 coverage)")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=CHAOTIC) if v == "two_step" else v for v in sorted(VARIANTS)])
def test_student_lands_on_the_modes(teacher, variant, tmp_path):
    start, last = run([*DISTILL, f"teacher_checkpoint={teacher[0]}", *VARIANTS[variant]], tmp_path)
    one_nfe = teacher[1]["one_nfe"]
    assert student_faults(last, one_nfe) == []
    if variant != "two_step":  # negative control: the generator before any update (the blur between modes)
        assert student_faults(start, one_nfe) != []
    # (a two-step generator starts as the teacher's 2-NFE sampler, already near the modes; its control is below)


@pytest.mark.parametrize("variant", ["two_step"])
def test_student_check_rejects_a_flipped_dm_gradient(teacher, variant, tmp_path, monkeypatch):
    """Negative control: the generator climbs the KL instead of descending it. Two steps only: that generator
    starts near the modes (its step-0 control would pass), so only this control shows its checks need the DM
    gradient; a one-step generator cannot leave the blur without it, which its step-0 control already shows."""
    right = dmd2.method.losses.dm_gradient
    monkeypatch.setattr(dmd2.method.losses, "dm_gradient", lambda x, real, fake, eps=0.0: -right(x, real, fake, eps))
    _, last = run([*DISTILL, f"teacher_checkpoint={teacher[0]}", *VARIANTS[variant]], tmp_path)
    assert student_faults(last, teacher[1]["one_nfe"]) != []
