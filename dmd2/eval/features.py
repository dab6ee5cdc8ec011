"""Feature networks: clean-fid's Inception, a TorchScript file or plain weights with the module that builds them;
how images reach them, and batch features.

Images are featurized exactly as clean-fid featurizes an image folder: uint8 image -> clean-fid's resize -> float
[0, 255] -> feature network, so a checkpoint's samples, images read from files and reference images go one way.

"FID" is reserved for clean-fid's Inception network, in one of two protocols (``FeatureNetwork.resize``):
"clean" (clean-fid's PIL-bicubic 299x299 resize; comparable with clean-fid's published numbers) or
"legacy_tensorflow" (the network resizes inside, as the original TensorFlow code did; this is how EDM and DMD2
measure). Any other feature network (a TorchScript file, or a weights file plus the Python callable that builds
its module: ``feature_network.name=module``) gives an "FD (<network name>)", never called FID.

Nothing is downloaded unless asked to (``allow_download``): a missing Inception weights file fails at once with a
message saying which file is needed, where it comes from and where it goes.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import platform
import socket
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.fid import get_batch_features
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from torch import Tensor

from dmd2.config.errors import EvaluationError
from dmd2.config.names import metric_key, network_stem
from dmd2.config.settings import FEATURE_NETWORKS
from dmd2.io.files import file_sha256

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = inception_url  # where clean-fid downloads the Inception weights from
DOWNLOAD_TIMEOUT_S = 60.0  # socket timeout for any download we allow: a dead connection fails, never hangs


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
    classifier: Callable[[Tensor], Tensor] | None = None  # features [B,D] -> class logits [B,C] (optional)

    @property
    def is_inception(self) -> bool:
        return self.identity == "inception_v3"

    @property
    def input_size(self) -> int | None:
        """Side of the images the model takes (299 after the clean resize), or None: the images' own."""
        return 299 if self.resize == "clean" else None


@contextlib.contextmanager
def quiet_jit_load() -> Iterator[None]:
    """torch.jit.load warns that TorchScript is deprecated; clean-fid's Inception and feature files are TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


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


# --------------------------------------------------------------------------------------------- building them


def default_inception_path() -> str:
    """Where clean-fid keeps its Inception weights: /tmp/inception-2015-12-05.pt (./ on Windows)."""
    return os.path.join("./" if platform.system() == "Windows" else "/tmp", INCEPTION_FILE)


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


def inception_weights_file(weights: str | None, allow_download: bool) -> str:
    """The Inception weights file to load: ``weights`` or clean-fid's default place, downloaded there by clean-fid
    when missing and ``allow_download``; a missing file otherwise fails with what to do."""
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
    return path


def build_inception(weights: str | None, device: torch.device, allow_download: bool = False,
                    resize: str = "clean") -> FeatureNetwork:
    """clean-fid's Inception, as its ``build_feature_extractor(mode=resize, use_dataparallel=False)`` builds it but
    loaded from ``weights`` instead of a fixed /tmp: "clean" takes [B,3,299,299]; "legacy_tensorflow" takes images
    at their own size and resizes them inside the network (TensorFlow's bilinear resize) -> [B,2048]."""
    if resize not in ("clean", "legacy_tensorflow"):
        raise EvaluationError(f"feature_network.resize = {resize!r}: Inception takes 'clean' or 'legacy_tensorflow'")
    path = inception_weights_file(weights, allow_download)
    try:
        with quiet_jit_load():
            model = InceptionV3W(os.path.dirname(path), download=False,
                                 resize_inside=resize == "legacy_tensorflow").to(device).eval()
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


def import_callable(spec: str) -> Callable[[], torch.nn.Module]:
    """'package.module:name' -> that object (a class or a function building the network)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise EvaluationError(f"feature_network.module = {spec!r}: expected package.module:callable")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise EvaluationError(f"feature_network.module = {spec!r}: cannot import it ({err})") from err
    if not callable(obj):
        raise EvaluationError(f"feature_network.module = {spec!r}: not callable")
    return obj  # type: ignore[return-value]


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """A state dict from ``path``: a .safetensors file, or a torch.save'd dict of tensors (read with
    weights_only=True: no code runs while loading)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise EvaluationError(f"feature_network.path = {path!r}: expected a state dict, got {type(state).__name__}")
    return state


