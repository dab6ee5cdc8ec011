"""Image tensors as the pipeline keeps them: floats in [-1, 1] on the way in and out of networks, uint8 in
[0, 255] on disk and for feature networks. The two conversions between them live here and nowhere else."""
from __future__ import annotations

import torch
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """Map images in [-1, 1] [B,C,H,W] to uint8 in [0, 255] with rounding and clamping."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: Tensor) -> Tensor:
    """The inverse of ``to_uint8``: uint8 images (or floats holding the integers 0 .. 255) -> floats in [-1, 1]."""
    return images.float() / 127.5 - 1
