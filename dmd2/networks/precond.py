"""EDM's preconditioning: the wrapper that turns a raw network F into the denoiser every stage uses."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dmd2.method.edm import edm_scalings
from dmd2.networks.encoding import encoder_features


class EDMPrecond(nn.Module):
    """EDM denoiser D(x; sigma, class) = c_skip x + c_out F(c_in x; c_noise, class).

    forward(x [B,C,H,W], sigma [B], class_labels [B] long) -> x0 estimate [B,C,H,W].
    """

    def __init__(self, net: nn.Module, sigma_data: float) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def _scalings(self, sigma: Tensor) -> tuple[Tensor, ...]:
        sigma = sigma.to(torch.float32).reshape(-1)
        return tuple(c.view(-1, 1, 1, 1) for c in edm_scalings(sigma, self.sigma_data))

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor) -> Tensor:
        """x [B,C,H,W], sigma [B], labels [B] -> the x0 estimate [B,C,H,W]."""
        c_skip, c_out, c_in, c_noise = self._scalings(sigma)
        f = self.net(c_in * x, c_noise.flatten(), class_labels)
        return c_skip * x + c_out * f.to(torch.float32)

    def denoise_first(self, x: Tensor, sigma: Tensor, class_labels: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """One encoder pass over all B samples, the decoder over the first n only: (the x0 estimate of the first
        n [n,C,H,W], the bottleneck of all B [B,C',H',W'], the GAN classifier's input). n = 0 only encodes."""
        c_skip, c_out, c_in, c_noise = self._scalings(sigma)
        enc = self.net.encode(c_in * x, c_noise.flatten(), class_labels)
        f = self.net.decode(enc.first(n)) if n > 0 else x[:0]
        return c_skip[:n] * x[:n] + c_out[:n] * f.to(torch.float32), enc.h

    def features(self, x: Tensor, sigma: Tensor, class_labels: Tensor, resolutions: list[int]) -> list[Tensor]:
        """The encoder's last output at each of ``resolutions`` for noisy images x [B,C,H,W] at sigma [B] (a
        discriminator's input; gradients reach x)."""
        _, _, c_in, c_noise = self._scalings(sigma)
        return encoder_features(self.net.encode(c_in * x, c_noise.flatten(), class_labels), resolutions)
