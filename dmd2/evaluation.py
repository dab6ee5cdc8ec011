"""FID / Frechet distances with clean-fid: feature networks, reference statistics, streamed sample features.

Protocol: ``num`` samples from a checkpoint (dmd2.sampling: per-sample seeded noise, round-robin classes), uint8
images in [0, 255], featurized batch by batch exactly as clean-fid featurizes an image folder (uint8 image ->
clean-fid's resize -> float [0, 255] -> feature network), so only the features [N, D] are ever held.
The distance is clean-fid's ``frechet_distance`` between the Gaussians (mean, covariance) of the two feature sets.

"FID" is reserved for clean-fid's Inception network, in one of two protocols (``feature_network.resize``):
"clean" (clean-fid's PIL-bicubic 299x299 resize; comparable with clean-fid's published numbers) or
"legacy_tensorflow" (the network resizes inside, as the original TensorFlow code did; this is how EDM and DMD2
measure, against reference statistics such as EDM's cifar10-32x32.npz). Any other (TorchScript) feature network
gives an "FD (<network name>)", never called FID.

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

import numpy as np
import torch
from torch import Tensor

import cleanfid
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.features import get_reference_statistics
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance
from cleanfid.fid import get_batch_features, get_files_features, kernel_distance
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from cleanfid.utils import EXTENSIONS

from dmd2.settings import FEATURE_NETWORKS
from dmd2.distributed import Dist, gather_objects
from dmd2.files import atomic_write, file_sha256
from dmd2.mixture import GaussianMixture, mixture_scores
from dmd2.sampling import CheckpointSampler, generate_uint8

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = inception_url  # where clean-fid downloads the Inception weights from
# clean-fid's precomputed statistics: <base>/<name>_<mode>_<split>_<res>.npz (see cleanfid.features)
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"
CIFAR10_TRAIN = dict(name="cifar10", res=32, split="train", mode="clean")
DOWNLOAD_TIMEOUT_S = 60.0  # socket timeout for any download we allow: a dead connection fails, never hangs


@contextlib.contextmanager
def quiet_jit_load() -> Iterator[None]:
    """torch.jit.load warns that TorchScript is deprecated; clean-fid's Inception and feature files are TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


class EvaluationError(RuntimeError):
    """A file the evaluation needs is missing or unusable (weights, statistics, feature network)."""


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
    if resize == "clean":
        return FeatureNetwork("inception_v3", "FID", "eval/fid", resize, model, device, path)
    return FeatureNetwork("inception_v3", "FID (TF-Inception protocol)", "eval/fid_tf", resize, model, device, path)


def network_stem(path: str) -> str:
    """File name without its model suffixes: 'nets/cifar10-featnet-dev.ts.pt' -> 'cifar10-featnet-dev'."""
    name = os.path.basename(path)
    while True:
        stem, ext = os.path.splitext(name)
        if ext.lower() not in (".pt", ".pth", ".ts", ".jit", ".torchscript") or not stem:
            return name
        name = stem


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
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)
    identity = f"ts-{key}-{file_sha256(path)[:12]}"  # content hash: a retrained network never reuses old stats
    return FeatureNetwork(identity, f"FD ({stem})", f"eval/fd_{key}", resize, module, device, os.path.abspath(path))


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


@dataclass
class ReferenceStats:
    """Statistics of the reference images: mean [D], covariance [D,D], features [M,D] (only when KID needs them)."""

    mu: np.ndarray
    sigma: np.ndarray
    description: str                 # e.g. "cifar10 train (clean-fid precomputed)" or the folder
    path: str                        # the statistics file
    num_images: int | None = None    # unknown for clean-fid's precomputed files
    image_size: int | None = None    # side of the reference images (folders)
    feats: np.ndarray | None = field(default=None, repr=False)


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
                          num_images=None if feats is None else int(feats.shape[0]), feats=feats)


