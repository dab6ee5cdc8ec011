"""Reference statistics: what a measurement compares against, from any of four sources through one function
(``reference_statistics``): clean-fid's precomputed CIFAR-10 train statistics, a statistics file (.npz), an image
folder, or a model's training data. The last two are statistics of a set of images (``image_set_stats``),
computed once and cached under a fingerprint of the images and the feature network.

Every statistics file this project writes records what it was made from (data set, source, resolution, image
count, feature network, resize: ``ReferenceStats.meta``) next to EDM's ``mu`` and ``sigma``. Nothing is
downloaded unless asked to (``allow_download``): a missing precomputed statistics file fails at once with a
message saying which file is needed, where it comes from and where it goes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import cleanfid
import numpy as np
from cleanfid.features import get_reference_statistics

from dmd2.config.errors import EvaluationError
from dmd2.eval.features import FeatureNetwork, download_guard
from dmd2.eval.images import ImageSource, folder_source, training_data_source
from dmd2.eval.statistics import feature_statistics
from dmd2.io.files import atomic_write, read_npz_arrays

log = logging.getLogger(__name__)

# clean-fid's precomputed statistics: <base>/<name>_<mode>_<split>_<res>.npz (see cleanfid.features)
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"
CIFAR10_TRAIN = dict(name="cifar10", res=32, split="train", mode="clean")
CIFAR10_TRAIN_IMAGES = 50000


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


# --------------------------------------------------------------------------------------------- statistics files


def save_npz(path: str, **arrays: Any) -> None:
    """Write an .npz atomically (a temporary file, then rename)."""
    atomic_write(path, lambda f: np.savez(f, **arrays), suffix=".npz")


def write_reference(path: str, ref: ReferenceStats, **extra: Any) -> None:
    """Write reference statistics as EDM's tools read them (``mu`` [D], ``sigma`` [D,D], float64) with their
    metadata (``meta``: a JSON string of ``ReferenceStats.meta`` and ``extra``)."""
    meta = {**ref.meta(), **extra}
    save_npz(path, mu=np.asarray(ref.mu, np.float64), sigma=np.asarray(ref.sigma, np.float64),
             meta=np.array(json.dumps(meta)))


MAX_FEATURE_DIM = 8192  # features of a statistics file (Inception: 2048; sigma is D x D float64)
MAX_META_CHARS = 1 << 20


def _check_stats_array(name: str, shape: tuple[int, ...], dtype: Any) -> str | None:
    if name == "meta":
        return None if shape == () and dtype.kind == "U" and dtype.itemsize <= 4 * MAX_META_CHARS \
            else "expected one string of metadata"
    if dtype.kind not in "fiu":
        return f"expected numbers, got {dtype}"
    if len(shape) != (1 if name == "mu" else 2) or any(n > MAX_FEATURE_DIM for n in shape):
        return f"shape {list(shape)} (expected mu [D] and sigma [D,D], D at most {MAX_FEATURE_DIM})"
    return None


def read_stats_file(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
    """An .npz of statistics -> (mu [D], sigma [D,D], float64; its metadata, or None when it has none), checked:
    each array's header before it is read (dmd2.io.files.read_npz_arrays: D at most MAX_FEATURE_DIM), both arrays
    present, of matching shapes and finite, sigma symmetric positive semi-definite (a covariance: anything else
    would fail only after every sample was made)."""
    try:
        stats = read_npz_arrays(path, ("mu", "sigma", "meta"), _check_stats_array)
        if "mu" not in stats or "sigma" not in stats:
            raise EvaluationError(f"reference.path = {path!r}: expected arrays 'mu' and 'sigma', found "
                                  f"{sorted(stats)}")
        mu, sigma = np.asarray(stats["mu"], dtype=np.float64), np.asarray(stats["sigma"], dtype=np.float64)
        meta = json.loads(str(stats["meta"])) if "meta" in stats else None
    except EvaluationError:
        raise
    except Exception as err:
        raise EvaluationError(f"reference.path = {path!r}: not a readable .npz of statistics ({err})") from err
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvaluationError(f"reference.path = {path!r}: expected mu [D] and sigma [D,D], got {mu.shape} and "
                              f"{sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluationError(f"reference.path = {path!r}: mu or sigma holds NaN or inf")
    check_covariance(sigma, f"reference.path = {path!r}")
    return mu, sigma, meta


def check_covariance(sigma: np.ndarray, what: str) -> None:
    """EvaluationError unless ``sigma`` is symmetric and positive semi-definite (up to rounding)."""
    scale = float(np.abs(sigma).max()) or 1.0
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-6 * scale):
        raise EvaluationError(f"{what}: sigma is not symmetric (not a covariance matrix)")
    lowest = float(np.linalg.eigvalsh(sigma)[0])
    if lowest < -1e-6 * scale:
        raise EvaluationError(f"{what}: sigma has the negative eigenvalue {lowest:.3g} (not a covariance matrix: "
                              "positive semi-definite)")


def resolution_in_name(path: str) -> int | None:
    """The image side a statistics file's name states: 'cifar10-32x32.npz' -> 32, 'imagenet-64x64.npz' -> 64."""
    match = re.search(r"(\d+)x(\d+)", os.path.basename(path))
    return int(match.group(1)) if match and match.group(1) == match.group(2) else None


