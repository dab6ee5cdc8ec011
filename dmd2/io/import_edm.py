"""Import NVIDIA EDM network pickles as teacher checkpoints of this project, without running anything from the file.

    python -m dmd2.import_edm edm-cifar10-32x32-cond-vp.pkl checkpoints/edm_cond_vp.pt

EDM's released networks and its training snapshots (``network-snapshot-*.pkl``) are Python pickles of
``dict(ema=EDMPrecond, loss_fn=..., augment_pipe=..., dataset_kwargs=...)``. Each EDM network class is pickled
through EDM's ``torch_utils.persistence``, which stores the class name, the class's module *source code* and the
object's ``__dict__``. A normal ``pickle.load`` would execute that source. ``read_edm_pickle`` does not: its
unpickler resolves only a fixed list of globals (tensor and storage rebuilding, ordered dicts, sets, torch.nn
containers) and turns every persistent EDM object into an inert ``Record`` (class name + state); the module
source is never looked at. Tensors nested in the pickle are rebuilt from their bytes with
``torch.load(weights_only=True)``. Any other global is refused with a message naming it.

From the records, ``import_edm`` takes the network's recorded constructor arguments (``_init_kwargs``), maps them
to an ``edm_unet`` arch (DDPM++: the ``-vp`` files; NCSN++: the ``-ve`` files) or an ``adm`` arch (the ImageNet-64
``-adm`` file), loads the weights into our
network and writes an ordinary teacher checkpoint (weights in the EMA slot, plus provenance).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import io
import math
import os
import pickle
import pickletools
from typing import Any

import numpy as np
import torch

try:
    from numpy._core import multiarray as _np_multiarray  # NumPy 2
except ImportError:  # NumPy 1
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]

from dmd2.config.errors import FileError, FormatError, run_tool
from dmd2.config.settings import arch_settings
from dmd2.io.checkpoint import save_checkpoint
from dmd2.io.files import file_sha256
from dmd2.io.weights import load_denoiser

# SongUNet's constructor defaults (NVlabs/edm training/networks.py): a pickle records only the arguments that
# were passed, so the rest take these values.
SONGUNET_DEFAULTS: dict[str, Any] = dict(
    label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
    attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type="positional", channel_mult_noise=1,
    encoder_type="standard", decoder_type="standard", resample_filter=[1, 1],
)
# SongUNet's fixed internals, which are settings of our edm_unet: one attention head, GroupNorm eps 1e-6 and at
# most 32 groups, residual sums scaled by sqrt(1/2), positional embedding over 10000 positions.
SONGUNET_FIXED: dict[str, Any] = dict(num_heads=1, norm_eps=1e-6, norm_max_groups=32, skip_scale=math.sqrt(0.5),
                                      max_positions=10000)
# DhariwalUNet's (ADM's) constructor defaults in NVlabs/edm; its internals (channels_per_head 64, ...) are fixed.
DHARIWALUNET_DEFAULTS: dict[str, Any] = dict(
    label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
    attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0,
)
OTHER_PRECONDITIONINGS = {
    "VPPrecond": "VP preconditioning (EDM's baseline-*-vp.pkl files)",
    "VEPrecond": "VE preconditioning (EDM's baseline-*-ve.pkl files)",
    "iDDPMPrecond": "iDDPM preconditioning (EDM's baseline-imagenet-64x64-cond-adm.pkl; the EDM-preconditioned "
                    "edm-imagenet-64x64-cond-adm.pkl imports)",
}


class EDMImportError(FormatError):
    """The file is not an EDM network pickle this importer can read, or it holds something it refuses."""


# ------------------------------------------------------------------------------------------------ safe unpickling


class Record:
    """An object of the pickle, kept as data: ``class_name`` and ``state`` (its pickled ``__dict__``)."""

    class_name = "?"

    def __init__(self, class_name: str | None = None, state: Any = None) -> None:
        if class_name is not None:
            self.class_name = class_name
        self.state = state if state is not None else {}

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Record({self.class_name})"


def _persistent_record(meta: Any) -> Record:
    """Stand-in for torch_utils.persistence._reconstruct_persistent_obj: keep the class name and the state; the
    stored module source is ignored (never compiled, never run)."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise EDMImportError(f"unexpected persistent-object record {type(meta).__name__} (expected EDM's "
                             f"dict(type='class', class_name=..., state=...))")
    return Record(meta["class_name"], meta.get("state"))


