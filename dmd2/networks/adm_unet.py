"""ADM: Dhariwal & Nichol's UNet (2021, "Diffusion Models Beat GANs") as EDM re-implemented it ("DhariwalUNet")
for class-conditional ImageNet 64x64 (edm-imagenet-64x64-cond-adm.pkl, the official DMD2 teacher).

Layout, at the published widths (model_channels 192, channel_mult [1, 2, 3, 4], 3 blocks per level, attention at
32, 16 and 8; 295,899,267 parameters with 1000 classes):

- conditioning: a positional embedding of c_noise (model_channels wide, frequencies 10000^(-i/n)), plus the
  augmentation labels (bias-free linear map), then Linear-SiLU-Linear to emb_channels, plus a bias-free linear map
  of the one-hot class, then SiLU;
- encoder: a 3x3 conv at full resolution, then per level a down block (from the second level on) and
  ``num_blocks`` residual blocks, attention at ``attn_resolutions``; every output is kept as a skip;
- decoder: at the lowest level two middle blocks (the first with attention), then per level an up block (from the
  second-lowest level on) and ``num_blocks + 1`` blocks, each fed the concatenation with the next skip;
- output: GroupNorm-SiLU-3x3 conv.

Blocks are the residual blocks of ``edm_unet`` with ADM's choices: the embedding scales and shifts the second
GroupNorm's output (adaptive scale), residual sums are not rescaled, GroupNorm eps 1e-5, one attention head per
64 channels, and a resampled shortcut is only resampled. Module names follow EDM's, so its pickles load.
The bottleneck (the GAN head's input) is the encoder's last output, [B, 768, 8, 8] at the published widths.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd2.networks.edm_unet import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, class_onehot
from dmd2.networks.encoding import Encoding

ADM_EPS = 1e-5  # GroupNorm epsilon of every ADM layer
ADM_SKIP_SCALE = 1.0  # residual sums are not rescaled


class ADMUNet(nn.Module):
    """ADM UNet. forward(x [B,C,R,R], c_noise [B], class_labels [B] long or [B,num_classes] float) -> [B,C,R,R]."""

    def __init__(
        self, *, num_classes: int, resolution: int, in_channels: int, model_channels: int,
        channel_mult: Sequence[int], channel_mult_emb: int, num_blocks: int, attn_resolutions: Sequence[int],
        dropout: float, label_dropout: float, augment_dim: int, channels_per_head: int,
    ) -> None:
        """Keyword arguments only, all required: their defaults and meanings are ADMArch (dmd2/config/settings.py)."""
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or resolution % 2 ** (levels - 1) != 0:
            raise ValueError(f"resolution {resolution} is not divisible by 2^{levels - 1}")
        self.num_classes, self.label_dropout = num_classes, label_dropout
        self.bottleneck_channels = model_channels * channel_mult[-1]
        self.bottleneck_resolution = resolution >> (levels - 1)
        self.resolution = resolution  # the image size (the encoder features of a discriminator are found from it)
        emb_channels = model_channels * channel_mult_emb

        def block(cin: int, cout: int, **kw: bool) -> UNetBlock:
            # cout // channels_per_head heads; a block narrower than one head has none (as in EDM's code)
            return UNetBlock(cin, cout, emb_channels, num_heads=cout // channels_per_head, dropout=dropout,
                             skip_scale=ADM_SKIP_SCALE, eps=ADM_EPS, adaptive_scale=True, resample_proj=False, **kw)

        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(num_classes, emb_channels, bias=False) if num_classes else None

        self.enc = nn.ModuleDict()
        c_cur = in_channels
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c_cur, model_channels * mult, 3)
                c_cur = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = block(c_cur, c_cur, down=True)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = block(c_cur, model_channels * mult,
                                                            attention=res in attn_resolutions)
                c_cur = model_channels * mult
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level in reversed(range(levels)):
            res = resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = block(c_cur, c_cur, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(c_cur, c_cur)
            else:
                self.dec[f"{res}x{res}_up"] = block(c_cur, c_cur, up=True)
            for idx in range(num_blocks + 1):
                c_out = model_channels * channel_mult[level]
                self.dec[f"{res}x{res}_block{idx}"] = block(c_cur + skips.pop(), c_out,
                                                            attention=res in attn_resolutions)
                c_cur = c_out
        self.out_norm = GroupNorm(c_cur, ADM_EPS)
        self.out_conv = Conv2d(c_cur, in_channels, 3)

    def _embedding(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None,
                   augment_labels: Tensor | None) -> Tensor:
        """The conditioning vector [B, emb_channels]."""
        emb = self.map_noise(c_noise.to(torch.float32).reshape(-1))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None and class_labels is not None:
            onehot = class_onehot(class_labels, x.shape[0], self.num_classes, emb.dtype,
                                  self.label_dropout if self.training else 0.0)
            emb = emb + self.map_label(onehot)
        return F.silu(emb).to(x.dtype)

    def encode(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None,
               augment_labels: Tensor | None = None) -> Encoding:
        """x [B,C,H,W], c_noise [B], labels [B] -> the encoder's outputs (bottleneck [B,C',H',W'])."""
        emb = self._embedding(x, c_noise, class_labels, augment_labels)
        skips: list[Tensor] = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        return Encoding(x, emb, skips)

    def decode(self, enc: Encoding) -> Tensor:
        """The output [B,C,H,W] of an encoding of B samples."""
        x, emb, skips = enc.h, enc.emb, list(enc.skips)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        """x [B,C,H,W], c_noise [B], labels [B] -> [B,C,H,W]."""
        return self.decode(self.encode(x, c_noise, class_labels, augment_labels))
