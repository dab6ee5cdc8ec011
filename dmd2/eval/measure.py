"""One measurement: set up once (a feature network, reference statistics, every check), then measure samplers or
image sets with it. evaluate.py and the evaluation inside training (dmd2.train.evaluator) both go through
``set_up_measurement`` (or ``mixture_measurement``) and ``Measurement.measure``.

Protocol: ``num`` samples from a sampler (dmd2.io.sampler: per-sample seeded noise, round-robin classes), uint8
images in [0, 255], featurized batch by batch (dmd2.eval.features), so only the features [N, D] are ever held. The
distance is the Frechet distance between the Gaussians (mean, covariance) of the two feature sets, in the project's
eigenvalue form (dmd2.method.frechet; equal to clean-fid's to rounding).

Every comparison is checked before any image is generated or read (``check_measurement``): a reference that
differs from what is measured in resolution, network or resize is refused, as is a sample count at or below the
feature dimension (a singular covariance) unless allowed. Each value comes with its sampling noise: the standard
deviation over bootstrap resamples of the generated samples' features (dmd2.eval.statistics.bootstrap_std).

A model of ``data=gaussian_mixture`` is scored exactly instead (dmd2.method.mixture.mixture_scores), with no
feature network.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from dmd2.config.errors import EvaluationError
from dmd2.config.names import MIXTURE_KEY, MIXTURE_METRIC, count_label  # noqa: F401 (count_label: also from here)
from dmd2.eval.features import FeatureNetwork, batch_features, classify, feature_dim, image_features
from dmd2.eval.prdc import class_statistics, prdc, subsample
from dmd2.runtime.progress import Progress
from dmd2.eval.references import ReferenceStats
from dmd2.eval.statistics import bootstrap_std, feature_statistics, frechet_distance, kernel_inception_distance
from dmd2.io.sampler import CheckpointSampler, generate_uint8, round_robin_labels
from dmd2.method.mixture import (GaussianMixture, mean_span_features, mixture_classes, mixture_scores,
                                 reference_scores, true_samples)
from dmd2.runtime.distributed import Dist, barrier, batch_shard, gather_to_main

log = logging.getLogger(__name__)


def metric_name(wandb_key: str, num: int) -> str:
    """The name of a value with its sample count: ('eval/fid', 10000) -> 'fid@10k'."""
    return f"{wandb_key.split('/', 1)[-1]}@{count_label(num)}"


# --------------------------------------------------------------------------------------------- checks


def check_reference(ref: ReferenceStats, net: FeatureNetwork, resolution: int, prefix: str = "") -> None:
    """Refuse reference statistics that do not fit what is measured: images of ``resolution`` x ``resolution``
    featurized by ``net``. Names both sides of every mismatch (resolution, feature network, resize)."""
    if ref.image_size is None:
        raise EvaluationError(
            f"reference statistics {ref.path}: the resolution of their images is unknown (a statistics file "
            f"without metadata and without NxN in its name). If they were made from {resolution}x{resolution} "
            f"images, say so: {prefix}reference.resolution={resolution}")
    problems = []
    if ref.image_size != resolution:
        problems.append(f"resolution: the images measured are {resolution}x{resolution}, the reference images "
                        f"({ref.dataset or ref.description}) {ref.image_size}x{ref.image_size}")
    if ref.network is not None and ref.network != net.identity:
        problems.append(f"feature network: this evaluation uses {net.identity} ({net.source}), the reference "
                        f"statistics were made with {ref.network}")
    if ref.resize is not None and ref.resize != net.resize:
        problems.append(f"resize: this evaluation uses {prefix}feature_network.resize={net.resize}, the reference "
                        f"statistics were made with resize {ref.resize}")
    if problems:
        raise EvaluationError(
            f"the reference statistics {ref.path} do not fit what is measured, so the distance would be "
            f"meaningless:\n  - " + "\n  - ".join(problems) + "\n"
            f"Measure against a reference made from {resolution}x{resolution} images with this feature network: "
            f"{prefix}reference.name=auto (the training data), {prefix}reference.name=folder "
            f"{prefix}reference.folder=<images>, or {prefix}reference.name=npz {prefix}reference.path=<file>.")


def check_sample_count(num: int, dim: int, allow: bool, prefix: str = "") -> None:
    """FID / FD needs the covariance of the samples' features [num, dim] to be of full rank: num > dim."""
    if num <= dim and not allow:
        raise EvaluationError(
            f"config key '{prefix}num_samples' = {num}: fewer samples than the feature dimension ({dim}) leave "
            f"their covariance singular, so the FID / FD is not a meaningful number. Use {prefix}num_samples >= "
            f"{dim + 1} (published FIDs: 50000), or set {prefix}allow_few_samples=true to compute it anyway.")