class _BoundedReader:
    """A read-only view of ``f`` up to byte ``end``: a read never asks for more than what is left, so a declared
    length cannot make the reader allocate beyond the data."""

    def __init__(self, f: Any, end: int) -> None:
        self.f, self.end = f, end

    def tell(self) -> int:
        return self.f.tell()

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.end - self.f.tell())
        return self.f.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline(max(0, self.end - self.f.tell()))


def check_pickle_lengths(f: Any, end: int) -> None:
    """Walk one pickle's opcodes from ``f``'s position (pickletools: nothing is built); ValueError when a length
    it declares (bytes, strings, frames) runs past byte ``end``, which Python's unpickler would allocate before
    noticing the data is not there. Leaves ``f`` after the pickle's STOP."""
    reader = _BoundedReader(f, end)
    for op, arg, _ in pickletools.genops(reader):
        if op.name == "FRAME" and arg > end - reader.tell():
            raise ValueError(f"a frame of {arg} bytes, but only {end - reader.tell()} remain")


class _StorageSizes(pickle.Unpickler):
    """Reads the persistent ids of a legacy torch.save stream: the bytes each storage declares."""

    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self.nbytes: dict[Any, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        kind = getattr(torch, name, None) if module in ("torch", "torch.storage") and name.endswith("Storage") \
            else None
        if not isinstance(kind, type):
            raise ValueError(f"a tensor's bytes name the global '{module}.{name}'")
        return kind

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")
                and isinstance(pid[1], type) and isinstance(pid[4], int) and pid[4] >= 0):
            raise ValueError(f"unexpected storage record {pid!r:.80}")
        size = torch._utils._element_size(getattr(pid[1], "dtype", torch.uint8))  # type: ignore[attr-defined]
        self.nbytes[pid[2]] = pid[4] * size
        return None


def check_storage_bytes(data: bytes) -> None:
    """ValueError unless ``data`` (a tensor storage as EDM pickles hold it: torch.save's legacy format, four
    pickles then the raw bytes) holds every byte its storages declare: torch.load allocates the declared size
    first and reads afterwards."""
    if data[:2] == b"PK":
        raise ValueError("a tensor stored as a zip archive (EDM pickles hold torch's legacy format)")
    f = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        check_pickle_lengths(f, len(data))
    start = f.tell()
    check_pickle_lengths(f, len(data))
    f.seek(start)
    sizes = _StorageSizes(f)
    sizes.load()
    check_pickle_lengths(f, len(data))  # the storage keys
    declared, present = sum(sizes.nbytes.values()), len(data) - f.tell()
    if declared > present:
        raise ValueError(f"tensor storages declare {declared} bytes, but only {present} are present")


def _storage_from_bytes(data: bytes) -> Any:
    """Stand-in for torch.storage._load_from_bytes, which calls an unrestricted torch.load on the bytes: the
    sizes the bytes declare are checked against their length first (check_storage_bytes)."""
    try:
        check_storage_bytes(data)
    except (ValueError, pickle.UnpicklingError, EOFError) as err:
        raise EDMImportError(f"refusing a tensor: {err}") from None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _CheckedArray(np.ndarray):
    """An ndarray rebuilt from a pickle: its state (shape, dtype, raw bytes) is checked before NumPy sees it."""

    def __setstate__(self, state: Any) -> None:
        shape, dtype, data = (state[1], state[2], state[4]) if isinstance(state, tuple) and len(state) == 5 \
            else (None, None, None)
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
                and isinstance(dtype, np.dtype) and not dtype.hasobject and isinstance(data, bytes)
                and math.prod(shape) * dtype.itemsize == len(data)):
            raise EDMImportError(f"refusing a NumPy array record (shape {shape!r:.40}, dtype {dtype!r:.40}): only "
                                 "arrays of plain numbers whose bytes are all in the file")
        super().__setstate__(state)


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    """NumPy's ndarray reduction, which always passes shape (0,) (the data comes with the state, checked by
    _CheckedArray: no object arrays, exactly the bytes the shape declares); any other shape would allocate an
    array the file does not hold."""
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise EDMImportError(f"refusing a NumPy array record of shape {shape!r:.40} (NumPy pickles use (0,))")
    return _np_multiarray._reconstruct(_CheckedArray, shape, dtype)


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool, backward_hooks: Any, *state: Any) -> torch.Tensor:
    return data  # the weights are all we keep


