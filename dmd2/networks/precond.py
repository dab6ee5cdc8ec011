"""EDM's preconditioning: the wrapper that turns a raw network F into the denoiser every stage uses."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dmd2.method.edm import edm_scalings


class EDMPrecond(nn.Module):
    """EDM denoiser D(x; sigma, class) = c_skip x + c_out F(c_in x; c_noise, class).

    forward(x [B,C,H,W], sigma [B], class_labels [B] long) -> x0 estimate [B,C,H,W].
    """

    def __init__(self, net: nn.Module, sigma_data: float) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(
        self, x: Tensor, sigma: Tensor, class_labels: Tensor, return_bottleneck: bool = False,
        decode_first: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``decode_first=n``: denoise only the first n samples ([n,C,H,W]); the rest are only encoded, for
        their bottleneck features (the GAN classifier's input), which saves the decoder's work on them."""
        sigma = sigma.to(torch.float32).reshape(-1)
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in edm_scalings(sigma, self.sigma_data))
        prefix = {} if decode_first is None else {"decode_first": decode_first}  # only networks with a GAN path need it
        out = self.net(c_in * x, c_noise.flatten(), class_labels, return_bottleneck=return_bottleneck, **prefix)
        f, bottleneck = out if return_bottleneck else (out, None)
        n = f.shape[0]
        denoised = c_skip[:n] * x[:n] + c_out[:n] * f.to(torch.float32)
        return (denoised, bottleneck) if return_bottleneck else denoised
