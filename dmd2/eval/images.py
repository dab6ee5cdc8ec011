"""Sets of images: the images to measure (a folder, a .zip, an .npz; read whole, with their classes when the files
say) and the sources of reference images (an image folder, a model's training data; known by a fingerprint of
what they hold before any image is read, featurized when their statistics are not cached yet)."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from cleanfid.fid import get_batch_features
from cleanfid.utils import EXTENSIONS, ResizeDataset
from torch.utils.data import DataLoader

from dmd2.config.errors import EvaluationError
from dmd2.config.names import dataset_label
from dmd2.config.settings import GENERATED_DATA
from dmd2.data.datasets import build_dataset
from dmd2.data.images import to_uint8
from dmd2.eval.features import FeatureNetwork, batch_features
from dmd2.io.files import file_sha256, inflation_limit, read_npz_arrays
from dmd2.runtime.progress import Progress

log = logging.getLogger(__name__)
GENERATE_GRID = "grid.png"  # generate.py's overview grid in its output folder
IMAGE_SUFFIXES = tuple("." + e for e in EXTENSIONS)
MAX_IMAGE_SIDE = 4096  # pixels: an image's header is checked against it before the image is decoded


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, clean-fid's extensions), sorted; each file once: a sub-folder
    reached again through a symlink (``ln -s . loop``) is not entered twice, nor a file counted twice."""
    files: dict[str, str] = {}  # real path -> the first path it was found by
    seen: set[str] = set()
    for top, subfolders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        for name in sorted(names):
            if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(path := os.path.join(top, name)):
                files.setdefault(os.path.realpath(path), path)
    return sorted(files.values())


def decode_image(source: Any, name: str) -> np.ndarray:
    """One image (a path or a file object) -> uint8 [H,W,3] (RGB); its size is read from the header and bounded
    (MAX_IMAGE_SIDE) before the pixels are decoded. EvaluationError naming ``name`` when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(source) as img:
            if max(img.size) > MAX_IMAGE_SIDE:
                raise EvaluationError(f"the image {name} is {img.size[0]}x{img.size[1]} pixels (at most "
                                      f"{MAX_IMAGE_SIDE} a side)")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's message names no file
        raise EvaluationError(f"cannot read the image {name}: {err}") from err


def read_image_file(path: str) -> np.ndarray:
    """One image file -> uint8 [H,W,3] (RGB)."""
    return decode_image(path, path)


def stack_images(arrays: list[np.ndarray], names: list[str], what: str) -> np.ndarray:
    """uint8 [N,H,W,3] of images of one size (EvaluationError naming two that differ)."""
    odd = [i for i, a in enumerate(arrays) if a.shape != arrays[0].shape]
    if odd:
        raise EvaluationError(f"images = {what!r}: images of different sizes, e.g. {names[0]} "
                              f"{arrays[0].shape[:2]} and {names[odd[0]]} {arrays[odd[0]].shape[:2]}")
    return np.stack(arrays) if arrays else np.zeros((0, 0, 0, 3), np.uint8)


class DecodedBudget:
    """The bytes a set of images stored in ``stored`` bytes may decode to (dmd2.io.files.inflation_limit)."""

    def __init__(self, what: str, stored: int) -> None:
        self.what, self.left = what, inflation_limit(stored)

    def spend(self, image: np.ndarray) -> np.ndarray:
        self.left -= image.nbytes
        if self.left < 0:
            raise EvaluationError(f"images = {self.what!r}: the images decode to more than "
                                  f"{inflation_limit(0) // 2**20} MiB or 100 times their stored size")
        return image


# --------------------------------------------------------------------------------------------- images to measure


def folder_labels(relpaths: list[str]) -> np.ndarray | None:
    """Class labels [N] of image files from their sub-folders (generate.py's <class>/<seed>.png; sorted folder
    names -> 0, 1, ...), or None when some image sits at the top level."""
    folders = [os.path.dirname(p) for p in relpaths]
    if not folders or not all(folders):
        return None
    names = sorted(set(folders))
    return np.array([names.index(d) for d in folders])


def _check_npz_images(name: str, shape: tuple[int, ...], dtype: Any) -> str | None:
    if name != "arr_0":
        return None if len(shape) == 1 and dtype.kind in "iu" else "expected class labels [N] (integers)"
    if dtype != np.uint8 or len(shape) != 4 or 3 not in (shape[1], shape[-1]):
        return f"expected uint8 [N,H,W,3] or [N,3,H,W], got {dtype} {list(shape)}"
    if max(shape[1:]) > MAX_IMAGE_SIDE:
        return f"images of {list(shape[1:])} (at most {MAX_IMAGE_SIDE} pixels a side)"
    return None


def npz_images(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """An .npz whose ``arr_0`` is uint8 [N,H,W,3] or [N,3,H,W] -> (images [N,H,W,3], its ``arr_1`` [N] or None).
    Each array's header is checked before it is read (dmd2.io.files.read_npz_arrays)."""
    try:
        arrays = read_npz_arrays(path, ("arr_0", "arr_1"), _check_npz_images)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise EvaluationError(f"images = {path!r}: not a readable .npz of images ({err})") from None
    if "arr_0" not in arrays:
        raise EvaluationError(f"images = {path!r}: expected the array 'arr_0' (uint8 [N,H,W,3])")
    images = arrays["arr_0"]
    labels = arrays["arr_1"] if "arr_1" in arrays and arrays["arr_1"].shape == (len(images),) else None
    if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)  # [N,3,H,W] -> [N,H,W,3]
    return images, labels


