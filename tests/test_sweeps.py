"""Hydra multirun sweeps: one folder and one W&B run per job, one W&B group per sweep, failures reported."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dmd2.config.names import higher_is_better, run_name
from dmd2.config.validate import check_settings
from dmd2.train.objective import eval_metric_keys
from tests.conftest import ROOT, compose_cfg, run_cli, wandb_records


@pytest.mark.slow
def test_two_job_sweep_writes_two_runs_in_one_wandb_group(tiny_data, tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-26" / "12-00-00-000001"
    proc = run_cli("train.py", "-m", "debug=smoke", "logger=wandb", "data=image_folder", f"data.root={tiny_data}",
                   "max_steps=1", "sample_every=0", "lr=1e-4,2e-4", f"hydra.sweep.dir={sweep}",
                   env={"WANDB_MODE": "offline"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [wandb_run(sweep / str(i)) for i in (0, 1)]
    assert all((sweep / str(i) / "teacher_final.pt").is_file() for i in (0, 1))
    for run, lr in zip(runs, ("0.0001", "0.0002")):
        # named after the swept key only (no data path), grouped by the sweep, every override in the config
        assert run.display_name == f"lr={lr}"
        assert run.run_group == "2026-11-26_12-00-00-000001"
        overrides = json.loads(next(item.value_json for item in run.config.update if item.key == "overrides"))
        assert f"data.root={tiny_data}" in overrides and f"lr={lr}" in overrides
    assert runs[0].run_id != runs[1].run_id
    # the sweep ends with the compare table of its runs, one row per learning rate
    assert f"[compare] the sweep's 2 runs (python -m dmd2.compare {sweep}" in proc.stdout
    assert "| lr | n | steps | wall s |" in proc.stdout and "| 0.0002 | 1 | 1 |" in proc.stdout


def wandb_run(folder: Path):
    """The W&B run record (name, group, config) of the offline run in ``folder``."""
    return next(r.run for r in wandb_records(folder) if r.WhichOneof("record_type") == "run")


@pytest.mark.parametrize("overrides, swept, stage, name", [
    (["stage=distill", "generator_lr=1e-05", "teacher_checkpoint=runs/teacher/teacher_final.pt", "data=image_folder",
      "data.root=/data/cifar10-jpeg/train", "seed=1"], ["generator_lr", "seed"], None, "generator_lr=1e-05,seed=1"),
    (["hparams_search=distill_optuna", "guidance_lr=3.16227766e-05", "generator_lr=2e-06", "max_steps=10"],
     ["generator_lr", "guidance_lr"], None, "guidance_lr=3.16e-05,generator_lr=2e-06"),
    (["stage=distill", "experiment=dmd2_cifar10", "teacher_checkpoint=checkpoints/edm_cond_vp.pt",
      "output_dir=runs/x", "logger.mode=online", "max_steps=2000"], None, None,
     "distill,dmd2_cifar10,teacher_checkpoint=edm_cond_vp,max_steps=2000"),
    (["a=1", "b=2", "c=3", "d=4", "e=5", "f=6", "g=7"], None, "teacher", "teacher,a=1,b=2,c=3,d=4,e=5,+2 more"),
    (["output_dir=x"], None, None, None),
])
def test_run_names_are_short(overrides, swept, stage, name):
    assert run_name(overrides, swept, stage) == name


def test_a_failing_job_is_reported_and_the_others_complete(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "-m", "debug=smoke", "logger=none", "data=image_folder", f"data.root={tiny_data}",
                   "max_steps=1", "sample_every=0", "lr=-1,1e-4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0  # the sweep as a whole reports failure ...
    assert "lr=-1" in proc.stderr and "config key 'lr' = -1" in proc.stderr  # ... which job and why
    assert (sweep / "1" / "teacher_final.pt").is_file()  # ... and the other job still ran
    assert not (sweep / "0" / "teacher_final.pt").exists()


def sweep_values(spec: dict) -> list:
    """The values a W&B sweep parameter can take that a test can try: the fixed value, every listed value, or
    both ends of a range."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"]]


def test_wandb_sweep_drives_train_py_with_valid_keys_and_a_logged_metric():
    sweep = yaml.safe_load((ROOT / "multirun_examples" / "wandb_sweep.yaml").read_text())
    assert sweep["program"] == "train.py" and (ROOT / sweep["program"]).is_file()
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]  # key=value args
    assert sweep["early_terminate"]["type"] == "hyperband"
    params = sweep["parameters"]
    for i in range(max(len(sweep_values(spec)) for spec in params.values())):
        # the arguments the agent passes (W&B writes key=value): every key composes and passes its checks
        overrides = [f"{key}={values[min(i, len(values) - 1)]}" for key, values in
                     ((k, sweep_values(spec)) for k, spec in params.items()) if not key.startswith("hydra.")]
        cfg = compose_cfg(overrides)
        check_settings(cfg)
        assert sweep["metric"]["name"] in eval_metric_keys(cfg)  # the metric it optimises is one the run logs
    assert sweep["metric"]["goal"] == ("maximize" if higher_is_better(sweep["metric"]["name"]) else "minimize")
    script = (ROOT / "multirun_examples" / "wandb_sweep.sh").read_text()
    assert "wandb_sweep.yaml" in script and "wandb agent" in script
