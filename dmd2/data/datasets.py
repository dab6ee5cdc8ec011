"""Datasets: CIFAR-10 through torchvision, any class-folder tree through ImageFolder, EDM's dataset format, or
a small generated one (``synthetic``: coloured squares, for smoke runs on a machine with no data), or a
known-answer mixture of Gaussians (``gaussian_mixture``, dmd2/method/mixture.py).

Images come out as float tensors [3, R, R] in [-1, 1] with integer class labels. The batch order is a
function of (seed, epoch) only, and random flips are drawn in the training process (``random_hflip``), so a
run resumed at step s sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from typing import Any, Callable, Mapping

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from dmd2.config.errors import ConfigError, FileError
from dmd2.config.settings import DATA_KINDS, DataSettings
from dmd2.data.images import from_uint8
from dmd2.data.mixture import MixtureDataset, mixture_from_config
from dmd2.method.randomness import derived_seed, torch_generator


log = logging.getLogger(__name__)


class SkipsUnreadable:
    """A data set of image files whose unreadable images (FileError from decode_rgb) are skipped, each named in a
    warning, the next image taking its place, while at most ``max_unreadable`` of them (a fraction of the data
    set, ``data.max_unreadable``) were met by this process; one more raises the FileError."""

    max_unreadable: float = DataSettings.max_unreadable
    unreadable: set[int]

    def read_item(self, i: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        n = len(self)  # type: ignore[arg-type]
        if not hasattr(self, "unreadable"):
            self.unreadable = set()
        for j in range(i, i + n):
            try:
                return self.read_item(j % n)
            except FileError as err:
                self.unreadable.add(j % n)
                allowed = int(self.max_unreadable * n)
                if len(self.unreadable) > allowed:
                    raise FileError(f"{err} ({len(self.unreadable)} unreadable images, more than data.max_unreadable "
                                    f"= {self.max_unreadable:g} of {n} allows)") from err
                log.warning(f"[data] skipped: {err} ({len(self.unreadable)} of at most {allowed} skipped)")
        raise FileError("data.root: no image could be read")


class ImageFolderSkipping(SkipsUnreadable, datasets.ImageFolder):
    """torchvision's ImageFolder with unreadable images skipped (SkipsUnreadable)."""

    def read_item(self, i: int) -> tuple[Tensor, int]:
        return datasets.ImageFolder.__getitem__(self, i)


def image_transform(resolution: int) -> transforms.Compose:
    return transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution),
                               transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])


def decode_rgb(data: bytes | str, name: str) -> Image.Image:
    """An image file (its bytes, or its path) decoded to RGB; a file PIL cannot decode (truncated, corrupted, not an
    image) raises FileError naming it (``name``), not PIL's message alone."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise FileError(f"data.root: cannot read the image {name}: {err} (truncated or corrupted? replace or "
                        f"remove the file)") from err


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader: ``decode_rgb`` of the file at ``path``."""
    return decode_rgb(path, path)


def default_class_names(num_classes: int) -> list[str]:
    """Names of classes a dataset does not name: class_000, class_001, ..."""
    return [f"class_{c:03d}" for c in range(num_classes)]