def is_image_member(name: str) -> bool:
    """Whether a zip member is an image to measure: an image file's name, not generate.py's grid, not macOS's
    resource forks (``__MACOSX/``, ``._x.png``)."""
    return name.lower().endswith(IMAGE_SUFFIXES) and name != GENERATE_GRID and not name.startswith("__MACOSX/") \
        and not os.path.basename(name).startswith("._")


def zip_images(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A .zip of image files (sorted by name, generate.py's grid and macOS's resource forks left out) -> (uint8
    [N,H,W,3], labels [N] from their folders, or None). Each member is read through a bounded stream and its size
    checked before it is decoded; all of them together decode to at most dmd2.io.files.inflation_limit of the
    zip's size; a name found twice is refused (which one would count?)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if is_image_member(i.filename)]
            names = [i.filename for i in members]
            twice = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) < len(names) else []
            if twice:
                raise EvaluationError(f"images = {path!r}: the member {twice[0]} is in the zip twice "
                                      f"({len(twice)} names are)")
            members.sort(key=lambda i: i.filename)
            budget = DecodedBudget(path, os.path.getsize(path))
            arrays = []
            for info in members:
                with zf.open(info) as f:
                    arrays.append(budget.spend(decode_image(f, f"{path}/{info.filename}")))
    except (OSError, zipfile.BadZipFile) as err:
        raise EvaluationError(f"images = {path!r}: not a readable .zip of images ({err})") from None
    names = [i.filename for i in members]
    return stack_images(arrays, names, path), folder_labels(names)


