"""FID / Frechet distances with clean-fid: feature networks, reference statistics, streamed sample features.

Protocol: ``num`` samples from a checkpoint (dmd2.io.sampler: per-sample seeded noise, round-robin classes), uint8
images in [0, 255], featurized batch by batch exactly as clean-fid featurizes an image folder (uint8 image ->
clean-fid's resize -> float [0, 255] -> feature network), so only the features [N, D] are ever held.
The distance is clean-fid's ``frechet_distance`` between the Gaussians (mean, covariance) of the two feature sets.

"FID" is reserved for clean-fid's Inception network, in one of two protocols (``feature_network.resize``):
"clean" (clean-fid's PIL-bicubic 299x299 resize; comparable with clean-fid's published numbers) or
"legacy_tensorflow" (the network resizes inside, as the original TensorFlow code did; this is how EDM and DMD2
measure, against reference statistics such as EDM's cifar10-32x32.npz). Any other (TorchScript) feature network
gives an "FD (<network name>)", never called FID.

Every comparison is checked before any image is generated or read (``check_measurement``): reference statistics
record what they were made from (data set, source, resolution, image count, feature network, resize:
``ReferenceStats.meta``), and a reference that differs from what is measured in resolution, network or resize
is refused, as is a sample count at or below the feature dimension (a singular covariance) unless allowed. Each
value comes with its sampling noise: the standard deviation over bootstrap resamples of the generated samples'
features (``bootstrap_std``), computed from the features already extracted.

Nothing here downloads a file unless asked to (``allow_download``): a missing Inception weights file or precomputed
statistics file fails at once with a message saying which file is needed, where it comes from and where it goes.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import platform
import re
import socket
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import cleanfid
import numpy as np
import torch
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.features import get_reference_statistics
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance
from cleanfid.fid import get_batch_features, get_files_features, kernel_distance
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from cleanfid.utils import EXTENSIONS
from torch import Tensor
from torch.utils.data import DataLoader

from dmd2.config.errors import EvaluationError
from dmd2.config.names import dataset_label, metric_key, network_stem
from dmd2.config.settings import FEATURE_NETWORKS, GENERATED_DATA
from dmd2.data.datasets import build_dataset
from dmd2.data.images import to_uint8
from dmd2.io.files import atomic_write, file_sha256
from dmd2.io.sampler import CheckpointSampler, generate_uint8, round_robin_labels
from dmd2.method.frechet import frechet_to_reference
from dmd2.method.mixture import GaussianMixture, mixture_scores
from dmd2.runtime.distributed import Dist, batch_shard, gather_to_main

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = inception_url  # where clean-fid downloads the Inception weights from
# clean-fid's precomputed statistics: <base>/<name>_<mode>_<split>_<res>.npz (see cleanfid.features)
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"
CIFAR10_TRAIN = dict(name="cifar10", res=32, split="train", mode="clean")
CIFAR10_TRAIN_IMAGES = 50000
GENERATE_GRID = "grid.png"  # generate.py's overview grid in its output folder
DOWNLOAD_TIMEOUT_S = 60.0  # socket timeout for any download we allow: a dead connection fails, never hangs


@contextlib.contextmanager
def quiet_jit_load() -> Iterator[None]:
    """torch.jit.load warns that TorchScript is deprecated; clean-fid's Inception and feature files are TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


# --------------------------------------------------------------------------------------------- feature networks


@dataclass
class FeatureNetwork:
    """A feature network and how images reach it. ``model``: float [B,3,H,W] in [0,255] on ``device`` -> [B,D]."""

    identity: str        # cache-key part: "inception_v3" or "ts-<file stem>-<sha256[:12]>"
    metric: str          # "FID" (Inception) or "FD (<file stem>)"
    wandb_key: str       # "eval/fid" or "eval/fd_<file stem>"
    resize: str          # "clean" (PIL bicubic to 299x299), "legacy_tensorflow" (inside Inception) or "none"
    model: Callable[[Tensor], Tensor]
    device: torch.device
    source: str          # the weights file

    @property
    def is_inception(self) -> bool:
        return self.identity == "inception_v3"

    @property
    def input_size(self) -> int | None:
        """Side of the images the model takes (299 after the clean resize), or None: the images' own."""
        return 299 if self.resize == "clean" else None


def default_inception_path() -> str:
    """Where clean-fid keeps its Inception weights: /tmp/inception-2015-12-05.pt (./ on Windows)."""
    return os.path.join("./" if platform.system() == "Windows" else "/tmp", INCEPTION_FILE)


