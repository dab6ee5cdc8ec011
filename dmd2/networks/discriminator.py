"""A GAN discriminator on a frozen network's encoder features, one convolution head per feature map (the
discriminator of NVIDIA FastGen's DMD2 recipe: heads on the teacher's features at 32, 16 and 8 px).

Each head maps a feature map [B,C,R,R] to one logit: 4x4 stride-2 convolutions (GroupNorm, SiLU) halve it down to
4x4, one convolution as large as what is left brings it to 1x1 (GroupNorm, SiLU), and a 1x1 convolution gives
the logit. At R = 32, 16, 8 with C = 256 these are FastGen's heads (4, 3 and 2 strided 4x4 convolutions, then the
4x4 stride-4 one). The heads' logits are concatenated: [B, number of features].
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dmd2.networks.encoding import encoder_features


def norm_groups(channels: int, most: int = 32) -> int:
    """The largest number of GroupNorm groups, at most ``most``, that divides ``channels``."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def feature_head(channels: int, resolution: int) -> nn.Sequential:
    """One head: [B,C,R,R] -> [B,1,1,1] (R a power of two)."""
    if resolution < 1 or resolution & (resolution - 1):
        raise ValueError(f"a discriminator head needs a power-of-two feature size, got {resolution}")
    layers: list[nn.Module] = []
    res = resolution
    while res > 4:
        layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(norm_groups(channels), channels),
                   nn.SiLU()]
        res //= 2
    layers += [nn.Conv2d(channels, channels, res, stride=res), nn.GroupNorm(norm_groups(channels), channels), nn.SiLU(),
               nn.Conv2d(channels, 1, 1)]
    return nn.Sequential(*layers)


class FeatureDiscriminator(nn.Module):
    """Heads on feature maps of ``channels[i]`` channels at ``resolutions[i]`` px.

    forward(features: list of [B,C_i,R_i,R_i]) -> logits [B, len(features)]."""

    def __init__(self, channels: Sequence[int], resolutions: Sequence[int]) -> None:
        super().__init__()
        if len(channels) != len(resolutions) or not channels:
            raise ValueError(f"one channel count per feature resolution, got {list(channels)} and {list(resolutions)}")
        self.resolutions = [int(r) for r in resolutions]
        self.heads = nn.ModuleList(feature_head(int(c), int(r)) for c, r in zip(channels, resolutions))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, features)], dim=1)


@torch.no_grad()
def feature_channels(net: nn.Module, resolution: int, resolutions: Sequence[int]) -> list[int]:
    """The channel count of a UNet's encoder output at each of ``resolutions`` (its last output at that size), from
    one encoded zero image."""
    p = next(net.parameters())
    x = torch.zeros(1, 3, resolution, resolution, device=p.device, dtype=p.dtype)
    enc = net.encode(x, torch.zeros(1, device=p.device), torch.zeros(1, dtype=torch.long, device=p.device))
    return [f.shape[1] for f in encoder_features(enc, resolutions)]