def check_measurement(net: FeatureNetwork, ref: ReferenceStats | None, resolution: int, num: int,
                      allow_few_samples: bool = False, prefix: str = "") -> int:
    """Every check before images are generated or read: the reference fits (``check_reference``), the feature
    network runs on images of ``resolution`` and matches the reference's dimension, and ``num`` samples are
    enough (``check_sample_count``). Returns the feature dimension D."""
    if ref is not None:
        check_reference(ref, net, resolution, prefix)
    dim = feature_dim(net, net.input_size or resolution)
    if ref is not None and dim != ref.mu.shape[0]:
        raise EvaluationError(f"the feature network gives {dim}-d features, the reference statistics {ref.path} "
                              f"are {ref.mu.shape[0]}-d")
    check_sample_count(num, dim, allow_few_samples, prefix)
    return dim


# --------------------------------------------------------------------------------------------- the numbers


@dataclass(frozen=True)
class Diagnostics:
    """What an evaluation computes from its features besides the distance: precision / recall / density /
    coverage with ``prdc_k`` nearest neighbours (0 = off; needs the reference's features, and more than
    ``prdc_k`` samples on each side) on at most ``prdc_samples`` samples of each side."""

    prdc_k: int = 0
    prdc_samples: int = 10000


def feature_diagnostics(feats: np.ndarray, ref_feats: np.ndarray | None, predicted: tuple[np.ndarray, int] | None,
                        labels: np.ndarray | None, diag: Diagnostics, seed: int = 0,
                        device: torch.device | str = "cpu") -> dict[str, Any]:
    """``prdc`` (dmd2.eval.prdc: features [N,D] against the reference's [M,D], each subsampled to
    ``diag.prdc_samples`` from ``seed``) and ``classes`` (``class_statistics`` of ``predicted`` = (the predicted
    classes [N], the number of classes C) against the generated-for ``labels`` [N], assumed to be the
    classifier's class ids); None where not computed."""
    scores = None
    k = diag.prdc_k
    if k > 0 and ref_feats is not None and min(len(ref_feats), len(feats)) > k:
        scores = prdc(subsample(ref_feats, diag.prdc_samples, seed), subsample(feats, diag.prdc_samples, seed + 1),
                      k, device)
    classes = class_statistics(predicted[0], labels, predicted[1]) if predicted is not None else None
    return dict(prdc=scores, prdc_k=k if scores is not None else None, classes=classes)


def diagnostic_scalars(numbers: dict[str, Any]) -> dict[str, float]:
    """The logged scalars of an evaluation's diagnostics: eval/precision, eval/recall, eval/density, eval/coverage
    (when computed) and eval/class_entropy, eval/label_agreement (with a classifier)."""
    out = {f"eval/{k}": float(v) for k, v in (numbers.get("prdc") or {}).items()}
    classes = numbers.get("classes") or {}
    for key in ("class_entropy", "label_agreement"):
        if key in classes:
            out[f"eval/{key}"] = float(classes[key])
    return out


def diagnostics_text(numbers: dict[str, Any]) -> str:
    """', precision 0.712, recall 0.655, ...' for the log ('' when nothing was computed)."""
    return "".join(f", {k.split('/', 1)[1]} {v:.3f}" for k, v in diagnostic_scalars(numbers).items())