def build_dataset(data: Mapping[str, Any], train: bool = True) -> Dataset:
    """Dataset from a ``data`` config: name (cifar10 | image_folder | edm_dataset | synthetic | gaussian_mixture),
    root, num_classes,
    resolution. ``num_classes`` 0 (unconditional): any folder tree, every label 0. The dataset's
    ``class_names`` attribute lists its class names (label order), or is None when the files do not name them
    (EDM's format); an unconditional dataset has none ([])."""
    tf = image_transform(data["resolution"])
    named = True
    if data["name"] == "synthetic":
        ds = SyntheticShapes(data["num_classes"] or 1, data["synthetic_per_class"], data["resolution"])
        classes = ds.classes
    elif data["name"] == "gaussian_mixture":
        ds = MixtureDataset(mixture_from_config(data), data["synthetic_per_class"], data["mixture_seed"],
                            data["num_classes"])
        classes = ds.classes
    elif data["name"] == "cifar10":
        try:
            ds: Dataset = datasets.CIFAR10(root=data["root"], train=train, download=True, transform=tf)
        except Exception as err:  # network errors surface as many types; say what to do instead
            raise FileError(
                f"could not load or download CIFAR-10 into data.root={data['root']!r} ({err}). "
                "Offline? Put a class-folder copy somewhere and use data=image_folder data.root=<folder>."
            ) from err
        classes = ds.classes  # type: ignore[attr-defined]
    elif data["name"] == "image_folder":
        try:
            ds = ImageFolderSkipping(root=data["root"], transform=tf, loader=load_rgb)
        except (FileNotFoundError, NotADirectoryError) as err:  # missing, or no class folder holds an image
            raise FileError(f"data.root = {data['root']!r}: not a class-folder tree of images "
                            f"(<root>/<class>/<image>): {err}") from err
        classes = ds.classes
    elif data["name"] == "edm_dataset":
        ds = EDMDataset(data["root"], tf)
        if data["num_classes"] and not ds.labelled:
            raise ConfigError(f"data.root = {data['root']!r}: its dataset.json has no labels; set data.num_classes=0 "
                             f"(unconditional) or use a labelled dataset")
        if data["num_classes"] and ds.targets and max(ds.targets) >= data["num_classes"]:
            raise ConfigError(f"data.num_classes = {data['num_classes']} but {data['root']!r} has labels up to "
                             f"{max(ds.targets)}; set data.num_classes={max(ds.targets) + 1}")
        classes, named = default_class_names(data["num_classes"]), False
    else:
        raise ConfigError(f"data.name: unknown dataset {data['name']!r}; expected one of {DATA_KINDS}")
    if isinstance(ds, SkipsUnreadable):
        ds.max_unreadable = float(data.get("max_unreadable", DataSettings.max_unreadable))
    ds.class_names = (list(classes) if named else None) if data["num_classes"] else []  # type: ignore[attr-defined]
    if data["num_classes"] == 0:  # unconditional: every image gets label 0, which the networks ignore
        ds.targets = [0] * len(ds)  # type: ignore[attr-defined]
        ds.target_transform = no_label  # type: ignore[attr-defined]  # (ImageFolder reads it; the others targets)
    elif len(classes) != data["num_classes"]:
        raise ConfigError(
            f"data.num_classes = {data['num_classes']} but {data['root']!r} has {len(classes)} classes "
            f"({', '.join(classes[:12])}); set data.num_classes={len(classes)}"
        )
    return ds


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_LABELS_BYTES = 256 << 20  # an EDM data set's dataset.json


class EDMDataset(SkipsUnreadable, Dataset):
    """EDM's dataset format, as its ``dataset_tool.py`` writes it: a .zip or a folder of images (in any
    sub-folders) and ``dataset.json`` holding ``{"labels": [[relative path, class], ...]}`` (or null: no labels).
    Items are (transformed image, class); ``targets`` lists every image's class, in the images' sorted order.
    A zip is opened once per process (DataLoader workers each open their own)."""

    def __init__(self, root: str, transform: Callable[[Image.Image], Tensor]) -> None:
        self.root, self.transform = root, transform
        self.is_zip = os.path.isfile(root)
        self._zip: tuple[int, zipfile.ZipFile] | None = None
        if self.is_zip:
            with zipfile.ZipFile(root) as z:
                names = z.namelist()
            twice = [n for n in set(names) if names.count(n) > 1] if len(set(names)) < len(names) else []
            if twice:  # which of the two would count?
                raise FileError(f"data.root = {root!r}: the member {sorted(twice)[0]} is in the zip twice")
        elif os.path.isdir(root):
            names = [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                     for d, _, files in os.walk(root) for f in files]
        else:
            raise FileError(f"data.root = {root!r}: neither a .zip nor a folder (EDM's dataset_tool.py output)")
        self.files = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise FileError(f"data.root = {root!r}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        labels = self._labels() if "dataset.json" in names else None
        self.labelled = labels is not None
        if labels is None:
            self.targets = [0] * len(self.files)
        else:
            by_name = dict(check_label(entry, i, root) for i, entry in enumerate(labels))
            missing = [f for f in self.files if f not in by_name]
            if missing:
                raise FileError(f"data.root = {root!r}: dataset.json has no label for {missing[0]} "
                                 f"({len(missing)} images without one)")
            self.targets = [by_name[f] for f in self.files]

    def _labels(self) -> Any:
        """dataset.json's "labels" (at most MAX_LABELS_BYTES: ImageNet's 1.28M labels take 50 MB)."""
        if self.is_zip:
            with zipfile.ZipFile(self.root) as z:
                size = z.getinfo("dataset.json").file_size
        else:
            size = os.path.getsize(os.path.join(self.root, "dataset.json"))
        if size > MAX_LABELS_BYTES:
            raise FileError(f"data.root = {self.root!r}: dataset.json is {size} bytes (at most {MAX_LABELS_BYTES})")
        try:
            content = json.loads(self._read("dataset.json"))
        except (UnicodeDecodeError, ValueError) as err:
            raise FileError(f"data.root = {self.root!r}: dataset.json is not JSON ({err})") from None
        if not isinstance(content, dict):
            raise FileError(f"data.root = {self.root!r}: dataset.json is not {{\"labels\": ...}}")
        return content.get("labels")

    def _read(self, name: str) -> bytes:
        if not self.is_zip:
            with open(os.path.join(self.root, name), "rb") as f:
                return f.read()
        if self._zip is None or self._zip[0] != os.getpid():  # one handle per process (workers fork)
            self._zip = (os.getpid(), zipfile.ZipFile(self.root))
        return self._zip[1].read(name)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None}  # a zip handle does not travel to spawned workers

    def __len__(self) -> int:
        return len(self.files)

    def read_item(self, i: int) -> tuple[Tensor, int]:
        name = f"{self.root}/{self.files[i]}" if self.is_zip else os.path.join(self.root, self.files[i])
        return self.transform(decode_rgb(self._read(self.files[i]), name)), self.targets[i]