@contextlib.contextmanager
def download_guard(path: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Run a clean-fid download with a socket timeout; a failed download leaves no partial ``path`` behind."""
    existed = os.path.exists(path)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        yield
    except BaseException:
        if not existed and os.path.exists(path):
            os.remove(path)
        raise
    finally:
        socket.setdefaulttimeout(previous)


def missing_inception_message(path: str) -> str:
    return (
        f"Inception weights not found: {path}\n"
        f"FID uses clean-fid's Inception network, the file {INCEPTION_FILE} "
        f"(clean-fid downloads it from {INCEPTION_URL}).\n"
        f"Offline: copy {INCEPTION_FILE} to {default_inception_path()} (clean-fid's default location), or anywhere "
        f"and set feature_network.inception_weights=/path/to/{INCEPTION_FILE}.\n"
        f"Online: set feature_network.allow_download=true to let clean-fid download it.\n"
        f"Without Inception weights, a TorchScript feature network (feature_network.name=torchscript "
        f"feature_network.path=...) measures an FD instead (not comparable with published FIDs)."
    )


def build_inception(weights: str | None, device: torch.device, allow_download: bool = False,
                    resize: str = "clean") -> FeatureNetwork:
    """clean-fid's Inception, as its ``build_feature_extractor(mode=resize, use_dataparallel=False)`` builds it but
    loaded from ``weights`` instead of a fixed /tmp: "clean" takes [B,3,299,299]; "legacy_tensorflow" takes images
    at their own size and resizes them inside the network (TensorFlow's bilinear resize) -> [B,2048]."""
    if resize not in ("clean", "legacy_tensorflow"):
        raise EvaluationError(f"feature_network.resize = {resize!r}: Inception takes 'clean' or 'legacy_tensorflow'")
    path = os.path.abspath(weights or default_inception_path())
    if os.path.basename(path) != INCEPTION_FILE:
        raise EvaluationError(f"feature_network.inception_weights = {weights!r}: clean-fid loads the weights by "
                              f"their file name; the file must be called {INCEPTION_FILE}")
    folder = os.path.dirname(path)
    if not os.path.isfile(path):
        if not allow_download:
            raise EvaluationError(missing_inception_message(path))
        log.info(f"[evaluate] downloading {INCEPTION_FILE} from {INCEPTION_URL} to {folder}")
        os.makedirs(folder, exist_ok=True)
        try:
            with download_guard(path):
                check_download_inception(fpath=folder)
        except Exception as err:
            message = f"download of {INCEPTION_URL} failed ({err}).\n" + missing_inception_message(path)
            raise EvaluationError(message) from err
    try:
        with quiet_jit_load():
            model = InceptionV3W(folder, download=False, resize_inside=resize == "legacy_tensorflow").to(device).eval()
    except Exception as err:
        raise EvaluationError(f"cannot load the Inception weights {path} ({err}); delete the file and fetch "
                              f"{INCEPTION_FILE} again from {INCEPTION_URL}") from err
    key = metric_key("inception", resize)
    if resize == "clean":
        return FeatureNetwork("inception_v3", "FID", key, resize, model, device, path)
    return FeatureNetwork("inception_v3", "FID (TF-Inception protocol)", key, resize, model, device, path)


def build_torchscript(path: str, device: torch.device, resize: str) -> FeatureNetwork:
    """A TorchScript feature network file: float [B,3,H,W] in [0,255] -> [B,D]; H = W = 299 when resize='clean'."""
    if resize not in ("clean", "none"):
        raise EvaluationError(f"feature_network.resize = {resize!r}: a TorchScript network takes 'clean' or 'none'")
    try:
        with quiet_jit_load():
            module = torch.jit.load(path, map_location=device).eval()
    except Exception as err:
        raise EvaluationError(f"feature_network.path = {path!r}: cannot load it as a TorchScript module "
                              f"({err})") from err
    stem = network_stem(path)
    key = metric_key("torchscript", resize, path)
    # content hash: a retrained network never reuses old statistics
    identity = f"ts-{key[len('eval/fd_'):]}-{file_sha256(path)[:12]}"
    return FeatureNetwork(identity, f"FD ({stem})", key, resize, module, device, os.path.abspath(path))


def build_feature_network(name: str, device: torch.device, *, path: str | None = None, resize: str = "clean",
                          inception_weights: str | None = None, allow_download: bool = False) -> FeatureNetwork:
    """The configured feature network; fails within seconds when its file is missing (nothing is downloaded
    unless ``allow_download``)."""
    if name == "inception":
        return build_inception(inception_weights, device, allow_download, resize)
    if name == "torchscript":
        if not path or not os.path.isfile(path):
            raise EvaluationError(f"feature_network.path = {path!r}: file not found (a TorchScript feature network)")
        return build_torchscript(path, device, resize)
    raise EvaluationError(f"feature_network.name = {name!r}: expected one of {FEATURE_NETWORKS}")


def network_input(images: Tensor, resize: str) -> Tensor:
    """uint8 images [B,3,H,W] -> float [B,3,H',W'] in [0,255]: clean-fid's "clean" resize (PIL bicubic on float
    channels, H' = W' = 299) or unchanged (H' = H). Matches clean-fid reading the same images from PNG files."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if resize != "clean":  # "none", or "legacy_tensorflow": Inception resizes inside
        return images.float()
    fn_resize = build_resizer("clean")
    arrays = images.permute(0, 2, 3, 1).numpy()  # [B,H,W,3] uint8, clean-fid's layout
    return torch.from_numpy(np.stack([fn_resize(a) for a in arrays]).transpose(0, 3, 1, 2).copy())


def batch_features(images: Tensor, net: FeatureNetwork) -> np.ndarray:
    """uint8 images [B,3,H,W] -> features [B,D] (numpy, the network's dtype), via clean-fid's get_batch_features."""
    feats = get_batch_features(network_input(images, net.resize), net.model, net.device)
    if feats.ndim != 2 or feats.shape[0] != images.shape[0]:
        raise EvaluationError(f"feature network {net.source} returned shape {tuple(feats.shape)} for a batch of "
                              f"{images.shape[0]}; expected [B, D]")
    return feats


def feature_dim(net: FeatureNetwork, resolution: int) -> int:
    """Run two blank images of side ``resolution`` through the network (a quick check before generating) -> D."""
    return batch_features(torch.zeros(2, 3, resolution, resolution, dtype=torch.uint8), net).shape[1]


# --------------------------------------------------------------------------------------------- statistics, distances


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features [N,D] -> (mean [D], covariance [D,D]), float64, as clean-fid computes them (N >= 2)."""
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features [N>=2, D], got shape {feats.shape}")
    return np.mean(feats, axis=0, dtype=np.float64), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1 [D], sigma1 [D,D]) and N(mu2, sigma2): clean-fid's implementation."""
    return float(cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2))


def kernel_inception_distance(feats: np.ndarray, ref_feats: np.ndarray, seed: int = 0) -> float:
    """KID (clean-fid's ``kernel_distance``: 100 subsets of up to 1000) between features [N,D] and [M,D]; the
    random subsets come from ``seed``, so reruns agree, and the global NumPy random state is left as it was."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(ref_feats.astype(np.float64), feats.astype(np.float64)))
    finally:
        np.random.set_state(state)


def bootstrap_indices(rng: np.random.Generator, labels: np.ndarray | None, n: int) -> np.ndarray:
    """One bootstrap resample of n items: n draws with replacement, within each class when ``labels`` [n] are
    given (the class counts stay as they were: evaluations draw classes round-robin, so a rerun with other seeds
    has the same counts)."""
    if labels is None:
        return rng.integers(0, n, n)
    parts = [members[rng.integers(0, len(members), len(members))]
             for members in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.concatenate(parts)


def resample_statistics(centered: np.ndarray, mean: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D,D]) of a resample that holds item i counts[i] times, from the features centered
    on their mean (``centered`` [N,D] = feats - ``mean``): equal to ``feature_statistics(feats[idx])`` up to
    float32 rounding, without copying the features."""
    n = int(counts.sum())
    weights = counts.astype(centered.dtype)
    shift = (weights @ centered).astype(np.float64) / n
    scatter = (centered * weights[:, None]).T @ centered
    cov = (scatter.astype(np.float64) - n * np.outer(shift, shift)) / (n - 1)
    return mean + shift, cov


def bootstrap_std(feats: np.ndarray, ref: ReferenceStats, resamples: int, seed: int, kid: bool = False,
                  labels: np.ndarray | None = None) -> tuple[float | None, float | None]:
    """The sampling noise of FD (and KID) of the generated features [N,D] against a fixed reference: the standard
    deviation over ``resamples`` bootstrap resamples of the generated samples (within each class of ``labels``
    [N] when given), i.e. the spread a rerun with other seeds would show (the reference is the same in every run,
    so it is not resampled). Resamples come from ``seed``; returns (fd_std, kid_std), None where not computed."""
    if resamples < 2:
        return None, None
    rng = np.random.default_rng(seed)
    distance = frechet_to_reference(ref.mu, ref.sigma)
    mean = feats.mean(axis=0, dtype=np.float64)
    centered = (feats - mean).astype(np.float32)  # one copy for all resamples; no [N,D] float64 per resample
    fds, kids = [], []
    for b in range(resamples):
        idx = bootstrap_indices(rng, labels, len(feats))
        fds.append(distance(*resample_statistics(centered, mean, np.bincount(idx, minlength=len(feats)))))
        if kid and ref.feats is not None:
            kids.append(kernel_inception_distance(feats[idx], ref.feats, seed + 1 + b))
    return float(np.std(fds, ddof=1)), (float(np.std(kids, ddof=1)) if kids else None)


def score_features(feats: np.ndarray, ref: ReferenceStats, kid: bool = False, seed: int = 0,
                   resamples: int = 0, labels: np.ndarray | None = None) -> dict[str, Any]:
    """FD of features [N,D] to ``ref`` (clean-fid's), KID when asked (and ``ref`` holds features), each with its
    bootstrap standard deviation (``bootstrap_std``, stratified by ``labels`` [N] when known): the numbers every
    evaluation reports, whatever the images came from (a checkpoint, a folder, an .npz)."""
    value = frechet_distance(*feature_statistics(feats), ref.mu, ref.sigma)
    kid_value = kernel_inception_distance(feats, ref.feats, seed) if kid and ref.feats is not None else None
    std, kid_std = bootstrap_std(feats, ref, resamples, seed, kid_value is not None, labels)
    return dict(value=value, std=std, kid=kid_value, kid_std=kid_std, num_samples=int(len(feats)))


@dataclass
class ReferenceStats:
    """Statistics of the reference images: mean [D], covariance [D,D], features [M,D] (only when KID needs them),
    and what they were made from (stored with every file this project writes, see ``meta``)."""

    mu: np.ndarray
    sigma: np.ndarray
    description: str                 # e.g. "cifar10 train (clean-fid precomputed)" or the folder
    path: str                        # the statistics file
    num_images: int | None = None    # unknown for statistics files without metadata
    image_size: int | None = None    # side of the reference images; None: unknown
    feats: np.ndarray | None = field(default=None, repr=False)
    dataset: str | None = None       # the data set's name, e.g. "cifar10 train", "imagenet-64x64", a folder's name
    source: str | None = None        # where the images came from: a path, with a content hash where one is known
    network: str | None = None       # FeatureNetwork.identity of the features; None: unknown (EDM's .npz files)
    resize: str | None = None        # the feature network's resize mode; None: unknown
    resolution_from: str = "metadata"  # how image_size is known: metadata | reference.resolution | the file name

    def meta(self) -> dict[str, Any]:
        """The metadata written next to ``mu`` and ``sigma`` (a JSON string under the key ``meta``)."""
        return dict(dataset=self.dataset, source=self.source, image_size=self.image_size,
                    num_images=self.num_images, network=self.network, resize=self.resize)


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


def count_label(num: int) -> str:
    """A sample count as it appears in metric names: 50000 -> '50k', 10000 -> '10k', 2500 -> '2.5k', 40 -> '40'."""
    if num >= 1000 and num % 100 == 0:
        return f"{num / 1000:g}k"
    return str(num)


def metric_name(wandb_key: str, num: int) -> str:
    """The name of a value with its sample count: ('eval/fid', 10000) -> 'fid@10k'."""
    return f"{wandb_key.split('/', 1)[-1]}@{count_label(num)}"


def precomputed_stats_name(kid: bool = False, **spec: Any) -> str:
    """clean-fid's file name for precomputed statistics, e.g. 'cifar10_clean_train_32.npz' (+ '_kid' for KID)."""
    spec = {**CIFAR10_TRAIN, **spec}
    return f"{spec['name']}_{spec['mode']}_{spec['split']}_{spec['res']}{'_kid' if kid else ''}.npz".lower()


def precomputed_cifar10_stats(net: FeatureNetwork, cache_dir: str, kid: bool = False,
                              allow_download: bool = False) -> ReferenceStats:
    """clean-fid's precomputed CIFAR-10 train statistics (Inception, clean resize, 32x32). Looked up in
    ``cache_dir`` and in clean-fid's own stats folder; downloaded by clean-fid only when ``allow_download``."""
    if not net.is_inception or net.resize != "clean":
        raise EvaluationError("reference.name=cifar10_train: clean-fid's precomputed statistics are Inception "
                              "features ('clean' resize); with another feature network use reference.name=folder "
                              "reference.folder=<image folder>")
    cleanfid_dir = os.path.join(os.path.dirname(cleanfid.__file__), "stats")
    names = [precomputed_stats_name()] + ([precomputed_stats_name(kid=True)] if kid else [])
    found: dict[str, str] = {}
    for name in names:
        for folder in (cache_dir, cleanfid_dir):
            if os.path.isfile(os.path.join(folder, name)):
                found[name] = os.path.join(folder, name)
                break
    missing = [n for n in names if n not in found]
    if missing and not allow_download:
        raise EvaluationError(
            f"clean-fid's precomputed CIFAR-10 statistics are not on this machine: {', '.join(missing)}.\n"
            f"Offline: copy {' and '.join(CLEANFID_STATS_URL + n for n in missing)} into "
            f"{os.path.abspath(cache_dir)}/, "
            f"or compute statistics from an image folder: reference.name=folder "
            f"reference.folder=data/cifar10-jpeg/train.\n"
            f"Online: set reference.allow_download=true (or feature_network.allow_download=true).")
    for name in missing:
        log.info(f"[evaluate] downloading {CLEANFID_STATS_URL}{name} (clean-fid)")
        target = os.path.join(cleanfid_dir, name)
        try:
            with download_guard(target):
                result = get_reference_statistics(CIFAR10_TRAIN["name"], CIFAR10_TRAIN["res"], mode="clean",
                                                  split="train", metric="KID" if name.endswith("_kid.npz") else "FID")
        except Exception as err:
            raise EvaluationError(f"download of {CLEANFID_STATS_URL}{name} failed ({err}); use custom statistics: "
                                  f"reference.name=folder reference.folder=<image folder>") from err
        del result
        found[name] = target
    with np.load(found[names[0]]) as stats:
        mu, sigma = stats["mu"], stats["sigma"]
    feats = None
    if kid:
        with np.load(found[names[1]]) as stats:
            feats = stats["feats"]
    return ReferenceStats(mu, sigma, "cifar10 train (clean-fid precomputed)", found[names[0]], image_size=32,
                          num_images=CIFAR10_TRAIN_IMAGES, feats=feats, dataset="cifar10 train",
                          source=CLEANFID_STATS_URL + names[0], network=net.identity, resize="clean")


def resolution_in_name(path: str) -> int | None:
    """The image side a statistics file's name states: 'cifar10-32x32.npz' -> 32, 'imagenet-64x64.npz' -> 64."""
    match = re.search(r"(\d+)x(\d+)", os.path.basename(path))
    return int(match.group(1)) if match and match.group(1) == match.group(2) else None


def npz_stats(path: str, net: FeatureNetwork, resolution: int | None = None) -> ReferenceStats:
    """Reference statistics from an .npz with ``mu`` [D] and ``sigma`` [D,D]: a file written by this project
    (with its ``meta``), or EDM's cifar10-32x32.npz and imagenet-64x64.npz (made by EDM's fid.py ref with
    TensorFlow-Inception features; no metadata: the resolution is ``resolution`` (reference.resolution) or read
    from the file name, and the log says which)."""
    try:
        with np.load(path) as stats:
            if "mu" not in stats.files or "sigma" not in stats.files:
                raise EvaluationError(f"reference.path = {path!r}: expected arrays 'mu' and 'sigma', found "
                                      f"{sorted(stats.files)}")
            mu, sigma = np.asarray(stats["mu"], dtype=np.float64), np.asarray(stats["sigma"], dtype=np.float64)
            meta = json.loads(str(stats["meta"])) if "meta" in stats.files else None
    except EvaluationError:
        raise
    except Exception as err:
        raise EvaluationError(f"reference.path = {path!r}: not a readable .npz of statistics ({err})") from err
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvaluationError(f"reference.path = {path!r}: expected mu [D] and sigma [D,D], got {mu.shape} and "
                              f"{sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluationError(f"reference.path = {path!r}: mu or sigma holds NaN or inf")
    name = os.path.basename(path)
    if meta is not None:  # written by this project: its own record of what it was made from
        stated = meta.get("image_size")
        if resolution is not None and stated is not None and resolution != stated:
            raise EvaluationError(f"reference.resolution = {resolution}, but {path} records images of "
                                  f"{stated}x{stated}; leave reference.resolution null for files with metadata")
        log.info(f"[evaluate] reference {name}: {meta.get('dataset')}, {meta.get('num_images')} images of "
                 f"{stated}x{stated}, {meta.get('network')} features (resize {meta.get('resize')})")
        return ReferenceStats(mu, sigma, f"{os.path.abspath(path)} ({meta.get('dataset')})", path,
                              meta.get("num_images"), stated, dataset=meta.get("dataset"), source=meta.get("source"),
                              network=meta.get("network"), resize=meta.get("resize"))
    from_name = resolution_in_name(path)
    size, how = (resolution, "reference.resolution") if resolution is not None else (from_name, "the file name")
    if size is not None:
        log.info(f"[evaluate] reference {name} holds only mu and sigma (no metadata): taken as statistics of "
                 f"{size}x{size} images ({how}) made with this run's feature network ({net.identity}, resize "
                 f"{net.resize}); only their dimension ({mu.shape[0]}) can be checked")
    if net.is_inception and net.resize != "legacy_tensorflow":
        log.info(f"[evaluate] note: {name} is compared under clean-fid's 'clean' protocol; EDM's "
                 f"reference files hold TF-Inception statistics (feature_network.resize=legacy_tensorflow)")
    return ReferenceStats(mu, sigma, f"{os.path.abspath(path)} (statistics file)", path, image_size=size,
                          dataset=os.path.splitext(name)[0], source=os.path.abspath(path),
                          resolution_from=how if size is not None else "unknown")


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, clean-fid's extensions), sorted."""
    root = os.path.join(glob.escape(folder), "**")
    files = {f for ext in EXTENSIONS for f in glob.glob(os.path.join(root, "*." + ext), recursive=True)}
    return sorted(files)


def folder_fingerprint(folder: str, files: list[str]) -> str:
    """Hash of every file's relative path and bytes (read in 1 MiB blocks): a folder whose images changed gets new
    statistics, whatever their sizes and modification times (about 2 s per 50,000 CIFAR-size images)."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{os.path.relpath(f, folder)}\t{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def stats_cache_path(cache_dir: str, folder: str, fingerprint: str, net: FeatureNetwork) -> str:
    """<cache_dir>/<folder name>-<fingerprint[:12]>_<network identity>_<resize>.npz: never shared between
    feature networks, resize modes or folder contents."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(folder))) or "folder"
    return os.path.join(cache_dir, f"{name}-{fingerprint[:12]}_{net.identity}_{net.resize}.npz")


def _no_resize(image: np.ndarray) -> np.ndarray:
    return image  # uint8 [H,W,3]; clean-fid's loader turns it into float [3,H,W] in [0,255]


def _save_npz(path: str, **arrays: Any) -> None:
    """Write an .npz atomically (a temporary file, then rename)."""
    atomic_write(path, lambda f: np.savez(f, **arrays), suffix=".npz")


def write_reference(path: str, ref: ReferenceStats, **extra: Any) -> None:
    """Write reference statistics as EDM's tools read them (``mu`` [D], ``sigma`` [D,D], float64) with their
    metadata (``meta``: a JSON string of ``ReferenceStats.meta`` and ``extra``)."""
    meta = {**ref.meta(), **extra}
    _save_npz(path, mu=np.asarray(ref.mu, np.float64), sigma=np.asarray(ref.sigma, np.float64),
              meta=np.array(json.dumps(meta)))


def folder_stats(folder: str, net: FeatureNetwork, cache_dir: str, kid: bool = False, batch_size: int = 128,
                 num_workers: int = 0) -> ReferenceStats:
    """Statistics of the images in ``folder`` under ``net``, computed once with clean-fid's folder loader and
    cached in ``cache_dir`` (the features [M,D] are cached too, in <name>_feats.npz, when KID needs them)."""
    files = list_images(folder)
    if len(files) < 2:
        raise EvaluationError(f"reference.folder = {folder!r}: found {len(files)} images (need at least 2; "
                              f"extensions {sorted(EXTENSIONS)})")
    fingerprint = folder_fingerprint(folder, files)
    path = stats_cache_path(cache_dir, folder, fingerprint, net)
    feats_path = path[: -len(".npz")] + "_feats.npz"
    description = f"{os.path.abspath(folder)} ({len(files)} images)"
    if os.path.isfile(path) and (not kid or os.path.isfile(feats_path)):
        log.info(f"[evaluate] reusing cached reference statistics {path}")
        with np.load(path) as stats:
            meta = json.loads(str(stats["meta"]))
            mu, sigma = stats["mu"], stats["sigma"]
        if meta.get("network") != net.identity or meta.get("resize") != net.resize:
            raise EvaluationError(f"cached statistics {path} were made with {meta.get('network')}/"
                                  f"{meta.get('resize')}, not {net.identity}/{net.resize}; delete the file")
        feats = None
        if kid:
            with np.load(feats_path) as stored:
                feats = stored["feats"]
        return ReferenceStats(mu, sigma, description, path, meta["num_images"], meta["image_size"], feats,
                              dataset=meta.get("dataset"), source=meta.get("source"), network=meta.get("network"),
                              resize=meta.get("resize"))

    from PIL import Image

    with Image.open(files[0]) as first:
        image_size = int(first.size[0])
    log.info(f"[evaluate] computing reference statistics of {len(files)} images in {folder} with {net.metric} features "
             f"(resize {net.resize}); cached in {path}")
    start = time.perf_counter()
    feats = get_files_features(files, net.model, num_workers=num_workers, batch_size=batch_size, device=net.device,
                               mode="clean", custom_fn_resize=None if net.resize == "clean" else _no_resize,
                               description=f"reference {os.path.basename(os.path.normpath(folder))}: ")
    mu, sigma = feature_statistics(feats)
    ref = ReferenceStats(mu, sigma, description, path, len(files), image_size, feats if kid else None,
                         dataset=os.path.basename(os.path.normpath(os.path.abspath(folder))),
                         source=f"{os.path.abspath(folder)} (files sha256 {fingerprint[:12]})", network=net.identity,
                         resize=net.resize)
    seconds = round(time.perf_counter() - start, 1)
    write_reference(path, ref, network_file=net.source, seconds=seconds)
    _save_npz(feats_path, feats=feats.astype(np.float32))
    log.info(f"[evaluate] reference statistics done in {seconds} s")
    return ref


# --------------------------------------------------------------------------------------------- generated samples


def sampler_features(sampler: CheckpointSampler, net: FeatureNetwork, num: int, seed: int, batch_size: int,
                     device: torch.device | str, dim: int, progress: bool = True, start: int = 0
                     ) -> tuple[np.ndarray, float]:
    """Features [num, dim] of samples start..start+num-1 of ``sampler`` (dmd2.io.sampler.generate_uint8: seeded
    noise, round-robin classes), generated and featurized batch by batch; also the seconds spent generating."""
    feats = np.empty((num, dim), dtype=np.float32)
    batches = generate_uint8(sampler, num, seed, batch_size, device, start)
    done, gen_seconds, next_report = 0, 0.0, num / 10
    while True:
        start = time.perf_counter()
        try:
            images, _ = next(batches)  # uint8 [B,3,R,R] on the CPU (the copy waits for the device)
        except StopIteration:
            break
        gen_seconds += time.perf_counter() - start
        feats[done: done + len(images)] = batch_features(images, net)
        done += len(images)
        if progress and (done >= next_report or done == num):
            log.info(f"[evaluate]   {done}/{num} samples ({done / max(gen_seconds, 1e-9):.1f} images/s generation)")
            next_report += num / 10
    return feats, gen_seconds


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


def evaluate_sampler(sampler: CheckpointSampler, net: FeatureNetwork, ref: ReferenceStats | None, num: int,
                     seed: int, batch_size: int, device: torch.device | str, kid: bool = False,
                     dist: Dist | None = None, progress: bool = True, resamples: int = 0,
                     allow_few_samples: bool = False) -> dict[str, Any] | None:
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
    lo, hi = share.start, share.stop
    feats, gen_seconds = sampler_features(sampler, net, hi - lo, seed, batch_size, device, dim,
                                          progress and dist.is_main, start=lo)
    parts = gather_to_main((feats, gen_seconds), dist)  # to rank 0 only: the others need no copy
    if parts is None:
        return None
    assert ref is not None, "rank 0 needs the reference statistics"
    feats, gen_seconds = np.concatenate([f for f, _ in parts]), max(s for _, s in parts)
    labels = round_robin_labels(range(num), sampler.num_classes).numpy()  # the classes generate_uint8 drew
    numbers = score_features(feats, ref, kid, seed, resamples, labels)
    total = time.perf_counter() - start
    return dict(**numbers, images_per_sec=num / max(gen_seconds, 1e-9), generation_seconds=gen_seconds,
                total_seconds=total)


# --------------------------------------------------------------------------------------------- images from files


def read_image_file(path: str) -> np.ndarray:
    """One image file -> uint8 [H,W,3] (RGB)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as err:  # truncated, corrupted: PIL's message names no file
        raise EvaluationError(f"cannot read the image {path}: {err}") from err


def folder_labels(relpaths: list[str]) -> np.ndarray | None:
    """Class labels [N] of image files from their sub-folders (generate.py's <class>/<seed>.png; sorted folder
    names -> 0, 1, ...), or None when some image sits at the top level."""
    folders = [os.path.dirname(p) for p in relpaths]
    if not folders or not all(folders):
        return None
    names = sorted(set(folders))
    return np.array([names.index(d) for d in folders])


def load_image_set(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images to measure -> (uint8 [N,H,W,3], class labels [N] or None when the files do not say), from the
    layouts of generate.py, ADM and EDM:

    - an .npz whose ``arr_0`` is uint8 [N,H,W,3] (generate.py format=npz, ADM's sample batches) or [N,3,H,W];
      labels: its ``arr_1`` [N] when present (generate.py writes them);
    - a .zip or a folder of image files (EDM's generate.py output and dataset format, generate.py's PNGs), read
      recursively in sorted order; labels: the sub-folder of each image (generate.py's <class>/<seed>.png), when
      every image sits in one."""
    labels: np.ndarray | None = None
    if os.path.isfile(path) and path.endswith(".npz"):
        with np.load(path) as data:
            if "arr_0" not in data.files:
                raise EvaluationError(f"images = {path!r}: expected the array 'arr_0' (uint8 [N,H,W,3]), found "
                                      f"{sorted(data.files)}")
            images = data["arr_0"]
            if "arr_1" in data.files and data["arr_1"].shape == (len(images),):
                labels = np.asarray(data["arr_1"])
        if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.transpose(0, 2, 3, 1)  # [N,3,H,W] -> [N,H,W,3]
    elif os.path.isfile(path) and path.endswith(".zip"):
        import io
        import zipfile

        from PIL import Image

        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(tuple("." + e for e in EXTENSIONS))
                           and n != GENERATE_GRID)
            images = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB"), dtype=np.uint8)
                               for n in names]) if names else np.zeros((0, 0, 0, 3), np.uint8)
        labels = folder_labels(names)
    elif os.path.isdir(path):
        # generate.py's overview grid (<folder>/grid.png) is not a sample
        files = [f for f in list_images(path) if os.path.relpath(f, path) != GENERATE_GRID]
        arrays = [read_image_file(f) for f in files]
        odd = [f for f, a in zip(files, arrays) if a.shape != arrays[0].shape]
        if odd:
            raise EvaluationError(f"images = {path!r}: images of different sizes, e.g. {files[0]} "
                                  f"{arrays[0].shape[:2]} and {odd[0]} {arrays[files.index(odd[0])].shape[:2]}")
        images = np.stack(arrays) if arrays else np.zeros((0, 0, 0, 3), np.uint8)
        labels = folder_labels([os.path.relpath(f, path) for f in files])
    else:
        raise EvaluationError(f"images = {path!r}: expected an image folder, a .zip of images or an .npz with "
                              f"arr_0 [N,H,W,3]")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise EvaluationError(f"images = {path!r}: expected square RGB uint8 images [N,H,W,3], got "
                              f"{images.dtype} {tuple(images.shape)}")
    if len(images) < 2:
        raise EvaluationError(f"images = {path!r}: found {len(images)} images (need at least 2)")
    return images, labels


