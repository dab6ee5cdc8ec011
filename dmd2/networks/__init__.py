"""Networks: the raw architectures (their registry), the EDM preconditioning wrapper (``precond``) and the GAN
classifier head. Built from arch dicts by dmd2.io.weights.build_denoiser."""
from __future__ import annotations

from torch import nn

from dmd2.networks.adm_unet import ADMUNet
from dmd2.networks.edm_unet import EDMUNet
from dmd2.networks.simple_unet import SimpleUNet

# Architecture registry: the ``arch.name`` config key selects one. Checkpoints store the arch dict,
# so a network is rebuilt from a file without executing anything stored in it.
ARCHITECTURES: dict[str, type[nn.Module]] = {"simple_unet": SimpleUNet, "edm_unet": EDMUNet, "adm": ADMUNet}


def set_dropout(net: nn.Module, p: float) -> nn.Module:
    """Set the probability of every dropout layer of ``net`` to ``p`` (in place; weights untouched); returns
    ``net``. Distillation trains its copies of the teacher with its own dropout (DMD2: 0)."""
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)
    return net


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

