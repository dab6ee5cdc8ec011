"""Image quality measured inside training: FID / FD of the live networks every ``eval_every`` steps; and the
config's evaluation keys turned into a measurement, for the evaluation inside training and for evaluate.py.

It is evaluate.py's measurement (``measurement_from_config`` -> ``dmd2.eval.measure.set_up_measurement``, then
``Measurement.measure``) with the keys under ``eval.``: the same feature network, cached reference statistics,
per-sample seeded noise and round-robin classes, so the value logged at step N equals ``evaluate.py`` on the
checkpoint of step N with the same ``num_samples`` and ``seed``. Under torchrun every rank generates its slice of
the samples and rank 0 computes the distance.

Before the first step it refuses a reference whose resolution, feature network or resize differs from the run's
(the default reference, ``eval.reference.name=auto``, is the run's own training data) and a sample count below the
feature dimension (``eval.allow_few_samples``).

Logged as ``eval/fid`` (Inception) or ``eval/fd_<network>`` with its bootstrap standard deviation
(``eval/fid_std``; README "Which FID") and the sample count in the summary (``eval/num_samples``, ``eval/name``
= fid@10k) against the training step (``data=gaussian_mixture``:
its exact scores instead, ``eval/mixture_fd`` with ``eval/mixture_coverage``, ``_near`` and ``_weight_tv``), with the cost of each
evaluation (``eval/seconds``, ``eval/images_per_sec``); the W&B summary keeps the minimum.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch
from omegaconf import DictConfig
from torch import nn

from dmd2.config.errors import EvaluationError
from dmd2.config.names import BEST_STEP, mixture_key
from dmd2.config.validate import to_container
from dmd2.data.mixture import mixture_from_config
from dmd2.eval.features import FeatureNetwork, build_feature_network
from dmd2.eval.measure import (Diagnostics, Measurement, MeasureSettings, diagnostic_scalars, diagnostics_text,
                               mixture_measurement, set_up_measurement)
from dmd2.eval.references import ReferenceStats, reference_statistics
from dmd2.io.sampler import CheckpointSampler
from dmd2.runtime.distributed import Dist
from dmd2.train.logger import RunLogger

log = logging.getLogger(__name__)


@contextmanager
def untouched_rng(device: torch.device) -> Iterator[None]:
    """Run a block without changing the global random streams (CPU and ``device``): evaluating (e.g. clean-fid's
    DataLoader drawing its base seed) never changes what training draws next, so a run with evaluation trains
    exactly as one without, and resumes exactly."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode (no dropout) for the duration, then back to the mode it was in."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


# --------------------------------------------------------------------------------------------- from the config


def feature_network_from_config(fn: Mapping[str, Any], device: torch.device) -> FeatureNetwork:
    """The ``feature_network`` config node (FeatureNetwork in dmd2/config/settings.py) -> its FeatureNetwork."""
    return build_feature_network(fn["name"], device, path=fn["path"], resize=fn["resize"],
                                 inception_weights=fn["inception_weights"], allow_download=fn["allow_download"],
                                 module=fn.get("module"), classifier=fn.get("classifier"))


def reference_from_config(ref: Mapping[str, Any], net: FeatureNetwork, kid: bool = False, batch_size: int = 128,
                          num_workers: int = 0, data: Mapping[str, Any] | None = None,
                          features: bool = False) -> ReferenceStats:
    """The ``reference`` config node (Reference in dmd2/config/settings.py) -> its statistics
    (dmd2.eval.references.reference_statistics); ``data``: the training data reference.name=auto names;
    ``features``: with the reference features where they are kept (precision / recall)."""
    return reference_statistics(ref["name"], net, ref["cache_dir"], folder=ref.get("folder"), path=ref.get("path"),
                                resolution=ref.get("resolution"), data=data, kid=kid,
                                allow_download=ref["allow_download"], batch_size=batch_size, num_workers=num_workers,
                                features=features)


def diagnostics_from_config(fid: Any) -> Diagnostics:
    """The ``prdc_k`` / ``prdc_samples`` keys (FidSettings)."""
    return Diagnostics(int(fid.prdc_k), int(fid.prdc_samples))


def measurement_from_config(fid: Any, device: torch.device, dist: Dist | None, *, resolution: int | None,
                            data: Mapping[str, Any] | None, num: int | None = None, kid: bool = False,
                            num_workers: int = 0, prefix: str = "", net: FeatureNetwork | None = None,
                            guard: Callable[[], ContextManager[Any]] = nullcontext) -> Measurement:
    """The measurement a config's evaluation keys describe (evaluate.py's, or ``eval.*`` in training:
    feature_network.*, reference.*, num_samples, seed, batch_size, uncertainty_resamples, allow_few_samples),
    set up and checked by ``dmd2.eval.measure.set_up_measurement`` (every rank calls it). ``num``: instead of
    num_samples (images from files: their count); ``data``: the training data (reference.name=auto); ``net``:
    the feature network when already built; ``guard``: the context the reference statistics are computed in."""
    net = net if net is not None else feature_network_from_config(fid.feature_network, device)

    def reference() -> ReferenceStats:
        with guard():
            return reference_from_config(fid.reference, net, kid=kid, batch_size=fid.batch_size,
                                         num_workers=num_workers, data=data, features=fid.prdc_k > 0)

    settings = MeasureSettings(fid.num_samples if num is None else num, fid.seed, fid.batch_size, kid,
                               fid.uncertainty_resamples, fid.allow_few_samples,
                               diagnostics_from_config(fid))
    return set_up_measurement(net, reference, resolution, settings, dist, prefix)


# --------------------------------------------------------------------------------------------- inside training


