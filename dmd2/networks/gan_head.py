"""DMD2's GAN classifier head on the fake score network's bottleneck features."""
from __future__ import annotations

import math

from torch import Tensor, nn


class GANHead(nn.Module):
    """Bottleneck features [B,C,R,R] -> one real/fake logit per image [B].

    conv 4x4 stride 2 -> GroupNorm -> SiLU -> conv (R/2)x(R/2) stride R/2 (to 1x1) -> GroupNorm -> SiLU -> conv 1x1.
    At an 8x8 bottleneck this is DMD2's head (4x4 s2, then 4x4 s4); smaller bottlenecks shrink the second kernel.
    """

    def __init__(self, channels: int, resolution: int) -> None:
        super().__init__()
        if resolution < 2:
            raise ValueError(f"GANHead needs a bottleneck of at least 2x2, got {resolution}x{resolution}")
        # at least 4 channels per group: after the second conv each group normalises 1x1 maps, and a group
        # of one channel would normalise every logit to the same value
        groups = max(1, math.gcd(32, channels // 4))
        half = resolution // 2
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, channels, half, stride=half), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).flatten(1).mean(1)