def check_label(entry: Any, index: int, root: str) -> tuple[str, int]:
    """Entry ``index`` of an EDM dataset.json's labels as (file name, class): a [name, integer >= 0] pair, else
    FileError naming the file and the entry (a -1 would crash training midway, a float would be truncated)."""
    where = f"data.root = {root!r}: dataset.json labels[{index}] = {entry!r}"
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
        raise FileError(f"{where}: expected [file name, class]")
    label = entry[1]
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise FileError(f"{where}: expected a class that is an integer >= 0")
    return entry[0], label


class SyntheticShapes(Dataset):
    """A generated dataset for smoke runs without any download: class c is a square of its own colour (red,
    orange, ... for up to 10 classes; evenly spaced hues beyond) at a random place and size on a dark, noisy
    background. Image i is a function of i alone (seeded by i), so every process and run sees the same data.
    Items are (float [3,R,R] in [-1, 1], class), class i mod num_classes."""

    COLOURS = {"red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (230, 220, 40), "green": (40, 180, 60),
               "cyan": (40, 200, 210), "blue": (40, 70, 220), "purple": (140, 50, 200), "pink": (240, 120, 190),
               "white": (235, 235, 235), "brown": (130, 80, 40)}

    def __init__(self, num_classes: int, per_class: int, resolution: int) -> None:
        self.resolution, self.num_classes = resolution, num_classes
        self.targets = [i % num_classes for i in range(num_classes * per_class)]
        if num_classes <= len(self.COLOURS):
            self.classes = list(self.COLOURS)[:num_classes]
            self.rgb = torch.tensor([self.COLOURS[c] for c in self.classes], dtype=torch.float32)
        else:
            hue = torch.arange(num_classes) / num_classes
            self.classes = [f"hue_{c:03d}" for c in range(num_classes)]
            self.rgb = 127.5 + 100 * torch.stack([torch.cos(2 * torch.pi * (hue + k / 3)) for k in range(3)], 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        g, r, c = torch_generator(derived_seed(0, i)), self.resolution, self.targets[i]
        image = 30 + 15 * torch.randn(3, r, r, generator=g)
        side = int(torch.randint(r // 4, r // 2 + 1, (1,), generator=g))
        top, left = (int(v) for v in torch.randint(0, r - side + 1, (2,), generator=g))
        image[:, top:top + side, left:left + side] = self.rgb[c].view(3, 1, 1)
        return from_uint8(image.clamp(0, 255).round()), c


def no_label(_: int) -> int:
    """The label of every image of an unconditional dataset (data.num_classes=0)."""
    return 0


class LabelsOnly(Dataset):
    """A dataset's labels without decoding its images: (empty tensor, label) items, for runs that need only
    the class distribution (distillation without the GAN classifier)."""

    def __init__(self, ds: Dataset) -> None:
        targets = getattr(ds, "targets", None)
        if targets is None:
            raise ValueError(f"{type(ds).__name__} exposes no 'targets' list")
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.empty(0), self.targets[i]