def score_features(feats: np.ndarray, ref: ReferenceStats, kid: bool = False, seed: int = 0,
                   resamples: int = 0, labels: np.ndarray | None = None, diag: Diagnostics = Diagnostics(),
                   predicted: tuple[np.ndarray, int] | None = None, device: torch.device | str = "cpu"
                   ) -> dict[str, Any]:
    """FD of features [N,D] to ``ref``, KID when asked (and ``ref`` holds features [M,D]), each with
    its bootstrap standard deviation (``bootstrap_std``, stratified by ``labels`` [N] when known), and the
    ``feature_diagnostics`` (precision / recall / density / coverage, a classifier's ``predicted`` classes [N]):
    the numbers every evaluation reports, whatever the images came from (a checkpoint, a folder, an .npz)."""
    value = frechet_distance(*feature_statistics(feats), ref.mu, ref.sigma)
    kid_value = kernel_inception_distance(feats, ref.feats, seed) if kid and ref.feats is not None else None
    std, kid_std = bootstrap_std(feats, ref.mu, ref.sigma, resamples, seed,
                                 ref.feats if kid_value is not None else None, labels)
    return dict(value=value, std=std, kid=kid_value, kid_std=kid_std, num_samples=int(len(feats)),
                **feature_diagnostics(feats, ref.feats, predicted, labels, diag, seed, device))


def sampler_features(sampler: CheckpointSampler, net: FeatureNetwork, num: int, seed: int, batch_size: int,
                     device: torch.device | str, dim: int, progress: bool = True, start: int = 0
                     ) -> tuple[np.ndarray, float]:
    """Features [num, dim] of samples start..start+num-1 of ``sampler`` (dmd2.io.sampler.generate_uint8: seeded
    noise, round-robin classes), generated and featurized batch by batch; also the seconds spent generating."""
    feats = np.empty((num, dim), dtype=np.float32)
    batches = generate_uint8(sampler, num, seed, batch_size, device, start)
    done, gen_seconds = 0, 0.0
    with Progress(num, "[evaluate] sampling and features:", "images", enabled=progress) as shown:
        while True:
            start = time.perf_counter()
            try:
                images, _ = next(batches)  # uint8 [B,3,R,R] on the CPU (the copy waits for the device)
            except StopIteration:
                break
            gen_seconds += time.perf_counter() - start
            feats[done: done + len(images)] = batch_features(images, net)
            done += len(images)
            shown.update(len(images))
    return feats, gen_seconds


def evaluate_sampler(sampler: CheckpointSampler, net: FeatureNetwork, ref: ReferenceStats | None, num: int,
                     seed: int, batch_size: int, device: torch.device | str, kid: bool = False,
                     dist: Dist | None = None, progress: bool = True, resamples: int = 0,
                     allow_few_samples: bool = False, diag: Diagnostics = Diagnostics()) -> dict[str, Any] | None:
    """FID / FD (and KID) of samples 0..num-1 of ``sampler`` against ``ref``, each with its bootstrap standard
    deviation over ``resamples`` resamples (``score_features``); the numbers of one result row.

    Refuses (``check_measurement``) before generating anything when the reference does not fit or ``num`` is
    too small. Under torchrun (``dist`` with several processes) every rank must call it: rank r generates and
    featurizes its contiguous run of whole batches (``dmd2.runtime.distributed.batch_shard``: each batch is the one a
    single process would run), rank 0 gathers the features in order and computes the distance (only rank 0 needs
    ``ref``), so the value is the same, bit for bit, for any number of processes.
    Returns None on the other ranks."""
    dist = dist or Dist()
    dim = check_measurement(net, ref, sampler.resolution, num, allow_few_samples)
    start = time.perf_counter()
    share = batch_shard(num, batch_size, dist)
    feats, gen_seconds = sampler_features(sampler, net, len(share), seed, batch_size, device, dim,
                                          progress and dist.is_main, start=share.start)
    parts = gather_to_main((feats, gen_seconds), dist)  # to rank 0 only: the others need no copy
    if parts is None:
        return None
    assert ref is not None, "rank 0 needs the reference statistics"
    feats, gen_seconds = np.concatenate([f for f, _ in parts]), max(s for _, s in parts)
    labels = round_robin_labels(range(num), sampler.num_classes).numpy()  # the classes generate_uint8 drew
    numbers = score_features(feats, ref, kid, seed, resamples, labels, diag, classify(feats, net),
                             net.device)
    total = time.perf_counter() - start
    return dict(**numbers, images_per_sec=num / max(gen_seconds, 1e-9), generation_seconds=gen_seconds,
                total_seconds=total)


