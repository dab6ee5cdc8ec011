"""Datasets: CIFAR-10 through torchvision, or any class-folder tree through ImageFolder.

Images come out as float tensors [3, R, R] in [-1, 1] with integer class labels.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms


def image_transform(resolution: int, hflip: bool) -> transforms.Compose:
    steps: list[Any] = [transforms.Resize(resolution), transforms.CenterCrop(resolution)]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    return transforms.Compose(steps)


def build_dataset(data: Mapping[str, Any], train: bool = True) -> Dataset:
    """Dataset from a ``data`` config: name (cifar10 | image_folder), root, num_classes, resolution, hflip."""
    tf = image_transform(data["resolution"], bool(data.get("hflip", False)) and train)
    if data["name"] == "cifar10":
        try:
            ds: Dataset = datasets.CIFAR10(root=data["root"], train=train, download=True, transform=tf)
        except Exception as err:  # network errors surface as many types; say what to do instead
            raise RuntimeError(
                f"could not load or download CIFAR-10 into data.root={data['root']!r} ({err}). "
                "Offline? Put a class-folder copy somewhere and use data=image_folder data.root=<folder>."
            ) from err
        classes = ds.classes  # type: ignore[attr-defined]
    elif data["name"] == "image_folder":
        ds = datasets.ImageFolder(root=data["root"], transform=tf)
        classes = ds.classes
    else:
        raise ValueError(f"data.name: unknown dataset {data['name']!r}; expected 'cifar10' or 'image_folder'")
    if len(classes) != data["num_classes"]:
        raise ValueError(
            f"data.num_classes = {data['num_classes']} but {data['root']!r} has {len(classes)} classes "
            f"({', '.join(classes[:12])}); set data.num_classes={len(classes)}"
        )
    return ds


def build_loader(ds: Dataset, batch_size: int, num_workers: int, seed: int, pin_memory: bool = False) -> DataLoader:
    """Shuffling loader that drops the last partial batch; shuffling order is fixed by ``seed``."""
    if len(ds) < batch_size:  # type: ignore[arg-type]
        raise ValueError(f"batch_size = {batch_size} is larger than the dataset ({len(ds)} images)")  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
        pin_memory=pin_memory, generator=gen, persistent_workers=num_workers > 0,
    )


def infinite_batches(loader: DataLoader) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Yield (epoch, (images [B,3,R,R], labels [B])) forever, epoch counting from 0."""
    epoch = 0
    while True:
        for batch in loader:
            yield epoch, batch
        epoch += 1