class TrainingEvaluator:
    """Built at the start of a run (a missing feature network or reference fails before any training);
    called with a sampler of the live network at the steps ``due`` says."""

    def __init__(self, cfg: DictConfig, device: torch.device, dist: Dist, logger: RunLogger) -> None:
        self.every: int = cfg.eval_every
        self.enabled = self.every > 0
        self.best, self.best_step, self.last = math.inf, -1, math.nan
        self.last_scores: dict[str, float] = {}  # data=gaussian_mixture: the last evaluation's exact scores
        self.last_std: float | None = None  # the last value's bootstrap standard deviation (feature networks)
        self.last_diagnostics: dict[str, float] = {}  # the last evaluation's eval/precision, ... (diagnostic_scalars)
        self.last_numbers: dict[str, Any] = {}  # the last evaluation's numbers (rank 0)
        if not self.enabled:
            return
        self.num = cfg.eval.num_samples
        self.device, self.dist, self.logger = device, dist, logger
        if cfg.data.name == "gaussian_mixture":  # known-answer data: exact scores, no feature network or reference
            settings = MeasureSettings(self.num, cfg.eval.seed, cfg.eval.batch_size,
                                       diag=diagnostics_from_config(cfg.eval))
            self.measurement = mixture_measurement(mixture_from_config(cfg.data), settings, dist)
        else:
            self.measurement = self.feature_measurement(cfg)
        m = self.measurement
        self.key, self.metric, self.name = m.key, m.metric, m.name  # name: the value with its count, fid@10k
        logger.define_metric(self.key, summary="min")
        if m.mixture is not None:
            if dist.is_main:
                logger.summary({f"{self.key}_floor": m.floor["fd"]})
                log.info(f"[eval] {self.metric} of {self.num} true samples (the floor): {m.floor['fd']:.4f}"
                         f"{diagnostics_text(m.floor)}")
            return
        logger.summary({"eval/num_samples": self.num, "eval/name": self.name})
        if dist.is_main:
            log.info(f"[eval] {self.metric} of {self.num} samples ({self.name}) against {m.against}")

    def feature_measurement(self, cfg: DictConfig) -> Measurement:
        """The FID / FD measurement of ``eval.*``, refused before any step is trained when it cannot start: a
        missing feature network, too few samples, a reference of another resolution, feature network or resize.
        The reference statistics are computed without touching the random streams training draws from."""
        try:
            return measurement_from_config(cfg.eval, self.device, self.dist, resolution=cfg.data.resolution,
                                           data=to_container(cfg.data), num_workers=cfg.data.num_workers,
                                           prefix="eval.", guard=lambda: untouched_rng(self.device))
        except EvaluationError as err:
            raise EvaluationError(
                f"eval_every={self.every}: the FID / FD evaluation inside training cannot start.\n{err}\n"
                "During training these keys live under 'eval.' (e.g. eval.feature_network.allow_download=true, "
                "eval.feature_network.name=torchscript eval.feature_network.path=...); eval_every=0 trains "
                "without evaluation.") from err

    def due(self, done: int, total: int) -> bool:
        """Every ``eval_every`` steps and at the end."""
        return self.enabled and (done % self.every == 0 or done == total)

    def __call__(self, sampler: CheckpointSampler, step: int) -> float | None:
        """Measure ``sampler`` (every rank must call it), log the value at ``step``; return it (rank 0)."""
        start = time.perf_counter()
        with eval_mode(sampler.net), untouched_rng(self.device):
            numbers = self.measurement.measure(sampler, self.device, self.dist, progress=self.dist.is_main)
        if numbers is None:  # ranks > 0
            return None
        seconds = time.perf_counter() - start
        value = self.last = numbers["value"]
        self.last_scores = numbers.get("scores", {})
        if value < self.best:
            self.best, self.best_step = value, step
        extra = {mixture_key(k): v for k, v in numbers.get("scores", {}).items() if k != "fd"}
        self.last_std = numbers.get("std")
        if self.last_std is not None:
            extra[f"{self.key}_std"] = self.last_std
        self.last_diagnostics = diagnostic_scalars(numbers)
        extra.update(self.last_diagnostics)
        self.last_numbers = numbers
        self.logger.log({self.key: value, **extra, "eval/seconds": seconds, "eval/images_per_sec": self.num / seconds,
                         "eval/nfe": sampler.nfe}, step=step)
        self.logger.summary({f"{self.key}_best": self.best, BEST_STEP: self.best_step})
        scores = "".join(f", {k} {v:.3f}" for k, v in numbers.get("scores", {}).items() if k != "fd")
        scores += diagnostics_text(numbers)
        noise = f" ± {self.last_std:.4f}" if self.last_std is not None else ""
        log.info(f"[eval] step {step}: {self.metric} = {value:.4f}{noise}{scores} ({self.name}: {self.num} samples, "
                 f"{sampler.nfe} NFE, {seconds:.1f} s, {self.num / seconds:.1f} images/s; best {self.best:.4f} at "
                 f"step {self.best_step})")
        return value

    def results(self) -> dict[str, Any]:
        """Final metrics for the sweeper: the last and best values (empty when evaluation is off)."""
        if not self.enabled or self.best_step < 0:
            return {}
        extra = {mixture_key(k): v for k, v in self.last_scores.items() if k != "fd"}
        if self.last_std is not None:
            extra[f"{self.key}_std"] = self.last_std
        extra.update(self.last_diagnostics)
        return {self.key: self.last, f"{self.key}_best": self.best, BEST_STEP: self.best_step, **extra}

    def state_dict(self) -> dict[str, Any]:
        """Stored in checkpoints, so a resumed run keeps its best value."""
        return {"best": self.best, "best_step": self.best_step, "last": self.last}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.best, self.best_step, self.last = state["best"], state["best_step"], state["last"]
