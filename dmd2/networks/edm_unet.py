"""EDMUNet: the DDPM++ ("SongUNet") architecture that EDM (Karras et al. 2022) trains on CIFAR-10.

An independent re-implementation of the network described in Song et al. (2021, "Score-based generative
modeling through SDEs", DDPM++ / NCSN++) as configured by Karras et al. (2022, "Elucidating the design
space of diffusion-based generative models", App. F.2). At the published CIFAR-10 width
(model_channels 128, channel_mult [2, 2, 2], 4 blocks per level, attention at 16x16) it has
55,734,147 parameters (55,735,299 with the 9-dim augmentation-label input of EDM's released CIFAR-10
checkpoints; EDM reports the model as about 55.7M / "56M" parameters).

Structure (R = resolution, L = len(channel_mult), C_l = model_channels * channel_mult[l]):

* Conditioning: a sinusoidal ("positional", frequencies 10000^(-i/(n-1)), sin half first) or random
  Fourier embedding of c_noise, plus a linear map of the one-hot class scaled by sqrt(num_classes), then
  two Linear+SiLU layers to an embedding of model_channels * channel_mult_emb.
* Encoder: a 3x3 conv to model_channels at R; per level l a downsampling residual block (l > 0) and
  num_blocks residual blocks to C_l, with attention at ``attn_resolutions``. Every encoder output is kept
  as a skip. The last encoder output, [B, C_{L-1}, R / 2^(L-1), ...], is the bottleneck that the DMD2
  GAN head reads.
* Decoder: at the lowest level two residual blocks (the first with attention), elsewhere an
  upsampling residual block; per level num_blocks + 1 residual blocks that each concatenate one skip
  (attention on the last one at ``attn_resolutions``); GroupNorm, SiLU and a 3x3 conv to the output.
* Residual block: GroupNorm-SiLU-conv3x3 (resampling before the conv), add Linear(emb) as a bias,
  GroupNorm-SiLU-dropout-conv3x3, add a (1x1-projected, resampled) shortcut, scale by skip_scale;
  optionally a self-attention layer, also residual and scaled by skip_scale.
* GroupNorm uses min(32, C / 4) groups and eps 1e-6. Weights are Xavier-uniform (x1e-5 for the last
  conv of each residual branch and the output conv, x sqrt(0.2) for qkv), biases start at zero.

Parameter and buffer names (``map_label``, ``enc['16x16_block0'].conv0.weight``, ...) and the qkv
channel layout follow the structure of NVlabs/edm's SongUNet, so that a state dict of that network maps
onto this one by name (``model.`` -> ``net.`` under EDMPrecond). This is the raw network F of the EDM
denoiser; preconditioning lives in ``dmd2.networks.precond.EDMPrecond``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd2.networks.encoding import Encoding


def _xavier_uniform(shape: Sequence[int], fan_in: int, fan_out: int, gain: float) -> Tensor:
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(*shape).uniform_(-bound, bound)


def _box_filter(taps: Sequence[float]) -> Tensor:
    """Separable 2D resampling filter [1, 1, k, k] from 1D taps, normalised to sum 1."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