def _module_class(qualified: str) -> type:
    return type(qualified.rsplit(".", 1)[-1], (Record,), {"class_name": qualified})


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,  # type: ignore[attr-defined]
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): dict,  # EDM's attribute dict: plain data
}
# NumPy scalars and arrays (EDM's layers keep numpy floats such as skip_scale = np.sqrt(0.5)): rebuilt from their
# raw bytes by NumPy's own constructors (the same globals torch.load(weights_only=True) allows).
for _numpy_module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    SAFE_GLOBALS[(_numpy_module, "scalar")] = _np_multiarray.scalar
    SAFE_GLOBALS[(_numpy_module, "_reconstruct")] = _numpy_reconstruct
SAFE_GLOBALS[("numpy", "dtype")] = np.dtype
SAFE_GLOBALS[("numpy", "ndarray")] = np.ndarray
# torch.nn containers pickled inside EDM networks (by class, state restored via BUILD): kept as Records.
SAFE_MODULE_CLASSES = {("torch.nn.modules.container", n) for n in ("ModuleDict", "ModuleList", "Sequential")}


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if (module, name) in SAFE_MODULE_CLASSES:
            return _module_class(f"{module}.{name}")
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise EDMImportError(f"{self.source}: refusing the global '{module}.{name}': an EDM network pickle holds "
                             f"only tensors, containers and EDM network records; nothing from the file was run")

    def persistent_load(self, pid: Any) -> Any:
        raise EDMImportError(f"{self.source}: unexpected persistent id {pid!r} (a torch.save file? this reads EDM "
                             f".pkl files; our own checkpoints load with torch.load)")


def read_edm_pickle(path: str) -> Any:
    """The pickle's content with every EDM object as a Record; refuses anything else (see the module doc). Every
    length the file declares is checked against its bytes before the unpickler allocates it."""
    if not os.path.isfile(path):
        raise FileError(f"{path}: file not found")
    with open(path, "rb") as f:
        try:
            check_pickle_lengths(f, os.path.getsize(path))  # declared lengths against the file's bytes
            f.seek(0)
            return SafeUnpickler(f, path).load()
        except EDMImportError as err:
            raise EDMImportError(str(err) if str(err).startswith(path) else f"{path}: {err}") from None
        except Exception as err:  # truncated or not a pickle at all
            raise EDMImportError(f"{path}: not a readable EDM network pickle (truncated or corrupted?): "
                                 f"{type(err).__name__}: {err}") from err