def evaluate_images(images: np.ndarray, net: FeatureNetwork, ref: ReferenceStats, batch_size: int, seed: int = 0,
                    kid: bool = False, resamples: int = 0, allow_few_samples: bool = False,
                    labels: np.ndarray | None = None, diag: Diagnostics = Diagnostics()) -> dict[str, Any]:
    """FID / FD (and KID) of uint8 images [N,H,W,3] (classes ``labels`` [N] when known: the bootstrap resamples
    within them) against ``ref``: the checks and numbers of ``evaluate_sampler``, for images made elsewhere."""
    check_measurement(net, ref, images.shape[1], len(images), allow_few_samples)
    start = time.perf_counter()
    feats = image_features(images, net, batch_size)
    numbers = score_features(feats, ref, kid, seed, resamples, labels, diag, classify(feats, net), net.device)
    return dict(**numbers, total_seconds=time.perf_counter() - start)


def mixture_diagnostics(mix: GaussianMixture, images: Tensor, labels: Tensor, reference: Tensor | None,
                        diag: Diagnostics, seed: int = 0) -> dict[str, Any]:
    """``feature_diagnostics`` of a mixture model's samples (uint8 [N,3,R,R], classes ``labels`` [N]) against true
    samples ``reference`` [M,3,R,R], with the mixture's own features (``mean_span_features``: coordinates in the
    span of the component means), and the exact classifier's class statistics (``mixture_classes``)."""
    def pixels(x: Tensor) -> np.ndarray:
        return mean_span_features(mix, x).numpy()

    return feature_diagnostics(pixels(images), pixels(reference) if reference is not None else None,
                               (mixture_classes(mix, images).numpy(), mix.num_classes), labels.numpy(), diag, seed)


def evaluate_mixture(sampler: CheckpointSampler, mix: GaussianMixture, num: int, seed: int, batch_size: int,
                     device: torch.device | str, dist: Dist | None = None, reference: Tensor | None = None,
                     diag: Diagnostics = Diagnostics()) -> dict[str, Any] | None:
    """Exact scores (dmd2.method.mixture.mixture_scores: pixel FD to the true moments, mode coverage, samples on a
    mode) of samples 0..num-1 of a model trained on ``data=gaussian_mixture``, drawn as ``evaluate_sampler`` draws
    them (same seeds, same classes, same slices per rank; rank 0 scores), with the ``mixture_diagnostics``
    against the true samples ``reference``. Returns None on the other ranks."""
    dist = dist or Dist()
    start = time.perf_counter()
    share = batch_shard(num, batch_size, dist)
    gen_start = time.perf_counter()
    parts = list(generate_uint8(sampler, len(share), seed, batch_size, device, share.start))
    gen_seconds = time.perf_counter() - gen_start
    gathered = gather_to_main((parts, gen_seconds), dist)
    if gathered is None:
        return None
    images = torch.cat([x for p, _ in gathered for x, _ in p])
    labels = torch.cat([y for p, _ in gathered for _, y in p])
    scores = mixture_scores(mix, images, labels)
    gen_seconds = max(s for _, s in gathered)
    return dict(value=scores["fd"], scores=scores, images_per_sec=num / max(gen_seconds, 1e-9),
                generation_seconds=gen_seconds, total_seconds=time.perf_counter() - start,
                **mixture_diagnostics(mix, images, labels, reference, diag, seed))


# --------------------------------------------------------------------------------------------- one measurement


@dataclass(frozen=True)
class MeasureSettings:
    """How many samples are measured and how: ``num`` samples, sample i from noise seeded by (``seed``, i),
    ``batch_size`` at a time; KID too (``kid``); ``resamples`` bootstrap resamples behind each standard deviation;
    ``allow_few_samples``: measure even when ``num`` does not exceed the feature dimension."""

    num: int
    seed: int
    batch_size: int
    kid: bool = False
    resamples: int = 0
    allow_few_samples: bool = False
    diag: Diagnostics = Diagnostics()