def npz_stats(path: str, net: FeatureNetwork) -> ReferenceStats:
    """Reference statistics from an .npz with ``mu`` [D] and ``sigma`` [D,D] (EDM's cifar10-32x32.npz and
    imagenet-64x64.npz, made by EDM's fid.py ref with TensorFlow-Inception features)."""
    try:
        with np.load(path) as stats:
            if "mu" not in stats.files or "sigma" not in stats.files:
                raise EvaluationError(f"reference.path = {path!r}: expected arrays 'mu' and 'sigma', found "
                                      f"{sorted(stats.files)}")
            mu, sigma = np.asarray(stats["mu"], dtype=np.float64), np.asarray(stats["sigma"], dtype=np.float64)
    except EvaluationError:
        raise
    except Exception as err:
        raise EvaluationError(f"reference.path = {path!r}: not a readable .npz of statistics ({err})") from err
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvaluationError(f"reference.path = {path!r}: expected mu [D] and sigma [D,D], got {mu.shape} and "
                              f"{sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluationError(f"reference.path = {path!r}: mu or sigma holds NaN or inf")
    if net.is_inception and net.resize != "legacy_tensorflow":
        log.info(f"[evaluate] note: {os.path.basename(path)} is compared under clean-fid's 'clean' protocol; EDM's "
                 f"reference files hold TF-Inception statistics (feature_network.resize=legacy_tensorflow)")
    return ReferenceStats(mu, sigma, f"{os.path.abspath(path)} (statistics file)", path)


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, clean-fid's extensions), sorted."""
    root = os.path.join(glob.escape(folder), "**")
    files = {f for ext in EXTENSIONS for f in glob.glob(os.path.join(root, "*." + ext), recursive=True)}
    return sorted(files)


def folder_fingerprint(folder: str, files: list[str]) -> str:
    """Hash of every file's relative path, size and mtime: a changed folder gets new statistics."""
    digest = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        digest.update(f"{os.path.relpath(f, folder)}\t{st.st_size}\t{int(st.st_mtime)}\n".encode())
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


def folder_stats(folder: str, net: FeatureNetwork, cache_dir: str, kid: bool = False, batch_size: int = 128,
                 num_workers: int = 0) -> ReferenceStats:
    """Statistics of the images in ``folder`` under ``net``, computed once with clean-fid's folder loader and
    cached in ``cache_dir`` (the features [M,D] are cached too, in <name>_feats.npz, when KID needs them)."""
    files = list_images(folder)
    if len(files) < 2:
        raise EvaluationError(f"reference.folder = {folder!r}: found {len(files)} images (need at least 2; "
                              f"extensions {sorted(EXTENSIONS)})")
    path = stats_cache_path(cache_dir, folder, folder_fingerprint(folder, files), net)
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
        return ReferenceStats(mu, sigma, description, path, meta["num_images"], meta["image_size"], feats)

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
    meta = dict(folder=os.path.abspath(folder), num_images=len(files), image_size=image_size, network=net.identity,
                network_file=net.source, resize=net.resize, seconds=round(time.perf_counter() - start, 1))
    _save_npz(path, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
    _save_npz(feats_path, feats=feats.astype(np.float32))
    log.info(f"[evaluate] reference statistics done in {meta['seconds']} s")
    return ReferenceStats(mu, sigma, description, path, len(files), image_size, feats if kid else None)


# --------------------------------------------------------------------------------------------- generated samples


def sampler_features(sampler: CheckpointSampler, net: FeatureNetwork, num: int, seed: int, batch_size: int,
                     device: torch.device | str, dim: int, progress: bool = True, start: int = 0
                     ) -> tuple[np.ndarray, float]:
    """Features [num, dim] of samples start..start+num-1 of ``sampler`` (dmd2.sampling.generate_uint8: seeded
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


def evaluate_sampler(sampler: CheckpointSampler, net: FeatureNetwork, ref: ReferenceStats | None, num: int,
                     seed: int, batch_size: int, device: torch.device | str, kid: bool = False,
                     dist: Dist | None = None, progress: bool = True) -> dict[str, Any] | None:
    """FID / FD (and KID) of samples 0..num-1 of ``sampler`` against ``ref``; the numbers of one result row.

    Under torchrun (``dist`` with several processes) every rank must call it: rank r generates and featurizes
    the contiguous slice [num*r/W, num*(r+1)/W) of the samples, rank 0 gathers the features in order and
    computes the distance (only rank 0 needs ``ref``), so the value is the same for any number of processes.
    Returns None on the other ranks."""
    dist = dist or Dist()
    if ref is not None and net.resize == "none" and ref.image_size is not None and ref.image_size != sampler.resolution:
        raise EvaluationError(f"feature_network.resize=none compares images at their native size, but the samples "
                              f"are {sampler.resolution}x{sampler.resolution} and the reference images "
                              f"{ref.image_size} wide")
    dim = feature_dim(net, net.input_size or sampler.resolution)
    if ref is not None and dim != ref.mu.shape[0]:
        raise EvaluationError(f"the feature network gives {dim}-d features, the reference statistics {ref.path} "
                              f"are {ref.mu.shape[0]}-d")
    start = time.perf_counter()
    lo, hi = num * dist.rank // dist.world_size, num * (dist.rank + 1) // dist.world_size
    feats, gen_seconds = sampler_features(sampler, net, hi - lo, seed, batch_size, device, dim,
                                          progress and dist.is_main, start=lo)
    parts = gather_objects((feats, gen_seconds), dist)
    if not dist.is_main:
        return None
    assert ref is not None, "rank 0 needs the reference statistics"
    feats, gen_seconds = np.concatenate([f for f, _ in parts]), max(s for _, s in parts)
    value = frechet_distance(*feature_statistics(feats), ref.mu, ref.sigma)
    kid_value = kernel_inception_distance(feats, ref.feats, seed) if kid and ref.feats is not None else None
    total = time.perf_counter() - start
    return dict(value=value, kid=kid_value, images_per_sec=num / max(gen_seconds, 1e-9),
                generation_seconds=gen_seconds, total_seconds=total)


def evaluate_mixture(sampler: CheckpointSampler, mix: GaussianMixture, num: int, seed: int, batch_size: int,
                     device: torch.device | str, dist: Dist | None = None) -> dict[str, Any] | None:
    """Exact scores (dmd2.mixture.mixture_scores: pixel FD to the true moments, mode coverage, samples on a mode)
    of samples 0..num-1 of a model trained on ``data=gaussian_mixture``, drawn as ``evaluate_sampler`` draws them
    (same seeds, same classes, same slices per rank; rank 0 scores). Returns None on the other ranks."""
    dist = dist or Dist()
    start = time.perf_counter()
    lo, hi = num * dist.rank // dist.world_size, num * (dist.rank + 1) // dist.world_size
    gen_start = time.perf_counter()
    parts = list(generate_uint8(sampler, hi - lo, seed, batch_size, device, lo))
    gen_seconds = time.perf_counter() - gen_start
    gathered = gather_objects((parts, gen_seconds), dist)
    if not dist.is_main:
        return None
    images = torch.cat([x for p, _ in gathered for x, _ in p])
    labels = torch.cat([y for p, _ in gathered for _, y in p])
    scores = mixture_scores(mix, images, labels)
    gen_seconds = max(s for _, s in gathered)
    return dict(value=scores["fd"], scores=scores, images_per_sec=num / max(gen_seconds, 1e-9),
                generation_seconds=gen_seconds, total_seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------- from config


def feature_network_from_config(fn: Mapping[str, Any], device: torch.device) -> FeatureNetwork:
    """The ``feature_network`` config node (FeatureNetwork in dmd2/settings.py) -> its FeatureNetwork."""
    return build_feature_network(fn["name"], device, path=fn["path"], resize=fn["resize"],
                                 inception_weights=fn["inception_weights"], allow_download=fn["allow_download"])


def reference_from_config(ref: Mapping[str, Any], net: FeatureNetwork, kid: bool = False, batch_size: int = 128,
                          num_workers: int = 0) -> ReferenceStats:
    """The ``reference`` config node (Reference in dmd2/settings.py) -> statistics: an image folder's (computed once,
    cached in ``reference.cache_dir``), a statistics file, or clean-fid's precomputed CIFAR-10 train statistics."""
    if ref["name"] == "npz":
        return npz_stats(ref["path"], net)
    if ref["name"] == "folder":
        return folder_stats(ref["folder"], net, ref["cache_dir"], kid=kid, batch_size=batch_size,
                            num_workers=num_workers)
    return precomputed_cifar10_stats(net, ref["cache_dir"], kid=kid, allow_download=ref["allow_download"])
