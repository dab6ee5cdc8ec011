"""Training entry point: one Hydra app that dispatches on ``stage`` to a stage runner.

    python train.py stage=teacher data_dir=./data output_dir=./checkpoints/teacher lr=1e-4
    python train.py stage=distill teacher_checkpoint=./checkpoints/teacher/teacher_final.pt
    torchrun --nproc_per_node 4 train.py stage=teacher ...     # DistributedDataParallel, one process per GPU
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

import dmd2.config.settings  # noqa: F401  (registers the config schemas that conf/ builds on)
from dmd2.config.cli import quiet_hydra_on_other_ranks, run_script
from dmd2.config.errors import ConfigError
from dmd2.config.validate import validate
from dmd2.runtime.devices import check_device

# Only torch-free modules are imported above: --help and tab completion compose the config without torch. The
# stage runners (torch, data, networks) are imported when a run starts (runner_for).


def runner_for(stage: str) -> Callable[[DictConfig], dict[str, Any]]:
    if stage == "teacher":
        from dmd2.train.teacher import run
    else:
        from dmd2.train.distill import run
    return run


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate the composed config (fast, before any data or model), then run its stage."""
    validate(cfg)
    check_device(cfg)
    from dmd2.train.objective import check_objective, optimizing_sweep  # torch: after the config's checks

    check_objective(cfg, optimizing_sweep())
    return runner_for(cfg.stage)(cfg)


def objective(result: dict[str, Any], optimized_metric: str | None) -> float | None:
    """The value a sweeper minimises: ``optimized_metric`` of the run's final metrics, or by default the best
    eval/fid (eval/fd_*) when the run evaluated (eval_every > 0); None when the run has no objective (no
    evaluation and none named: a sweep is refused at start then, see dmd2.train.objective.check_objective)."""
    key = optimized_metric or result["objective_key"]
    if key is None:
        return None
    if key not in result["metrics"]:
        raise ConfigError(f"config key 'optimized_metric' = {key!r}: the run has no such final metric; it has "
                          f"{sorted(result['metrics'])}")
    return float(result["metrics"][key])


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the run's objective for sweepers (Optuna): see ``objective`` and the ``optimized_metric`` key."""
    return objective(train(cfg), cfg.optimized_metric)


if __name__ == "__main__":
    sys.argv = quiet_hydra_on_other_ranks(sys.argv)
    sys.exit(run_script(main))
