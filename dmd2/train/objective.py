"""The objective of a sweep: which metric ranks runs, checked against what a run with this config logs before the
run starts. The train/ names come from the stages and the loop that log them (dmd2/train/teacher.py, distill.py,
loop.py), the eval/ names from the naming rules of dmd2/config/names.py the evaluator logs by."""
from __future__ import annotations

from omegaconf import DictConfig

from dmd2.config.errors import ConfigError
from dmd2.config.names import BEST_STEP, MIXTURE_KEY, metric_key, mixture_key
from dmd2.method.mixture import SCORES
from dmd2.train.distill import DistillStage
from dmd2.train.loop import LOOP_KEYS
from dmd2.train.teacher import TeacherStage


def optimizing_sweep() -> bool:
    """Whether this job belongs to a sweep that minimises what train.py returns (a sweeper other than Hydra's
    basic one, e.g. hparams_search=... with Optuna); False outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except Exception:
        return False
    return choices.get("hparams_search") not in (None, "null") or choices.get("hydra/sweeper") not in (None, "basic")


def eval_metric_keys(cfg: DictConfig) -> list[str]:
    """The final eval/ metrics a training run with this config produces (TrainingEvaluator.results); none when
    eval_every = 0."""
    if cfg.eval_every == 0:
        return []
    if cfg.data.name == "gaussian_mixture":
        return [MIXTURE_KEY, f"{MIXTURE_KEY}_best", BEST_STEP] + [mixture_key(s) for s in SCORES if s != "fd"]
    fn = cfg.eval.feature_network
    key = metric_key(fn.name, fn.resize, fn.path)
    return [key, f"{key}_best", f"{key}_std", BEST_STEP]


def train_metric_keys(stage: str, gan_classifier: bool = False, r1: bool = False) -> list[str]:
    """The train/ scalars a run of ``stage`` logs, as the stage and the loop that emit them declare them: what
    optimized_metric may name besides the eval/ metrics."""
    own = TeacherStage.metric_keys() if stage == "teacher" else DistillStage.metric_keys(gan_classifier, r1)
    return sorted(LOOP_KEYS + tuple(own))


def check_objective(cfg: DictConfig, sweeping: bool) -> None:
    """No silent objective: a sweep (``sweeping``) or a named ``optimized_metric`` must rank runs by a metric the
    run produces. The default objective is the best evaluation metric, so it needs eval_every > 0; a loss is
    an objective only when named (optimized_metric=train/...)."""
    metric = cfg.optimized_metric
    produced = eval_metric_keys(cfg)
    if metric is None:
        if sweeping and not produced:
            raise ConfigError(
                "config keys 'eval_every' = 0 and 'optimized_metric' = null in a sweep (hparams_search / "
                "hydra/sweeper): the sweep would rank trials by nothing it measures. Turn the evaluation on "
                "(eval_every=N, e.g. eval_every=2000; it minimises the best eval/fid or eval/fd_*), or name "
                "the objective yourself, e.g. optimized_metric=train/loss (a loss does not rank sample quality)")
        return
    if metric.startswith("train/"):
        gan = bool(cfg.get("gan_classifier"))
        logged = train_metric_keys(cfg.stage, gan, gan and cfg.get("gan_features") == "teacher" and cfg.r1_weight > 0)
        if metric not in logged:
            raise ConfigError(f"config key 'optimized_metric' = {metric!r}: a stage={cfg.stage} run with these "
                              f"settings never logs it; it logs {logged}")
    if metric.startswith("eval/") and metric not in produced:
        if not produced:
            raise ConfigError(f"config key 'optimized_metric' = {metric!r}, but 'eval_every' = 0: the run logs no "
                              f"eval/ metric; set eval_every=N")
        raise ConfigError(f"config key 'optimized_metric' = {metric!r}: the run does not produce it; with these "
                          f"eval.feature_network settings it produces {produced}")
