"""multirun_examples/convergence_curves.sh takes hours, so a mistyped row would show only at its turn: every
train.py command it would run is composed and validated here, with python stood in for."""
from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from conftest import ROOT, compose_cfg
from dmd2.config.validate import validate

SCRIPT = ROOT / "multirun_examples" / "convergence_curves.sh"

SHIM = """#!/usr/bin/env bash
# records each command; a teacher run leaves the checkpoint the script tests for
printf '%q ' "$@" >> "$CALLS"; echo >> "$CALLS"
for a in "$@"; do case "$a" in output_dir=*) mkdir -p "${a#output_dir=}"; touch "${a#output_dir=}/teacher_final.pt" ;; esac; done
"""


def single_run(argv: list[str]) -> list[str]:
    """A multirun's overrides as one of its runs: the first value of each swept list, no hydra.* keys."""
    out = []
    for a in argv:
        if a == "-m" or a.startswith("hydra."):
            continue
        key, _, value = a.partition("=")
        out.append(f"{key}={value.split(',')[0]}" if key == "seed" else a)
    return out


@pytest.fixture(scope="module")
def calls(tmp_path_factory) -> list[list[str]]:
    tmp = tmp_path_factory.mktemp("curves")
    (tmp / "bin").mkdir()
    shim = tmp / "bin" / "python"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp / 'bin'}:{os.environ['PATH']}", "CALLS": str(tmp / "calls"),
           "OUT": str(tmp / "out"), "SEEDS": "0,1,2"}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in (tmp / "calls").read_text().splitlines()]


def test_every_row_composes_and_validates(calls):
    trains = [c[1:] for c in calls if c[0] == "train.py"]
    distills = [c for c in trains if c[0] == "-m"]
    assert len(trains) - len(distills) == 3 and len(distills) == 16     # 3 teachers, a multirun per row
    for argv in trains:
        cfg = compose_cfg(single_run(argv))
        validate(cfg)
    # each row its own sweep folder, over the three seeds
    sweeps = [a for c in distills for a in c if a.startswith("hydra.sweep.dir=")]
    assert len(set(sweeps)) == len(distills) and all("seed=0,1,2" in c for c in distills)
    assert calls[-1][:2] == ["-m", "dmd2.compare"] and calls[-1][2].endswith("/out")


def test_a_mistyped_row_would_be_caught():
    """The control: what the test above does to each row refuses a misspelt key and a value out of range."""
    with pytest.raises(Exception, match="generator_lrr"):
        compose_cfg(single_run(["-m", "experiment=mixture_dmd2", "seed=0,1,2", "generator_lrr=5e-4"]))
    with pytest.raises(Exception, match="dfake_gen_update_ratio"):
        validate(compose_cfg(single_run(["-m", "experiment=mixture_dmd2", "teacher_checkpoint=t.pt",
                                               "dfake_gen_update_ratio=0"])))


def test_the_harder_mixture_row_distils_its_own_teacher(calls):
    row = next(c for c in calls if any(a.endswith("/preset_m10") for a in c))
    assert "data.num_classes=10" in row and "data.resolution=16" in row
    assert any(a.startswith("teacher_checkpoint=") and a.endswith("teacher_m10/teacher_final.pt") for a in row)
    cfg = compose_cfg(single_run(row[2:]))
    assert cfg.data.num_classes == 10 and cfg.data.resolution == 16 and cfg.max_steps == 3000
    assert cfg.lr_decay == "cosine"
    # its constant-rate row: the same teacher and data, only the decay off
    const = next(c for c in calls if any(a.endswith("/ema_const_m10") for a in c))
    ccfg = compose_cfg(single_run(const[2:]))
    assert ccfg.lr_decay == "none" and ccfg.teacher_checkpoint == cfg.teacher_checkpoint
    assert (ccfg.data.num_classes, ccfg.data.resolution, ccfg.generator_ema_decay) == (10, 16, cfg.generator_ema_decay)
    # its longer row: the same teacher, data and decay, only the budget raised (the cosine spans the 10k)
    long = next(c for c in calls if any(a.endswith("/preset_10k_m10") for a in c))
    lcfg = compose_cfg(single_run(long[2:]))
    assert lcfg.max_steps == 10000 and lcfg.lr_decay == "cosine" and lcfg.data.num_classes == 10
    assert lcfg.teacher_checkpoint == cfg.teacher_checkpoint