def record_tensors(record: Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers of a module record and its children, named as in state_dict()."""
    state = record.state
    out: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set", ()) or ())
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None and name not in skip:
                if not isinstance(tensor, torch.Tensor):
                    raise EDMImportError(f"{prefix + name} is a {type(tensor).__name__}, not a tensor")
                if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
                    raise EDMImportError(f"{prefix + name}: a {list(tensor.shape)} view of a "
                                         f"{tensor.untyped_storage().nbytes()}-byte storage (repeated elements); "
                                         "EDM's weights are stored whole")
                out[prefix + name] = tensor.detach().clone()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            if not isinstance(child, Record):
                raise EDMImportError(f"module {prefix + name} is a {type(child).__name__}, not a network record")
            out.update(record_tensors(child, f"{prefix}{name}."))
    return out


# ------------------------------------------------------------------------------------------------ mapping


def find_network(content: Any, source: str) -> Record:
    """The EDMPrecond of a snapshot dict (its ``ema`` entry) or of a pickled network."""
    net = content.get("ema") if isinstance(content, dict) else content
    if not isinstance(net, Record):
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise EDMImportError(f"{source}: no EDM network found (expected a dict with an 'ema' network, got {keys})")
    if net.class_name in OTHER_PRECONDITIONINGS:
        raise EDMImportError(f"{source}: the network uses {OTHER_PRECONDITIONINGS[net.class_name]}; only EDM "
                             f"preconditioning (EDMPrecond, the edm-*.pkl files) is supported")
    if net.class_name != "EDMPrecond":
        raise EDMImportError(f"{source}: the 'ema' network is a {net.class_name}, expected EDMPrecond")
    return net


def init_kwargs(record: Record, source: str) -> dict[str, Any]:
    args, kwargs = record.state.get("_init_args", ()), record.state.get("_init_kwargs")
    if args or not isinstance(kwargs, dict):
        raise EDMImportError(f"{source}: {record.class_name} has no recorded keyword arguments (not saved by EDM's "
                             f"persistence?)")
    return dict(kwargs)


def edm_arch(model: Record, source: str) -> tuple[dict[str, Any], int, int]:
    """(our arch dict, num_classes, resolution) from the constructor arguments of a SongUNet record (DDPM++ /
    NCSN++: edm_unet) or a DhariwalUNet record (ADM: adm)."""
    if model.class_name == "SongUNet":
        name, defaults, fixed = "edm_unet", SONGUNET_DEFAULTS, SONGUNET_FIXED
    elif model.class_name == "DhariwalUNet":
        name, defaults, fixed = "adm", DHARIWALUNET_DEFAULTS, {"channels_per_head": 64}
    else:
        raise EDMImportError(f"{source}: unknown architecture {model.class_name} (expected SongUNet or DhariwalUNet)")
    kw = {**defaults, **init_kwargs(model, source)}
    try:
        in_channels, out_channels, label_dim, resolution = (
            int(kw[k]) for k in ("in_channels", "out_channels", "label_dim", "img_resolution"))
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise EDMImportError(f"{source}: {model.class_name}'s recorded in/out channels, label_dim and img_resolution "
                             f"must be integers ({type(err).__name__}: {err})") from None
    if in_channels != out_channels:
        raise EDMImportError(f"{source}: in_channels {in_channels} != out_channels {out_channels}")
    values = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kw.items() if k in defaults}
    del values["label_dim"]
    arch = arch_settings(name, in_channels=in_channels, **values, **fixed)
    return arch, label_dim, resolution


def import_edm(path: str) -> dict[str, Any]:
    """An EDM network pickle -> the state dict of a teacher checkpoint of this project (not yet written)."""
    net = find_network(read_edm_pickle(path), path)
    precond = init_kwargs(net, path)
    model = (net.state.get("_modules") or {}).get("model")
    if not isinstance(model, Record):
        raise EDMImportError(f"{path}: EDMPrecond has no 'model' network")
    arch, num_classes, resolution = edm_arch(model, path)
    sigma_data = float(net.state.get("sigma_data", precond.get("sigma_data", 0.5)))
    try:
        weights = {"net." + k: v for k, v in record_tensors(model).items()}
    except EDMImportError as err:
        raise EDMImportError(f"{path}: {err}") from None
    total = sum(v.numel() * v.element_size() for v in weights.values())
    if total > os.path.getsize(path):
        raise EDMImportError(f"{path}: the weights would take {total} bytes, more than the file's "
                             f"{os.path.getsize(path)} (tensors sharing their storage)")
    try:  # the recorded arguments against sane bounds and the weights' shapes, before anything is built
        denoiser = load_denoiser(arch, num_classes, resolution, sigma_data, weights)
    except FormatError as err:
        raise EDMImportError(f"{path}: {err}") from None
    ema = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in denoiser.state_dict().items()}
    provenance = {"source": os.path.basename(path), "sha256": file_sha256(path), "format": "NVlabs/edm pickle",
                  "edm_class": f"EDMPrecond/{model.class_name}", "edm_kwargs": repr(precond),
                  "imported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return {
        "kind": "teacher", "step": 0, "arch": arch, "num_classes": num_classes, "resolution": resolution,
        "sigma_data": sigma_data, "sigma_min": float(precond.get("sigma_min", 0.0)),
        "sigma_max": float(precond.get("sigma_max", float("inf"))), "ema": ema, "model": ema,
        "class_names": None, "wandb_run_id": None,
        "config": {"stage": "teacher", "arch": arch, "data": {"num_classes": num_classes, "resolution": resolution},
                   "sigma_data": sigma_data, "imported_from": provenance["source"]},
        "provenance": provenance,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmd2.import_edm", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="an EDM network pickle (edm-*.pkl or network-snapshot-*.pkl)")
    parser.add_argument("output", help="the teacher checkpoint to write (.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file when it exists "
                        "(refused otherwise)")
    args = parser.parse_args(argv)
    return run_tool(parser.prog, lambda: import_command(args.source, args.output, args.overwrite))


def import_command(source: str, output: str, overwrite: bool) -> None:
    """``python -m dmd2.import_edm source output``: import, write, report."""
    if os.path.isdir(output):
        raise FileError(f"{output}: a folder is in the way of the output checkpoint")
    if os.path.lexists(output) and not overwrite:
        raise FileError(f"{output}: already exists; pass --overwrite to replace it")
    state = import_edm(source)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    save_checkpoint(state, output)
    arch = state["arch"]
    kind = "ADM" if arch["name"] == "adm" else "NCSN++" if arch["embedding_type"] == "fourier" else "DDPM++"
    classes = f"{state['num_classes']} classes" if state["num_classes"] else "unconditional"
    print(f"[import_edm] {source} -> {output}: {kind} ({arch['model_channels']} channels, "
          f"mult {arch['channel_mult']}), {classes}, {state['resolution']}x{state['resolution']}, "
          f"sha256 {state['provenance']['sha256'][:12]}")
