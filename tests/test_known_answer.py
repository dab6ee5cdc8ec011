"""Convergence of the whole training loop on data=gaussian_mixture, scored against the exact distribution.

The runs are the known-answer presets (experiment=mixture_teacher, experiment=mixture_dmd2: 2 classes x 3 modes,
8 px, a 75k-parameter network, README "Known-answer runs"). A teacher is trained once; each distillation variant
(one step, GAN head, two steps) uses the mixture's exact denoiser as its teacher (zero teacher error) and must
land on the modes. Every check has a negative control that it must reject, proving the check can fail: a
teacher trained at the wrong noise levels, each generator before any update (step 0: the teacher's one-step
output, the blur between modes), and a generator trained with the DM gradient's sign flipped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import dmd2.losses
from tests.conftest import compose_cfg

pytestmark = pytest.mark.slow

TEACHER = ["experiment=mixture_teacher", "logger=none"]
DISTILL = ["experiment=mixture_dmd2", "logger=none", "exact_teacher=true"]
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


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    out = tmp_path_factory.mktemp("mixture_teacher")
    _, last = run(TEACHER, out)
    return out / "teacher_final.pt", last


def test_teacher_lands_on_every_mode(teacher):
    assert teacher_faults(teacher[1]) == []


def test_teacher_check_rejects_a_teacher_trained_at_the_wrong_noise(tmp_path):
    """Negative control: ln(sigma) ~ N(3, 0.1^2) (sigma near 20) never teaches the low noise levels."""
    _, last = run([*TEACHER, "p_mean=3.0", "p_std=0.1"], tmp_path)
    assert teacher_faults(last) != []


def student_faults(metrics: dict[str, float], start: dict[str, float]) -> list[str]:
    """A student must be on the modes, and its FD at most a quarter of the teacher's one-step output's (step 0)."""
    return faults(metrics, fd_limit=0.25 * start["eval/mixture_fd"], near=0.5, coverage=2 / 3)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_student_lands_on_the_modes(teacher, variant, tmp_path):
    start, last = run([*DISTILL, f"teacher_checkpoint={teacher[0]}", *VARIANTS[variant]], tmp_path)
    assert student_faults(last, start) == []
    # negative control: the same check on the generator before any update (the blur between modes)
    assert student_faults(start, start) != []


def test_student_check_rejects_a_flipped_dm_gradient(teacher, tmp_path, monkeypatch):
    """Negative control: the generator climbs the KL instead of descending it."""
    right = dmd2.losses.dm_gradient
    monkeypatch.setattr(dmd2.losses, "dm_gradient", lambda x, real, fake: -right(x, real, fake))
    start, last = run([*DISTILL, f"teacher_checkpoint={teacher[0]}"], tmp_path)
    assert student_faults(last, start) != []
