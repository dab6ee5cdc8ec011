"""Import the official DMD2 ImageNet-64 generators (tianweiy/DMD2 model zoo) as export folders of this project.

    python -m dmd2.import_dmd2 pytorch_model.bin exports/dmd2-imagenet64

The official generators are state dicts (``pytorch_model.bin``, or a ``.safetensors`` file) of EDM's
``EDMPrecond`` around a ``DhariwalUNet`` (ADM) with the augmentation input removed; their keys carry EDMPrecond's
``model.`` prefix. The file is read with ``torch.load(weights_only=True)`` (or safetensors): nothing in it runs.
The architecture (base width, width per level, blocks per level, attention resolutions, classes, resolution,
augmentation input) is read off the tensor names and shapes and checked like any weights from a file (its bounds,
then tensor by tensor against our ``adm`` network built on PyTorch's meta device, before anything is allocated),
then written as an export folder (model.safetensors, config.json, README.md: the layout
``python -m dmd2.export`` writes), which ``generate.py``, ``evaluate.py`` and ``dmd2.load_generator`` load like any
other. The export records the official one-step sampler: x = G(80 z; sigma = 80, class), so nothing else needs
to be given to sample it.
"""
from __future__ import annotations

import argparse
import os
import re
import zipfile
from typing import Any, Mapping

import torch
from torch import Tensor

from dmd2.config.errors import FileError, FormatError, run_tool
from dmd2.config.settings import arch_settings
from dmd2.io.export import write_export
from dmd2.io.export_format import export_metadata
from dmd2.io.checkpoint import load_failure
from dmd2.io.files import file_sha256
from dmd2.io.sampler import make_sampler
from dmd2.io.weights import WeightsMismatch, check_stored_whole, load_denoiser

CONDITIONING_SIGMA = 80.0  # the official generators' one step: x = G(80 z; sigma 80, one-hot class)
SIGMA_DATA = 0.5  # EDMPrecond's sigma_data in the official ImageNet config
CHANNELS_PER_HEAD = 64  # fixed inside EDM's DhariwalUNet
MODEL_PREFIX = "model."  # EDMPrecond's name for the UNet inside it
STATE_DICT = "expected the official generator's state dict (tensors only: pytorch_model.bin or a .safetensors)"
_ENC_KEY = re.compile(r"^enc\.(\d{1,6})x\1_(conv|down|block(\d{1,6}))\.")  # a level's side, twice


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of a ``torch.save``-d state dict (weights only: no code is run) or a .safetensors file."""
    if not os.path.isfile(path):
        raise FileError(f"{path}: file not found (expected the official pytorch_model.bin or a .safetensors)")
    check_stored_members(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated files, pickles with code, foreign formats
        raise FormatError(f"{path}: not a readable state dict: {load_failure(err, STATE_DICT)}") from None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise FormatError(f"{path}: expected a state dict of tensors (name -> tensor), got {type(state).__name__}")
    try:  # a network built for them is then no larger than the file
        check_stored_whole(state, os.path.getsize(path))
    except FormatError as err:
        raise FormatError(f"{path}: {err}") from None
    return dict(state)


def check_stored_members(path: str) -> None:
    """FormatError unless a torch.save zip file stores its members uncompressed (as torch.save does) and they fit
    in the file: torch.load would inflate a deflated member whole before anything is checked."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise FormatError(f"{path}: not a readable state dict (a damaged zip archive: {err})") from None
    packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise FormatError(f"{path}: compressed member {packed[0]} (torch.save stores its members uncompressed)")
    if sum(m.file_size for m in members) > os.path.getsize(path):
        raise FormatError(f"{path}: its members declare more bytes than the file holds")


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
            if m.group(3) is not None:
                blocks[int(m.group(1))].add(int(m.group(3)))
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


def official_names(err: WeightsMismatch, source: str) -> FormatError:
    """A mismatch between the file's tensors and the network of the arch read off them, in the file's own names
    (``model.`` + the UNet's): the first tensor of the network that is missing or of another shape, else the
    first unexpected one."""
    for key, shape in err.expected.items():
        name = MODEL_PREFIX + key[len("net."):]
        if key not in err.shapes:
            return FormatError(f"{source}: tensor {name} is missing (expected shape {list(shape)} for the "
                                  "architecture read off the file)")
        if tuple(err.shapes[key]) != tuple(shape):
            return FormatError(f"{source}: tensor {name} has shape {list(err.shapes[key])}, expected {list(shape)}")
    extra = err.unexpected
    return FormatError(f"{source}: unexpected tensor {MODEL_PREFIX}{extra[0][len('net.'):]} (and "
                          f"{len(extra) - 1} more) for the architecture read off the file")


def import_dmd2(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An official DMD2 generator file -> (export metadata, export weights). The architecture read off the tensors
    is checked like any weights from a file (dmd2.io.weights.load_denoiser: its bounds, then its shapes on the meta
    device) before the network is built; the metadata is the one every export carries (export_metadata)."""
    unet = strip_prefix(read_state_dict(path), path)
    arch, num_classes, resolution = derive_arch(unet, path)
    weights = {"net." + k: v for k, v in unet.items()}
    try:
        denoiser = load_denoiser(arch, num_classes, resolution, SIGMA_DATA, weights)
    except WeightsMismatch as err:
        raise official_names(err, path) from None
    except FormatError as err:
        raise FormatError(f"{path}: {err}") from None
    out = {k: (v.to(torch.float32) if v.is_floating_point() else v).detach().contiguous()
           for k, v in denoiser.state_dict().items()}
    sampler = make_sampler("dmd2", denoiser, 0, num_classes, resolution, "raw", 0, [CONDITIONING_SIGMA])
    name = os.path.basename(path)
    meta = export_metadata(sampler, arch=arch, sigma_data=SIGMA_DATA, class_names=None, checkpoint=path,
                           checkpoint_sha256=file_sha256(path),
                           imported_from=f"{name} (official DMD2 generator, tianweiy/DMD2)")
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
