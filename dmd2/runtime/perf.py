"""Fast paths, each switched by a key of the ``perf`` config node (Perf in dmd2/config/settings.py).

- ``tf32``: TF32 tensor cores for fp32 matrix multiplications and convolutions (Ampere and newer GPUs).
- ``cudnn_benchmark``: cuDNN times its convolution algorithms once for the (fixed) input shapes.
- ``channels_last``: networks in channels-last (NHWC) memory format.
- ``compile``: ``torch.compile`` of the networks (``nn.Module.compile``: in place, same state_dict keys).
- ``fused_adamw``: AdamW's fused kernel instead of the multi-tensor ("foreach") one.
- ``cache_dataset``: the dataset decoded once into a uint8 tensor on the training device (``dmd2.data.datasets``).
And ``precision`` (a stage key): bf16 autocast on CUDA (``autocast``).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping

import torch
from torch import nn


def set_backend_flags(perf: Mapping[str, Any], device: torch.device) -> None:
    """TF32 and cuDNN autotuning for CUDA runs (process-wide switches; nothing changes on the CPU)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(perf["tf32"])
    torch.backends.cudnn.allow_tf32 = bool(perf["tf32"])
    torch.backends.cudnn.benchmark = bool(perf["cudnn_benchmark"])


def prepare_network(net: nn.Module, perf: Mapping[str, Any]) -> nn.Module:
    """Channels-last and/or ``torch.compile``, in place; returns ``net``."""
    if perf["channels_last"]:
        net.to(memory_format=torch.channels_last)
    if perf["compile"]:
        compile_network(net)
    return net


def compile_network(net: nn.Module) -> None:
    """``torch.compile`` in place: a UNet's ``encode`` and ``decode`` (what its forward, and a denoiser's
    ``denoise_first``, call), else the module's forward."""
    unets = [m for m in net.modules() if hasattr(m, "encode") and hasattr(m, "decode")]
    for m in unets:
        m.encode = torch.compile(m.encode)
        m.decode = torch.compile(m.decode)
    if not unets:
        net.compile()


def fused_adamw(setting: Any, device: torch.device) -> bool:
    """Whether AdamW uses its fused kernel: ``auto`` = on CUDA; true / false as given."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def cache_fits(setting: Any, num_bytes: int, max_gb: float) -> bool:
    """Whether to cache a dataset of ``num_bytes`` (uint8): ``auto`` = when it is at most ``max_gb``."""
    return num_bytes <= max_gb * 1e9 if setting == "auto" else bool(setting)


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast on CUDA when ``precision == "bf16"``; full fp32 otherwise (and always on the CPU)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