class Linear(nn.Module):
    """Fully connected layer with Xavier-uniform weights scaled by ``gain`` and zero bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gain: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(_xavier_uniform((out_features, in_features), in_features, out_features, gain))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Square conv (``kernel`` 0 = no conv, resampling only) with optional 2x up/downsampling by a fixed
    filter applied before the conv: [B, in, H, W] -> [B, out, H', W'] with H' in {H/2, H, 2H}."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
        down: bool = False, resample_filter: Sequence[float] = (1, 1), gain: float = 1.0,
        conv_first: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        if conv_first and not (down and kernel):
            raise ValueError("Conv2d: conv_first needs down=True and a kernel")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.conv_first = up, down, conv_first
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = (
            nn.Parameter(_xavier_uniform((out_channels, in_channels, kernel, kernel), fan_in, fan_out, gain))
            if kernel else None
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        # A buffer so that it moves with the module and appears in the state dict like the reference's.
        self.register_buffer("resample_filter", _box_filter(resample_filter) if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv_first:
            # conv at full resolution (padded by both the conv's and the filter's reach), then filter down
            # without padding: the NCSN++ input-pyramid layer.
            f = self.resample_filter.to(x.dtype)
            w = self.weight.to(x.dtype)
            x = F.conv2d(x, w, padding=w.shape[-1] // 2 + (f.shape[-1] - 1) // 2)
            x = F.conv2d(x, f.expand(self.out_channels, 1, *f.shape[-2:]), stride=2, groups=self.out_channels)
        else:
            if self.resample_filter is not None:
                f = self.resample_filter.to(x.dtype)
                pad = (f.shape[-1] - 1) // 2
                depthwise = f.expand(self.in_channels, 1, *f.shape[-2:])
                if self.up:  # transposed depthwise conv; x4 keeps the mean (each output pixel gets 1/4 of the taps)
                    x = F.conv_transpose2d(x, depthwise * 4, stride=2, padding=pad, groups=self.in_channels)
                else:
                    x = F.conv2d(x, depthwise, stride=2, padding=pad, groups=self.in_channels)
            if self.weight is not None:
                x = F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return x


class GroupNorm(nn.GroupNorm):
    """GroupNorm with min(max_groups, C // 4) groups (so narrow test networks still work)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, max_groups: int = 32) -> None:
        super().__init__(max(1, min(max_groups, num_channels // 4)), num_channels, eps=eps)


class UNetBlock(nn.Module):
    """Residual block with optional 2x resampling and self-attention. [B,in,H,W], [B,E] -> [B,out,H',W'].

    DDPM++ / NCSN++ (the defaults): the embedding is added after conv0, a resampled shortcut is always projected.
    ADM (``adaptive_scale``, ``resample_proj=False``): the embedding gives a scale and a shift of norm1's output,
    and a resampled shortcut with unchanged width is only resampled (no weights)."""

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False, down: bool = False,
        attention: bool = False, num_heads: int = 1, dropout: float = 0.0, skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6, resample_filter: Sequence[float] = (1, 1), max_groups: int = 32,
        adaptive_scale: bool = False, resample_proj: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = num_heads if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"attention: {out_channels} channels do not split into {self.num_heads} heads")
        self.dropout, self.skip_scale = nn.Dropout(dropout), skip_scale
        self.norm0 = GroupNorm(in_channels, eps, max_groups)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.adaptive_scale = adaptive_scale
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps, max_groups)
        self.conv1 = Conv2d(out_channels, out_channels, 3, gain=1e-5)
        # The shortcut changes whenever the shape does: DDPM++ projects it with a 1x1 conv; ADM only resamples
        # it (kernel 0) when the width stays.
        kernel = 1 if resample_proj or in_channels != out_channels else 0
        self.skip = (
            Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter)
            if in_channels != out_channels or up or down else None
        )
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps, max_groups)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, gain=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, gain=1e-5)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).to(h.dtype)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            b, c, height, width = h.shape
            n = self.num_heads
            # qkv channels are laid out per head as [c_head, 3] (q, k, v interleaved), as in the reference.
            q, k, v = self.qkv(self.norm2(h)).reshape(b, n, c // n, 3, height * width).unbind(3)
            # softmax(q^T k / sqrt(c_head)) v over spatial positions; SDPA wants [B, heads, L, c_head].
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            h = (self.proj(a.transpose(-1, -2).reshape(b, c, height, width)) + h) * self.skip_scale
        return h


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [B] -> [B, num_channels] as [cos | sin] with frequencies
    max_positions^(-i / (n - 1)) (``endpoint``) or max_positions^(-i / n), i < n = num_channels / 2."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True) -> None:
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        args = torch.outer(x, (1.0 / self.max_positions) ** exponent.to(x.dtype))
        return torch.cat([args.cos(), args.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++) [B] -> [B, num_channels] as [cos | sin]; fixed random frequencies."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        args = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([args.cos(), args.sin()], dim=1)


def class_onehot(class_labels: Tensor, batch: int, num_classes: int, dtype: torch.dtype, label_dropout: float
                 ) -> Tensor:
    """Class labels [B] long (or already one-hot [B, num_classes] float) -> one-hot [B, num_classes] in ``dtype``;
    ``label_dropout`` zeroes that fraction of rows (classifier-free guidance training)."""
    if class_labels.is_floating_point():
        onehot = class_labels.reshape(batch, num_classes).to(dtype)
    else:
        onehot = F.one_hot(class_labels.reshape(-1).long(), num_classes).to(dtype)
    if label_dropout:
        keep = torch.rand(onehot.shape[0], 1, device=onehot.device) >= label_dropout
        onehot = onehot * keep.to(onehot.dtype)
    return onehot


def check_types(embedding_type: str, encoder_type: str, decoder_type: str) -> None:
    """ValueError unless the three variant names are EDM's."""
    for key, value, options in (("embedding_type", embedding_type, ("positional", "fourier")),
                                ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                ("decoder_type", decoder_type, ("standard", "skip"))):
        if value not in options:
            raise ValueError(f"{key} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")


class EDMUNet(nn.Module):
    """DDPM++/NCSN++ UNet. forward(x [B,C,R,R], c_noise [B], class_labels [B] long) -> [B,C,R,R].

    ``model_channels * channel_mult[l]`` is the width of level l (resolution R / 2^l); ``num_blocks``
    residual blocks per level in the encoder (num_blocks + 1 in the decoder); self-attention at
    ``attn_resolutions``. ``bottleneck_channels`` / ``bottleneck_resolution`` describe the encoder's
    last feature map (``encode(...).h``).

    ``class_labels`` may also be float [B, num_classes] (e.g. all zeros for "no class"). ``augment_dim``
    > 0 adds EDM's augmentation-label input (bias-free linear map, only used when ``augment_labels`` is
    passed). ``label_dropout`` zeroes the class input of that fraction of samples in training (CFG).
    NCSN++ is embedding_type fourier, channel_mult_noise 2, encoder_type residual, resample_filter [1,3,3,1].
    """

    def __init__(
        self, *, num_classes: int, resolution: int, in_channels: int, model_channels: int,
        channel_mult: Sequence[int], channel_mult_emb: int, channel_mult_noise: int, num_blocks: int,
        attn_resolutions: Sequence[int], num_heads: int, dropout: float, label_dropout: float, augment_dim: int,
        embedding_type: str, max_positions: int, encoder_type: str, decoder_type: str,
        resample_filter: Sequence[float], skip_scale: float, norm_eps: float, norm_max_groups: int,
    ) -> None:
        """Keyword arguments only, all required: their defaults and meanings are EDMUNetArch (dmd2/config/settings.py)."""
        super().__init__()
        check_types(embedding_type, encoder_type, decoder_type)
        levels = len(channel_mult)
        if levels < 1 or resolution % 2 ** (levels - 1) != 0:
            raise ValueError(f"resolution {resolution} is not divisible by 2^{levels - 1}")
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self.bottleneck_channels = model_channels * channel_mult[-1]
        self.bottleneck_resolution = resolution >> (levels - 1)
        self.resolution = resolution  # the image size (the encoder features of a discriminator are found from it)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block_kw = dict(
            emb_channels=emb_channels, num_heads=num_heads, dropout=dropout, skip_scale=skip_scale, eps=norm_eps,
            resample_filter=resample_filter, max_groups=norm_max_groups,
        )

        # Conditioning: noise embedding (+ class, + augmentation labels) -> two Linear+SiLU layers.
        self.map_noise = (
            PositionalEmbedding(noise_channels, max_positions, endpoint=True) if embedding_type == "positional"
            else FourierEmbedding(noise_channels)
        )
        self.map_label = Linear(num_classes, noise_channels) if num_classes else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder. Module names carry the resolution, as in the reference, so state dicts line up.
        self.enc = nn.ModuleDict()
        c_cur = c_aux = in_channels
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c_cur, model_channels, 3)
                c_cur = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c_cur, c_cur, down=True, **block_kw)
                if encoder_type == "skip":  # progressively downsampled input, added through a 1x1 conv
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        c_aux, c_aux, 0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(c_aux, c_cur, 1)
                elif encoder_type == "residual":  # a residual input pyramid (NCSN++)
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        c_aux, c_cur, 3, down=True, resample_filter=resample_filter, conv_first=True
                    )
                    c_aux = c_cur
            for idx in range(num_blocks):
                c_out = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    c_cur, c_out, attention=res in attn_resolutions, **block_kw
                )
                c_cur = c_out
        skip_channels = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level in reversed(range(levels)):
            res = resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c_cur, c_cur, attention=True, **block_kw)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c_cur, c_cur, **block_kw)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c_cur, c_cur, up=True, **block_kw)
            for idx in range(num_blocks + 1):
                c_out = model_channels * channel_mult[level]
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    c_cur + skip_channels.pop(), c_out, attention=idx == num_blocks and res in attn_resolutions,
                    **block_kw,
                )
                c_cur = c_out
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < levels - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        in_channels, in_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(c_cur, norm_eps, norm_max_groups)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(c_cur, in_channels, 3, gain=1e-5)

    def _embedding(
        self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None
    ) -> Tensor:
        """The conditioning vector [B, model_channels * channel_mult_emb]."""
        emb = self.map_noise(c_noise.to(torch.float32).reshape(-1))
        emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1)  # DDPM++ feeds [sin | cos]
        if self.map_label is not None and class_labels is not None:
            onehot = class_onehot(class_labels, x.shape[0], self.num_classes, emb.dtype,
                                  self.label_dropout if self.training else 0.0)
            emb = emb + self.map_label(onehot * math.sqrt(self.num_classes))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb)).to(x.dtype)

    def encode(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None,
               augment_labels: Tensor | None = None) -> Encoding:
        """x [B,C,H,W], c_noise [B], labels [B] -> the encoder's outputs (bottleneck [B,C',H',W'])."""
        emb = self._embedding(x, c_noise, class_labels, augment_labels)
        skips: list[Tensor] = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) * math.sqrt(0.5)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        return Encoding(x, emb, skips)

    def decode(self, enc: Encoding) -> Tensor:
        """The output [B,C,H,W] of an encoding of B samples."""
        x, emb, skips = enc.h, enc.emb, list(enc.skips)
        out: Tensor | None = None
        normed: Tensor | None = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                out = block(out)
            elif "aux_norm" in name:
                normed = block(x)
            elif "aux_conv" in name:
                y = block(F.silu(normed))
                out = y if out is None else out + y
            else:
                if "_block" in name:  # every decoder block (not in0/in1/up) consumes one skip
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        assert out is not None and not skips
        return out

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        """x [B,C,H,W], c_noise [B], labels [B] -> [B,C,H,W]."""
        return self.decode(self.encode(x, c_noise, class_labels, augment_labels))