def build_module_network(path: str, module: str, device: torch.device, resize: str) -> FeatureNetwork:
    """A feature network from plain weights (``path``: a state dict) and the callable ``module``
    ('package.module:name') that builds the nn.Module they fit: float [B,3,H,W] in [0,255] -> [B,D]; H = W = 299
    when resize='clean'. Its identity holds the weights' and the builder's hash: other code or other weights never
    reuse cached statistics."""
    if resize not in ("clean", "none"):
        raise EvaluationError(f"feature_network.resize = {resize!r}: a module network takes 'clean' or 'none'")
    net = import_callable(module)()
    if not isinstance(net, torch.nn.Module):
        raise EvaluationError(f"feature_network.module = {module!r} returned {type(net).__name__}, not an nn.Module")
    try:
        net.load_state_dict(load_state_dict_file(path))
    except EvaluationError:
        raise
    except Exception as err:
        raise EvaluationError(f"feature_network.path = {path!r}: cannot load these weights into {module} "
                              f"({err})") from err
    net = net.to(device).eval().requires_grad_(False)
    stem = network_stem(path)
    key = metric_key("module", resize, path)
    digest = hashlib.sha256(f"{file_sha256(path)}:{module}".encode()).hexdigest()
    return FeatureNetwork(f"mod-{key[len('eval/fd_'):]}-{digest[:12]}", f"FD ({stem})", key, resize, net, device,
                          os.path.abspath(path))


def build_feature_network(name: str, device: torch.device, *, path: str | None = None, resize: str = "clean",
                          inception_weights: str | None = None, allow_download: bool = False,
                          module: str | None = None, classifier: str | None = None) -> FeatureNetwork:
    """The feature network ``name`` ("inception", "torchscript" or "module": the weights ``path`` loaded into
    what ``module`` builds), with its ``classifier`` (the dotted name of a submodule mapping its features to class
    logits, e.g. 'net.head'); fails within seconds when its file is missing (nothing is downloaded unless
    ``allow_download``)."""
    net = _build_feature_network(name, device, path=path, resize=resize, inception_weights=inception_weights,
                                 allow_download=allow_download, module=module)
    if classifier:
        net.classifier = submodule(net.model, classifier)
    return net


def submodule(model: object, dotted: str) -> Callable[[Tensor], Tensor]:
    """``model``'s attribute ``dotted`` ('net.head'), which must be callable (features -> logits)."""
    obj = model
    try:
        for part in dotted.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        raise EvaluationError(f"feature_network.classifier = {dotted!r}: the feature network has no such "
                              f"submodule ({err})") from None
    if not callable(obj):
        raise EvaluationError(f"feature_network.classifier = {dotted!r}: not callable")
    return obj  # type: ignore[return-value]


def _build_feature_network(name: str, device: torch.device, *, path: str | None, resize: str,
                           inception_weights: str | None, allow_download: bool, module: str | None
                           ) -> FeatureNetwork:
    if name == "inception":
        return build_inception(inception_weights, device, allow_download, resize)
    if name == "module":
        if not path or not os.path.isfile(path):
            raise EvaluationError(f"feature_network.path = {path!r}: file not found (the weights of a module "
                                  f"feature network)")
        if not module:
            raise EvaluationError("feature_network.name=module needs feature_network.module=package.module:callable")
        return build_module_network(path, module, device, resize)
    if name == "torchscript":
        if not path or not os.path.isfile(path):
            raise EvaluationError(f"feature_network.path = {path!r}: file not found (a TorchScript feature network)")
        return build_torchscript(path, device, resize)
    raise EvaluationError(f"feature_network.name = {name!r}: expected one of {FEATURE_NETWORKS}")


# --------------------------------------------------------------------------------------------- batch features


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


def image_features(images: np.ndarray, net: FeatureNetwork, batch_size: int) -> np.ndarray:
    """uint8 images [N,H,W,3] -> features [N,D], batch by batch through ``batch_features`` (the path generated
    samples take)."""
    parts = [batch_features(torch.from_numpy(images[lo:lo + batch_size]).permute(0, 3, 1, 2).contiguous(), net)
             for lo in range(0, len(images), batch_size)]
    return np.concatenate(parts)


def classify(feats: np.ndarray, net: FeatureNetwork, batch_size: int = 1024) -> tuple[np.ndarray, int] | None:
    """The classes [N] the feature network's classifier predicts from features [N,D] (argmax of its logits
    [N,C]) and C; None without a classifier."""
    if net.classifier is None:
        return None
    out, width = [], 0
    with torch.no_grad():
        for lo in range(0, len(feats), batch_size):
            logits = net.classifier(torch.from_numpy(np.ascontiguousarray(feats[lo:lo + batch_size])).to(net.device))
            if logits.ndim != 2:
                raise EvaluationError(f"the classifier of {net.source} returned shape {tuple(logits.shape)}; "
                                      "expected logits [B, C]")
            out.append(logits.argmax(1).cpu().numpy())
            width = logits.shape[1]
    return (np.concatenate(out) if out else np.zeros(0, np.int64)), width


def feature_dim(net: FeatureNetwork, resolution: int) -> int:
    """Run two blank images of side ``resolution`` through the network (a quick check before generating) -> D."""
    return batch_features(torch.zeros(2, 3, resolution, resolution, dtype=torch.uint8), net).shape[1]