def npz_stats(path: str, net: FeatureNetwork, resolution: int | None = None) -> ReferenceStats:
    """Reference statistics from an .npz with ``mu`` [D] and ``sigma`` [D,D]: a file written by this project
    (with its ``meta``), or EDM's cifar10-32x32.npz and imagenet-64x64.npz (made by EDM's fid.py ref with
    TensorFlow-Inception features; no metadata: the resolution is ``resolution`` (reference.resolution) or read
    from the file name, and the log says which)."""
    mu, sigma, meta = read_stats_file(path)
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


# --------------------------------------------------------------------------------------------- clean-fid's CIFAR-10


def precomputed_stats_name(kid: bool = False, **spec: Any) -> str:
    """clean-fid's file name for precomputed statistics, e.g. 'cifar10_clean_train_32.npz' (+ '_kid' for KID)."""
    spec = {**CIFAR10_TRAIN, **spec}
    return f"{spec['name']}_{spec['mode']}_{spec['split']}_{spec['res']}{'_kid' if kid else ''}.npz".lower()


def precomputed_files(names: list[str], cache_dir: str, allow_download: bool) -> dict[str, str]:
    """clean-fid's precomputed statistics files ``names`` -> their paths: found in ``cache_dir`` or clean-fid's
    own stats folder, else downloaded there by clean-fid when ``allow_download``."""
    cleanfid_dir = os.path.join(os.path.dirname(cleanfid.__file__), "stats")
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
                get_reference_statistics(CIFAR10_TRAIN["name"], CIFAR10_TRAIN["res"], mode="clean", split="train",
                                         metric="KID" if name.endswith("_kid.npz") else "FID")
        except Exception as err:
            raise EvaluationError(f"download of {CLEANFID_STATS_URL}{name} failed ({err}); use custom statistics: "
                                  f"reference.name=folder reference.folder=<image folder>") from err
        found[name] = target
    return found


def precomputed_cifar10_stats(net: FeatureNetwork, cache_dir: str, kid: bool = False,
                              allow_download: bool = False) -> ReferenceStats:
    """clean-fid's precomputed CIFAR-10 train statistics (Inception, clean resize, 32x32). Looked up in
    ``cache_dir`` and in clean-fid's own stats folder; downloaded by clean-fid only when ``allow_download``."""
    if not net.is_inception or net.resize != "clean":
        raise EvaluationError("reference.name=cifar10_train: clean-fid's precomputed statistics are Inception "
                              "features ('clean' resize); with another feature network use reference.name=folder "
                              "reference.folder=<image folder>")
    names = [precomputed_stats_name()] + ([precomputed_stats_name(kid=True)] if kid else [])
    found = precomputed_files(names, cache_dir, allow_download)
    with np.load(found[names[0]]) as stats:
        mu, sigma = stats["mu"], stats["sigma"]
    feats = None
    if kid:
        with np.load(found[names[1]]) as stats:
            feats = stats["feats"]
    return ReferenceStats(mu, sigma, "cifar10 train (clean-fid precomputed)", found[names[0]], image_size=32,
                          num_images=CIFAR10_TRAIN_IMAGES, feats=feats, dataset="cifar10 train",
                          source=CLEANFID_STATS_URL + names[0], network=net.identity, resize="clean")


# --------------------------------------------------------------------------------------------- sets of images


def stats_cache_path(cache_dir: str, images: ImageSource, net: FeatureNetwork) -> str:
    """<cache_dir>/<images' name>-<fingerprint[:12]>_<network identity>_<resize>.npz: never shared between
    feature networks, resize modes or image contents."""
    return os.path.join(cache_dir, f"{images.name}-{images.fingerprint[:12]}_{net.identity}_{net.resize}.npz")


