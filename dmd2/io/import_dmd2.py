"""Import the official DMD2 ImageNet-64 generators (tianweiy/DMD2 model zoo) as export folders of this project.

    python -m dmd2.import_dmd2 pytorch_model.bin exports/dmd2-imagenet64

The official generators are state dicts (``pytorch_model.bin``, or a ``.safetensors`` file) of EDM's
``EDMPrecond`` around a ``DhariwalUNet`` (ADM) with the augmentation input removed; their keys carry EDMPrecond's
``model.`` prefix. The file is read with ``torch.load(weights_only=True)`` (or safetensors): nothing in it runs.
The architecture (base width, width per level, blocks per level, attention resolutions, classes, resolution,
augmentation input) is read off the tensor names and shapes, checked tensor by tensor against our ``adm`` network
built from it, and written as an export folder (model.safetensors, config.json, README.md: the layout
``python -m dmd2.export`` writes), which ``generate.py``, ``evaluate.py`` and ``dmd2.load_generator`` load like any
other. The export records the official one-step sampler: x = G(80 z; sigma = 80, class), so nothing else needs
to be given to sample it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
from typing import Any, Mapping

import torch
from torch import Tensor

from dmd2.config.errors import FileError, FormatError, run_tool
from dmd2.config.settings import arch_settings
from dmd2.data.datasets import default_class_names
from dmd2.io.export import write_export
from dmd2.io.export_format import EXPORT_FORMAT, config_hash
from dmd2.io.files import file_sha256
from dmd2.io.weights import build_denoiser
from dmd2.version import __version__

CONDITIONING_SIGMA = 80.0  # the official generators' one step: x = G(80 z; sigma 80, one-hot class)
SIGMA_DATA = 0.5  # EDMPrecond's sigma_data in the official ImageNet config
CHANNELS_PER_HEAD = 64  # fixed inside EDM's DhariwalUNet
MODEL_PREFIX = "model."  # EDMPrecond's name for the UNet inside it
_ENC_KEY = re.compile(r"^enc\.(\d+)x(\d+)_(conv|down|block(\d+))\.")


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of a ``torch.save``-d state dict (weights only: no code is run) or a .safetensors file."""
    if not os.path.isfile(path):
        raise FileError(f"{path}: file not found (expected the official pytorch_model.bin or a .safetensors)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated files, pickles with code, foreign formats
        raise FormatError(f"{path}: not a readable state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise FormatError(f"{path}: expected a state dict of tensors (name -> tensor), got {type(state).__name__}")
    return dict(state)


def strip_prefix(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """The UNet's own tensor names: EDMPrecond's ``model.`` prefix removed (all keys must carry it, or none)."""
    prefixed = [k.startswith(MODEL_PREFIX) for k in state]
    if all(prefixed):
        return {k[len(MODEL_PREFIX):]: v for k, v in state.items()}
    if any(prefixed):
        odd = next(k for k, p in zip(state, prefixed) if not p)
        raise FormatError(f"{source}: tensor {odd!r} lacks the '{MODEL_PREFIX}' prefix the other tensors have "
                          "(expected the state dict of one EDMPrecond)")
    return dict(state)


def _shape(state: Mapping[str, Tensor], key: str, source: str, dims: int) -> tuple[int, ...]:
    if key not in state:
        raise FormatError(f"{source}: no tensor {MODEL_PREFIX}{key} (expected EDM's DhariwalUNet layout)")
    shape = tuple(state[key].shape)
    if len(shape) != dims:
        raise FormatError(f"{source}: tensor {MODEL_PREFIX}{key} has shape {list(shape)}, expected {dims} dims")
    return shape


def _multiple(value: int, base: int, what: str, source: str) -> int:
    if value % base:
        raise FormatError(f"{source}: {what} is {value} channels, not a multiple of the base width {base}")
    return value // base


def derive_arch(state: Mapping[str, Tensor], source: str) -> tuple[dict[str, Any], int, int]:
    """(adm arch dict, num_classes, resolution) read off the names and shapes of a DhariwalUNet state dict
    (without the ``model.`` prefix)."""
    emb_channels, model_channels = _shape(state, "map_layer0.weight", source, 2)
    channel_mult_emb = _multiple(emb_channels, model_channels, "map_layer0 (the embedding width)", source)
    label_dim = _shape(state, "map_label.weight", source, 2)[1] if "map_label.weight" in state else 0
    augment_dim = _shape(state, "map_augment.weight", source, 2)[1] if "map_augment.weight" in state else 0
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = _ENC_KEY.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set())
            if m.group(4) is not None:
                blocks[int(m.group(1))].add(int(m.group(4)))
    if not blocks:
        raise FormatError(f"{source}: no encoder tensors ({MODEL_PREFIX}enc.<R>x<R>_...): not a DhariwalUNet")
    resolutions = sorted(blocks, reverse=True)
    resolution = resolutions[0]
    expected = [resolution >> level for level in range(len(resolutions))]
    if resolutions != expected:
        raise FormatError(f"{source}: encoder levels at {resolutions} px, expected halving levels {expected}")
    num_blocks = len(blocks[resolution])
    for res, idx in blocks.items():
        if idx != set(range(num_blocks)):
            raise FormatError(f"{source}: level {res}x{res} has encoder blocks {sorted(idx)}, expected "
                              f"block0 .. block{num_blocks - 1} as at {resolution}x{resolution}")
    in_channels = _shape(state, f"enc.{resolution}x{resolution}_conv.weight", source, 4)[1]
    channel_mult = [_multiple(_shape(state, f"enc.{r}x{r}_block0.conv1.weight", source, 4)[0], model_channels,
                              f"enc.{r}x{r}_block0", source) for r in resolutions]
    attn = [r for r in resolutions if f"enc.{r}x{r}_block0.qkv.weight" in state]
    arch = arch_settings("adm", in_channels=in_channels, model_channels=model_channels, channel_mult=channel_mult,
                         channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn,
                         dropout=0.0, label_dropout=0.0, augment_dim=augment_dim,
                         channels_per_head=CHANNELS_PER_HEAD)
    return arch, label_dim, resolution


def check_fit(expected: Mapping[str, Tensor], weights: Mapping[str, Tensor], source: str) -> None:
    """Every tensor of the network built from the derived arch is in the file with its shape, and nothing else."""
    for key, tensor in expected.items():
        if key not in weights:
            raise FormatError(f"{source}: tensor {MODEL_PREFIX}{key[len('net.'):]} is missing (expected shape "
                              f"{list(tensor.shape)} for the architecture read off the file)")
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise FormatError(f"{source}: tensor {MODEL_PREFIX}{key[len('net.'):]} has shape "
                              f"{list(weights[key].shape)}, expected {list(tensor.shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise FormatError(f"{source}: unexpected tensor {MODEL_PREFIX}{extra[0][len('net.'):]} (and "
                          f"{len(extra) - 1} more) for the architecture read off the file")


def import_dmd2(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An official DMD2 generator file -> (export metadata, export weights), checked against our network."""
    unet = strip_prefix(read_state_dict(path), path)
    arch, num_classes, resolution = derive_arch(unet, path)
    denoiser = build_denoiser(arch, num_classes, resolution, SIGMA_DATA)
    weights = {"net." + k: v for k, v in unet.items()}
    check_fit(denoiser.state_dict(), weights, path)
    denoiser.load_state_dict(weights)
    out = {k: (v.to(torch.float32) if v.is_floating_point() else v).detach().contiguous()
           for k, v in denoiser.state_dict().items()}
    name = os.path.basename(path)
    provenance = {
        "checkpoint": name, "checkpoint_sha256": file_sha256(path), "step": 0, "teacher_checkpoint": None,
        "imported_from": f"{name} (official DMD2 generator, tianweiy/DMD2)", "config_sha256": config_hash({}),
        "wandb_run_id": None, "dmd2_version": __version__,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta = {
        "format": EXPORT_FORMAT, "format_version": 1, "kind": "dmd2", "weights": "raw", "arch": arch,
        "num_classes": num_classes, "resolution": resolution, "sigma_data": SIGMA_DATA,
        "sampler": {"denoising_sigmas": [CONDITIONING_SIGMA], "nfe": 1},
        "class_names": default_class_names(num_classes), "provenance": provenance, "training_config": {},
    }
    return meta, out


def write_new_export(folder: str, meta: dict[str, Any], weights: dict[str, Tensor]) -> None:
    """Write an export folder that does not exist yet (``dmd2.io.export.write_export``: staged, moved in at the end)."""
    if os.path.lexists(folder):
        raise FileError(f"{folder}: already exists; refusing to overwrite it (name a new folder)")
    write_export(folder, meta, weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmd2.import_dmd2", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the official generator: pytorch_model.bin (or a .safetensors file)")
    parser.add_argument("folder", help="the export folder to write; must not exist")
    args = parser.parse_args(argv)
    return run_tool(parser.prog, lambda: import_command(args.source, args.folder))


def import_command(source: str, folder: str) -> None:
    """``python -m dmd2.import_dmd2 source folder``: import, write, report."""
    if os.path.lexists(folder):
        raise FileError(f"{folder}: already exists; refusing to overwrite it (name a new folder)")
    meta, weights = import_dmd2(source)
    write_new_export(folder, meta, weights)
    arch = meta["arch"]
    print(f"[import_dmd2] {source} -> {folder}: ADM ({arch['model_channels']} channels, mult "
          f"{arch['channel_mult']}, {arch['num_blocks']} blocks, attention at {arch['attn_resolutions']}), "
          f"{meta['num_classes'] or 'no'} classes, {meta['resolution']}x{meta['resolution']}, one step at sigma "
          f"{CONDITIONING_SIGMA:g}, sha256 {meta['provenance']['checkpoint_sha256'][:12]}")