def folder_images(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A folder of image files, read recursively in sorted order, each file once (list_images; generate.py's
    overview grid <folder>/grid.png is not a sample) -> (uint8 [N,H,W,3], labels [N] from their sub-folders, or
    None)."""
    files = [f for f in list_images(path) if os.path.relpath(f, path) != GENERATE_GRID]
    budget = DecodedBudget(path, sum(os.path.getsize(f) for f in files))
    arrays = [budget.spend(read_image_file(f)) for f in files]
    images = stack_images(arrays, files, path)
    return images, folder_labels([os.path.relpath(f, path) for f in files])


def load_image_set(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images to measure -> (uint8 [N,H,W,3], class labels [N] or None when the files do not say), from the
    layouts of generate.py, ADM and EDM:

    - an .npz whose ``arr_0`` is uint8 [N,H,W,3] (generate.py format=npz, ADM's sample batches) or [N,3,H,W];
      labels: its ``arr_1`` [N] when present (generate.py writes them);
    - a .zip or a folder of image files (EDM's generate.py output and dataset format, generate.py's PNGs), read
      recursively in sorted order; labels: the sub-folder of each image (generate.py's <class>/<seed>.png), when
      every image sits in one."""
    if os.path.isfile(path) and path.endswith(".npz"):
        images, labels = npz_images(path)
    elif os.path.isfile(path) and path.endswith(".zip"):
        images, labels = zip_images(path)
    elif os.path.isdir(path):
        images, labels = folder_images(path)
    else:
        raise EvaluationError(f"images = {path!r}: expected an image folder, a .zip of images or an .npz with "
                              f"arr_0 [N,H,W,3]")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise EvaluationError(f"images = {path!r}: expected square RGB uint8 images [N,H,W,3], got "
                              f"{images.dtype} {tuple(images.shape)}")
    if len(images) < 2:
        raise EvaluationError(f"images = {path!r}: found {len(images)} images (need at least 2)")
    return images, labels


# --------------------------------------------------------------------------------------------- reference images

# (net, batch_size, num_workers) -> (features [N,D], side of the images)
Featurize = Callable[[FeatureNetwork, int, int], tuple[np.ndarray, int]]


@dataclass(frozen=True)
class ImageSource:
    """A set of reference images, known by a fingerprint of what it holds before any image is read."""

    name: str             # first part of its statistics' file name: the folder's name, or "<data set>-<R>px"
    fingerprint: str      # sha256 of its files' paths and bytes, or of the settings its images are generated from
    what: str             # for descriptions and logs: the folder's path, or "the training data <data set>"
    dataset: str          # ReferenceStats.dataset
    source: str           # ReferenceStats.source: where the images come from, with the fingerprint
    featurize: Featurize  # reads the images and runs them through a feature network


def folder_fingerprint(folder: str, files: list[str]) -> str:
    """Hash of every file's relative path and bytes (read in 1 MiB blocks): a folder whose images changed gets new
    statistics, whatever their sizes and modification times (about 2 s per 50,000 CIFAR-size images)."""
    digest = hashlib.sha256()
    with Progress(len(files), f"[reference] hashing {folder}:", "files") as shown:
        for f in files:
            digest.update(f"{os.path.relpath(f, folder)}\t{file_sha256(f)}\n".encode())
            shown.update(1)
    return digest.hexdigest()


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


def _no_resize(image: np.ndarray) -> np.ndarray:
    return image  # uint8 [H,W,3]; clean-fid's loader turns it into float [3,H,W] in [0,255]


def folder_source(folder: str) -> ImageSource:
    """The images in ``folder`` (recursive), featurized with clean-fid's folder loader."""
    files = list_images(folder)
    if len(files) < 2:
        raise EvaluationError(f"reference.folder = {folder!r}: found {len(files)} images (need at least 2; "
                              f"extensions {sorted(EXTENSIONS)})")
    fingerprint = folder_fingerprint(folder, files)
    label = os.path.basename(os.path.normpath(folder))

    def featurize(net: FeatureNetwork, batch_size: int, num_workers: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        with Image.open(files[0]) as first:
            image_size = int(first.size[0])
        # clean-fid's reading and resizing of image files (get_files_features' loader), with this project's progress
        dataset = ResizeDataset(files, mode="clean")
        if net.resize != "clean":
            dataset.fn_resize = _no_resize
        parts = []
        with Progress(len(files), f"[reference] {label}: features of", "images") as shown:
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
                parts.append(get_batch_features(batch, net.model, net.device))
                shown.update(len(batch))
        return np.concatenate(parts), image_size

    return ImageSource(re.sub(r"[^A-Za-z0-9_.-]", "_", label) or "folder", fingerprint, os.path.abspath(folder),
                       os.path.basename(os.path.normpath(os.path.abspath(folder))),
                       f"{os.path.abspath(folder)} (files sha256 {fingerprint[:12]})", featurize)


def files_at_resolution(files: list[str], resolution: int) -> bool:
    """Whether every image file is ``resolution`` x ``resolution`` pixels (read from the files' headers)."""
    from PIL import Image

    with Progress(len(files), "[reference] checking image sizes:", "files") as shown:
        for f in files:
            with Image.open(f) as image:
                if image.size != (resolution, resolution):
                    return False
            shown.update(1)
    return True


def training_data_source(data: Mapping[str, Any]) -> ImageSource:
    """The images a ``data`` config reads (any kind: dmd2.data.datasets.build_dataset), as the model sees them:
    resized and center-cropped to data.resolution, then uint8. An image folder whose files all have that size
    already is the folder itself (``folder_source``): its statistics are one cache file, whether
    reference.name=auto (train.py, evaluate.py on its checkpoints) or reference.name=folder asked for them."""
    label, res = dataset_label(data), int(data["resolution"])
    root = str(data.get("root"))
    if data["name"] == "image_folder" and os.path.isdir(root):
        files = list_images(root)
        if len(files) >= 2 and len(files) == len(build_dataset(dict(data))) and files_at_resolution(files, res):
            log.info(f"[reference] the training data's {len(files)} images are {res}x{res} files as they are: "
                     f"its statistics are those of reference.name=folder reference.folder={root}")
            return folder_source(root)
    fingerprint = data_fingerprint(data)
    origin = (f"data={data['name']}, generated from its settings" if data["name"] in GENERATED_DATA
              else f"data={data['name']} data.root={os.path.abspath(str(data['root']))}")

    def featurize(net: FeatureNetwork, batch_size: int, num_workers: int) -> tuple[np.ndarray, int]:
        dataset = build_dataset(dict(data))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        parts = []
        with Progress(len(dataset), f"[reference] {label}: features of", "images") as shown:
            for x, _ in loader:
                parts.append(batch_features(to_uint8(x), net))
                shown.update(len(x))
        return np.concatenate(parts), res

    return ImageSource(f"{label}-{res}px", fingerprint, f"the training data {label}", label,
                       f"{origin} (sha256 {fingerprint[:12]})", featurize)