def image_features(images: np.ndarray, net: FeatureNetwork, batch_size: int) -> np.ndarray:
    """uint8 images [N,H,W,3] -> features [N,D], batch by batch through ``batch_features`` (the path generated
    samples take)."""
    parts = [batch_features(torch.from_numpy(images[lo:lo + batch_size]).permute(0, 3, 1, 2).contiguous(), net)
             for lo in range(0, len(images), batch_size)]
    return np.concatenate(parts)


def evaluate_images(images: np.ndarray, net: FeatureNetwork, ref: ReferenceStats, batch_size: int, seed: int = 0,
                    kid: bool = False, resamples: int = 0, allow_few_samples: bool = False,
                    labels: np.ndarray | None = None) -> dict[str, Any]:
    """FID / FD (and KID) of uint8 images [N,H,W,3] (classes ``labels`` [N] when known: the bootstrap resamples
    within them) against ``ref``: the checks and numbers of ``evaluate_sampler``, for images made elsewhere."""
    check_measurement(net, ref, images.shape[1], len(images), allow_few_samples)
    start = time.perf_counter()
    numbers = score_features(image_features(images, net, batch_size), ref, kid, seed, resamples, labels)
    return dict(**numbers, total_seconds=time.perf_counter() - start)


def evaluate_mixture(sampler: CheckpointSampler, mix: GaussianMixture, num: int, seed: int, batch_size: int,
                     device: torch.device | str, dist: Dist | None = None) -> dict[str, Any] | None:
    """Exact scores (dmd2.method.mixture.mixture_scores: pixel FD to the true moments, mode coverage, samples on a mode)
    of samples 0..num-1 of a model trained on ``data=gaussian_mixture``, drawn as ``evaluate_sampler`` draws them
    (same seeds, same classes, same slices per rank; rank 0 scores). Returns None on the other ranks."""
    dist = dist or Dist()
    start = time.perf_counter()
    share = batch_shard(num, batch_size, dist)
    lo, hi = share.start, share.stop
    gen_start = time.perf_counter()
    parts = list(generate_uint8(sampler, hi - lo, seed, batch_size, device, lo))
    gen_seconds = time.perf_counter() - gen_start
    gathered = gather_to_main((parts, gen_seconds), dist)
    if gathered is None:
        return None
    images = torch.cat([x for p, _ in gathered for x, _ in p])
    labels = torch.cat([y for p, _ in gathered for _, y in p])
    scores = mixture_scores(mix, images, labels)
    gen_seconds = max(s for _, s in gathered)
    return dict(value=scores["fd"], scores=scores, images_per_sec=num / max(gen_seconds, 1e-9),
                generation_seconds=gen_seconds, total_seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------- from config


def feature_network_from_config(fn: Mapping[str, Any], device: torch.device) -> FeatureNetwork:
    """The ``feature_network`` config node (FeatureNetwork in dmd2/config/settings.py) -> its FeatureNetwork."""
    return build_feature_network(fn["name"], device, path=fn["path"], resize=fn["resize"],
                                 inception_weights=fn["inception_weights"], allow_download=fn["allow_download"])


def data_fingerprint(data: Mapping[str, Any]) -> str:
    """Hash of what a ``data`` config reads: its settings and, for files, their paths and bytes (a folder's
    images, an EDM .zip); a changed data set gets new statistics."""
    keys = ("name", "resolution", "num_classes", "synthetic_per_class", "mixture_components", "mixture_std",
            "mixture_seed")
    parts = {k: data.get(k) for k in keys}
    if data.get("name") in GENERATED_DATA:  # made from its settings; data.root is a placeholder
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    root = str(data.get("root"))
    parts["root"] = os.path.abspath(root)
    if os.path.isfile(root):
        parts["files"] = file_sha256(root)
    elif os.path.isdir(root) and data.get("name") != "cifar10":
        parts["files"] = folder_fingerprint(root, list_images(root))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def dataset_stats(data: Mapping[str, Any], net: FeatureNetwork, cache_dir: str, kid: bool = False,
                  batch_size: int = 128, num_workers: int = 0) -> ReferenceStats:
    """Statistics of the training data a ``data`` config reads (any kind: dmd2.data.datasets.build_dataset, images as the
    model sees them: resized and center-cropped to data.resolution, then uint8), computed once and cached in
    ``cache_dir`` as <data set>-<R>px-<hash>_<network>_<resize>.npz with their metadata."""
    label, res = dataset_label(data), int(data["resolution"])
    fingerprint = data_fingerprint(data)
    path = os.path.join(cache_dir, f"{label}-{res}px-{fingerprint[:12]}_{net.identity}_{net.resize}.npz")
    feats_path = path[: -len(".npz")] + "_feats.npz"
    if os.path.isfile(path) and (not kid or os.path.isfile(feats_path)):
        log.info(f"[evaluate] reusing cached reference statistics {path}")
        ref = npz_stats(path, net)
        if kid:
            with np.load(feats_path) as stored:
                ref.feats = stored["feats"]
        return ref
    ds = build_dataset(dict(data))
    log.info(f"[evaluate] computing reference statistics of the training data ({label}, {len(ds)} images of "
             f"{res}x{res}) with {net.metric} features (resize {net.resize}); cached in {path}")
    start = time.perf_counter()
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats = np.concatenate([batch_features(to_uint8(x), net) for x, _ in loader])
    mu, sigma = feature_statistics(feats)
    ref = ReferenceStats(mu, sigma, f"the training data {label} ({len(ds)} images)", path, len(ds), res,
                         feats if kid else None, dataset=label,
                         source=(f"data={data['name']}, generated from its settings" if data["name"] in GENERATED_DATA
                                 else f"data={data['name']} data.root={os.path.abspath(str(data['root']))}")
                         + f" (sha256 {fingerprint[:12]})", network=net.identity, resize=net.resize)
    os.makedirs(cache_dir, exist_ok=True)
    write_reference(path, ref, network_file=net.source, seconds=round(time.perf_counter() - start, 1))
    _save_npz(feats_path, feats=feats.astype(np.float32))
    return ref


def reference_from_config(ref: Mapping[str, Any], net: FeatureNetwork, kid: bool = False, batch_size: int = 128,
                          num_workers: int = 0, data: Mapping[str, Any] | None = None) -> ReferenceStats:
    """The ``reference`` config node (Reference in dmd2/config/settings.py) -> statistics: ``auto``, the training data
    ``data`` (clean-fid's precomputed statistics for 32x32 CIFAR-10 under Inception's clean resize, else computed
    once and cached in ``reference.cache_dir``), an image folder's (computed once, cached), a statistics file, or
    clean-fid's precomputed CIFAR-10 train statistics."""
    if ref["name"] == "npz":
        return npz_stats(ref["path"], net, ref.get("resolution"))
    if ref["name"] == "folder":
        return folder_stats(ref["folder"], net, ref["cache_dir"], kid=kid, batch_size=batch_size,
                            num_workers=num_workers)
    if ref["name"] == "auto":
        if not data:
            raise EvaluationError("reference.name=auto measures against the training data of the model, which is "
                                  "not known here (images from files, or a checkpoint without its training config): "
                                  "name a reference, e.g. reference.name=folder reference.folder=<images> or "
                                  "reference.name=npz reference.path=<statistics file>")
        if (data["name"] == "cifar10" and int(data["resolution"]) == CIFAR10_TRAIN["res"] and net.is_inception
                and net.resize == "clean"):
            return precomputed_cifar10_stats(net, ref["cache_dir"], kid=kid, allow_download=ref["allow_download"])
        return dataset_stats(data, net, ref["cache_dir"], kid=kid, batch_size=batch_size, num_workers=num_workers)
    return precomputed_cifar10_stats(net, ref["cache_dir"], kid=kid, allow_download=ref["allow_download"])
