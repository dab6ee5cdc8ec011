"""Networks: raw architectures, the EDM preconditioning wrapper, and building them from config."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from dmd2.diffusion import edm_scalings
from dmd2.networks.adm_unet import ADMUNet
from dmd2.networks.edm_unet import EDMUNet
from dmd2.networks.simple_unet import SimpleUNet
from dmd2.settings import ARCH_SETTINGS, arch_settings

# Architecture registry: the ``arch.name`` config key selects one. Checkpoints store the arch dict,
# so a network is rebuilt from a file without executing anything stored in it.
ARCHITECTURES: dict[str, type[nn.Module]] = {"simple_unet": SimpleUNet, "edm_unet": EDMUNet, "adm": ADMUNet}
assert ARCHITECTURES.keys() == ARCH_SETTINGS.keys(), "every architecture needs its settings in dmd2/settings.py"


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


def arch_kwargs(arch: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of an arch dict: its architecture's defaults (dmd2/settings.py) updated with the
    dict's values, without ``name``; lists become tuples. Checkpoints written before a key existed load with
    that key's default."""
    full = arch_settings(arch.get("name"), **{k: v for k, v in arch.items() if k != "name"})
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in full.items() if k != "name"}


def build_denoiser(arch: Mapping[str, Any], num_classes: int, resolution: int, sigma_data: float) -> EDMPrecond:
    """Build an EDM denoiser from an arch dict ({"name": ..., **settings}; missing settings take their defaults)."""
    net = ARCHITECTURES[arch["name"]](num_classes=num_classes, resolution=resolution, **arch_kwargs(arch))
    return EDMPrecond(net, sigma_data)


def set_dropout(net: nn.Module, p: float) -> nn.Module:
    """Set the probability of every dropout layer of ``net`` to ``p`` (in place; weights untouched); returns
    ``net``. Distillation trains its copies of the teacher with its own dropout (DMD2: 0)."""
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)
    return net


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ARCHITECTURES", "EDMPrecond", "SimpleUNet", "build_denoiser", "count_parameters", "arch_kwargs",
           "set_dropout"]