def cached_image_set_stats(path: str, images: ImageSource, net: FeatureNetwork, kid: bool) -> ReferenceStats:
    """The statistics ``image_set_stats`` cached in ``path`` (and the features [M,D] beside it when ``kid``)."""
    log.info(f"[evaluate] reusing cached reference statistics {path}")
    mu, sigma, meta = read_stats_file(path)
    meta = meta or {}
    if meta.get("network") != net.identity or meta.get("resize") != net.resize:
        raise EvaluationError(f"cached statistics {path} were made with {meta.get('network')}/"
                              f"{meta.get('resize')}, not {net.identity}/{net.resize}; delete the file")
    feats = None
    if kid:
        with np.load(path[: -len(".npz")] + "_feats.npz") as stored:
            feats = stored["feats"]
    return ReferenceStats(mu, sigma, f"{images.what} ({meta['num_images']} images)", path, meta["num_images"],
                          meta["image_size"], feats, dataset=meta.get("dataset"), source=meta.get("source"),
                          network=meta.get("network"), resize=meta.get("resize"))


def image_set_stats(images: ImageSource, net: FeatureNetwork, cache_dir: str, kid: bool = False,
                    batch_size: int = 128, num_workers: int = 0) -> ReferenceStats:
    """Statistics of a set of images (an image folder, a model's training data: ``ImageSource``) under ``net``,
    computed once and cached in ``cache_dir`` under the images' fingerprint and the network (the features [M,D]
    are cached too, in <name>_feats.npz, when KID needs them)."""
    path = stats_cache_path(cache_dir, images, net)
    feats_path = path[: -len(".npz")] + "_feats.npz"
    if os.path.isfile(path) and (not kid or os.path.isfile(feats_path)):
        return cached_image_set_stats(path, images, net, kid)
    log.info(f"[evaluate] computing reference statistics of {images.what} with {net.metric} features (resize "
             f"{net.resize}); cached in {path}")
    start = time.perf_counter()
    feats, image_size = images.featurize(net, batch_size, num_workers)
    mu, sigma = feature_statistics(feats)
    ref = ReferenceStats(mu, sigma, f"{images.what} ({len(feats)} images)", path, len(feats), image_size,
                         feats if kid else None, dataset=images.dataset, source=images.source,
                         network=net.identity, resize=net.resize)
    seconds = round(time.perf_counter() - start, 1)
    write_reference(path, ref, network_file=net.source, seconds=seconds)
    save_npz(feats_path, feats=feats.astype(np.float32))
    log.info(f"[evaluate] reference statistics of {len(feats)} images of {image_size}x{image_size} done in "
             f"{seconds} s")
    return ref


# --------------------------------------------------------------------------------------------- every source


def reference_statistics(name: str, net: FeatureNetwork, cache_dir: str, *, folder: str | None = None,
                         path: str | None = None, resolution: int | None = None,
                         data: Mapping[str, Any] | None = None, kid: bool = False, allow_download: bool = False,
                         batch_size: int = 128, num_workers: int = 0) -> ReferenceStats:
    """The reference statistics ``name`` names: "npz" (the file ``path``; ``resolution``: the side of its images
    when it does not record it), "folder" (the images in ``folder``, computed once and cached in ``cache_dir``),
    "auto" (the training data ``data``: clean-fid's precomputed statistics for 32x32 CIFAR-10 under Inception's
    clean resize, else computed once and cached) or "cifar10_train" (clean-fid's precomputed CIFAR-10 train
    statistics). ``kid``: with the reference features [M,D] that KID needs."""
    if name == "npz":
        return npz_stats(path, net, resolution)
    if name == "folder":
        return image_set_stats(folder_source(folder), net, cache_dir, kid, batch_size, num_workers)
    if name == "auto":
        if not data:
            raise EvaluationError("reference.name=auto measures against the training data of the model, which is "
                                  "not known here (images from files, or a checkpoint without its training config): "
                                  "name a reference, e.g. reference.name=folder reference.folder=<images> or "
                                  "reference.name=npz reference.path=<statistics file>")
        if not (data["name"] == "cifar10" and int(data["resolution"]) == CIFAR10_TRAIN["res"] and net.is_inception
                and net.resize == "clean"):
            return image_set_stats(training_data_source(data), net, cache_dir, kid, batch_size, num_workers)
    return precomputed_cifar10_stats(net, cache_dir, kid=kid, allow_download=allow_download)
