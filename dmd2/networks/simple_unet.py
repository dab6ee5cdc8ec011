"""SimpleUNet: the spec's lightweight class-conditional UNet for 32x32 images.

Shape (spec defaults): a stem conv to ``channels[0]``; one encoder stage per further entry of
``channels`` (ResBlocks, then 2x average pooling: 32 -> 16 -> 8 -> 4); a middle of ResBlock,
self-attention, ResBlock; a mirrored decoder with nearest upsampling and skip concatenation.
GroupNorm + SiLU everywhere, dropout inside ResBlocks. The noise embedding is sinusoidal on
``c_noise``; a learned class embedding is added to it. With channels [64, 128, 256, 512] it has
about 19M parameters.

This is the raw network F of the EDM denoiser; preconditioning lives in ``dmd2.networks.precond.EDMPrecond``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd2.networks.encoding import Encoding


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style embedding of scalars ``values`` [B] -> [B, dim] (dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)
    args = values.float()[:, None] * freqs[None, :] * 1000.0  # c_noise is O(1); spread it like a timestep
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding added in between. [B,Cin,H,W] -> [B,Cout,H,W]."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over spatial positions, residual. [B,C,H,W] -> [B,C,H,W]."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class SimpleUNet(nn.Module):
    """Class-conditional UNet. forward(x [B,3,R,R], c_noise [B], class_labels [B] long) -> [B,3,R,R].

    ``channels``: width of the stem followed by one entry per encoder stage (each halves the
    resolution). ``num_res_blocks``: ResBlocks per stage. ``attn_resolutions``: extra attention
    layers at these encoder/decoder resolutions (the middle always has one).
    """

    def __init__(
        self, *, num_classes: int, resolution: int, channels: Sequence[int], num_res_blocks: int,
        attn_resolutions: Sequence[int], noise_emb_dim: int, emb_dim: int, dropout: float, groups: int,
    ) -> None:
        """Keyword arguments only, all required: their defaults and meanings are SimpleUNetArch (dmd2/config/settings.py)."""
        super().__init__()
        if resolution % 2 ** (len(channels) - 1) != 0:
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(channels) - 1}")
        self.noise_emb_dim = noise_emb_dim
        self.num_classes = num_classes
        self.noise_mlp = nn.Sequential(nn.Linear(noise_emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None  # 0: unconditional
        self.stem = nn.Conv2d(3, channels[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        skip_channels = []
        res, cur = resolution, channels[0]
        for c in channels[1:]:
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, c, emb_dim, dropout, groups))
                self.down_attn.append(SelfAttention(c, groups) if res in attn_resolutions else nn.Identity())
                skip_channels.append(c)
                cur = c
            res //= 2
        self.bottleneck_channels = cur
        self.bottleneck_resolution = res
        self.resolution = resolution  # the image size (the encoder features of a discriminator are found from it)
        self.mid1 = ResBlock(cur, cur, emb_dim, dropout, groups)
        self.mid_attn = SelfAttention(cur, groups)
        self.mid2 = ResBlock(cur, cur, emb_dim, dropout, groups)

        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        outs = [c for c in channels[:-1] for _ in range(num_res_blocks)][::-1]
        for c_out in outs:
            self.up.append(ResBlock(cur + skip_channels.pop(), c_out, emb_dim, dropout, groups))
            cur = c_out
        self.num_res_blocks = num_res_blocks
        res = resolution // 2 ** (len(channels) - 1)
        for i in range(len(self.up)):
            if i % num_res_blocks == 0:
                res *= 2
            self.up_attn.append(SelfAttention(outs[i], groups) if res in attn_resolutions else nn.Identity())
        self.out_norm = nn.GroupNorm(groups, cur)
        self.out_conv = nn.Conv2d(cur, 3, 3, padding=1)

    def encode(self, x: Tensor, c_noise: Tensor, class_labels: Tensor) -> Encoding:
        """x [B,C,H,W], c_noise [B], labels [B] -> the encoder's outputs (bottleneck [B,C',H',W'])."""
        emb = self.noise_mlp(sinusoidal_embedding(c_noise, self.noise_emb_dim))
        if self.label_emb is not None:
            emb = emb + self.label_emb(class_labels)
        h = self.stem(x)
        skips = []
        for i, (block, attn) in enumerate(zip(self.down, self.down_attn)):
            h = attn(block(h, emb))
            skips.append(h)
            if (i + 1) % self.num_res_blocks == 0:
                h = F.avg_pool2d(h, 2)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        return Encoding(h, emb, skips)

    def decode(self, enc: Encoding) -> Tensor:
        """The output [B,C,H,W] of an encoding of B samples."""
        h, emb, skips = enc.h, enc.emb, list(enc.skips)
        for i, (block, attn) in enumerate(zip(self.up, self.up_attn)):
            if i % self.num_res_blocks == 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
        return self.out_conv(F.silu(self.out_norm(h)))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor) -> Tensor:
        """x [B,C,H,W], c_noise [B], labels [B] -> [B,C,H,W]."""
        return self.decode(self.encode(x, c_noise, class_labels))