@dataclass
class Measurement:
    """What every sampler or image set is measured with: a feature network and reference statistics (``ref``:
    rank 0 only), or a known-answer mixture (``floor``: its scores of ``num`` true samples, rank 0 only)."""

    settings: MeasureSettings
    net: FeatureNetwork | None = None
    ref: ReferenceStats | None = None
    mixture: GaussianMixture | None = None
    floor: dict[str, Any] | None = None
    true_samples: Tensor | None = None  # a mixture's reference set for precision / recall (rank 0 only)

    @property
    def key(self) -> str:
        """The key the value is logged under: eval/fid, eval/fd_<network> or eval/mixture_fd."""
        return MIXTURE_KEY if self.mixture is not None else self.net.wandb_key

    @property
    def metric(self) -> str:
        """What the value is called in logs and result rows: FID, FD (<network>) or the mixture's."""
        return MIXTURE_METRIC if self.mixture is not None else self.net.metric

    @property
    def name(self) -> str:
        """The value with its sample count, e.g. fid@10k."""
        return metric_name(self.key, self.settings.num)

    @property
    def against(self) -> str:
        """What the samples are compared with, for the log (rank 0; "" on the others)."""
        if self.mixture is not None:
            return "the exact mixture"
        return self.ref.description if self.ref is not None else ""

    def measure(self, sampler: CheckpointSampler, device: torch.device | str, dist: Dist | None = None,
                progress: bool = True) -> dict[str, Any] | None:
        """The numbers of samples 0..num-1 of ``sampler`` (every rank calls it; None on ranks > 0):
        ``evaluate_sampler`` or, for a mixture, ``evaluate_mixture``."""
        s = self.settings
        if self.mixture is not None:
            return evaluate_mixture(sampler, self.mixture, s.num, s.seed, s.batch_size, device, dist,
                                    self.true_samples, s.diag)
        return evaluate_sampler(sampler, self.net, self.ref, s.num, s.seed, s.batch_size, device, s.kid, dist=dist,
                                progress=progress, resamples=s.resamples, allow_few_samples=s.allow_few_samples,
                                diag=s.diag)

    def measure_images(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
        """The numbers of uint8 images [N,H,W,3] (classes ``labels`` [N] when known): ``evaluate_images``."""
        s = self.settings
        return evaluate_images(images, self.net, self.ref, s.batch_size, s.seed, s.kid, s.resamples,
                               s.allow_few_samples, labels, s.diag)


def set_up_measurement(net: FeatureNetwork, reference: Callable[[], ReferenceStats], resolution: int | None,
                       settings: MeasureSettings, dist: Dist | None = None, prefix: str = "") -> Measurement:
    """A measurement with ``net`` against the statistics ``reference()`` makes, of images of side ``resolution``
    (None: not known yet, checked when measuring). Refused before the reference is computed when ``settings.num``
    samples are too few, and then when the reference does not fit; ``prefix`` ("eval." in training) goes before
    the config keys the messages name. Every rank calls it: rank 0 computes (or reads the cached) reference while
    the others wait."""
    dist = dist or Dist()
    if resolution is not None:  # too few samples: refused before anything is computed
        check_measurement(net, None, resolution, settings.num, settings.allow_few_samples, prefix)
    ref = None
    if dist.is_main:
        ref = reference()
        if resolution is not None:  # ... or a reference that does not fit (measuring checks again)
            check_reference(ref, net, resolution, prefix)
    barrier(dist)
    return Measurement(settings, net=net, ref=ref)


def mixture_measurement(mixture: GaussianMixture, settings: MeasureSettings, dist: Dist | None = None) -> Measurement:
    """The exact scores of a model of ``data=gaussian_mixture``, with no feature network or reference statistics;
    rank 0 computes the floor (the scores of ``settings.num`` true samples, with their precision / recall /
    density / coverage against an independent set of ``settings.num`` true samples, the reference set every
    evaluation is compared with)."""
    dist = dist or Dist()
    if not dist.is_main:
        return Measurement(settings, mixture=mixture)
    floor: dict[str, Any] = reference_scores(mixture, settings.num, settings.seed)
    reference, _ = true_samples(mixture, settings.num, settings.seed, stream=2)
    x, labels = true_samples(mixture, settings.num, settings.seed, stream=1)
    floor.update(mixture_diagnostics(mixture, x, labels, reference, settings.diag, settings.seed))
    return Measurement(settings, mixture=mixture, floor=floor, true_samples=reference)
