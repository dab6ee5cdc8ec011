"""The known-answer data set: quantized draws of the mixture a ``data=gaussian_mixture`` config describes
(dmd2/method/mixture.py has the mixture's mathematics)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dmd2.method.mixture import DATA_STREAM, GaussianMixture, make_mixture, quantize, sample_mixture
from dmd2.method.randomness import derived_seed, torch_generator


def mixture_from_config(data: Mapping[str, Any]) -> GaussianMixture:
    """The mixture a ``data`` config (name gaussian_mixture) describes."""
    return make_mixture(data["num_classes"], data["mixture_components"], data["resolution"], data["mixture_std"],
                        data["mixture_seed"])


class MixtureDataset(Dataset):
    """``per_class`` quantized draws per class; item i has class i mod C. Made at once (CIFAR-size: 10 x 1000
    images at 8 px is 8 MB), a function of the mixture's seed alone, so every process sees the same data."""

    def __init__(self, mix: GaussianMixture, per_class: int, seed: int, num_classes: int) -> None:
        self.mixture = mix
        self.targets = [i % mix.num_classes for i in range(mix.num_classes * per_class)]
        x, self.components = sample_mixture(mix, torch.tensor(self.targets), torch_generator(derived_seed(seed, DATA_STREAM)))
        self.images = quantize(x)
        self.classes = [f"class_{c:03d}" for c in range(num_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], self.targets[i]
