"""Networks from arch dicts (a config's ``arch``, a checkpoint's or an export's), with each architecture's
defaults from the schema (dmd2/config/settings.py).

Weights from a file (a checkpoint, an export, an EDM pickle, an official DMD2 generator) become a network one way
only, ``load_denoiser``: the architecture written down with them is checked against sane limits, then the shapes
of its parameters (the network built on PyTorch's meta device, which allocates nothing) against the weights
actually present, and only then is the network built and the weights loaded. A crafted file thus cannot make the
loader allocate more than the weights it holds."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from dmd2.config.errors import FormatError
from dmd2.config.settings import ARCH_SETTINGS, MAX_RESOLUTION, MAX_WIDTH, arch_settings
from dmd2.networks import ARCHITECTURES
from dmd2.networks.precond import EDMPrecond

assert ARCHITECTURES.keys() == ARCH_SETTINGS.keys(), "every architecture needs its settings in dmd2/config/settings.py"


def complete_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The full arch dict: its architecture's defaults (dmd2/config/settings.py) updated with ``arch``'s values."""
    return arch_settings(arch.get("name"), **{k: v for k, v in arch.items() if k != "name"})


def arch_kwargs(arch: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of an arch dict (``complete_arch``), without ``name``; lists become tuples."""
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in complete_arch(arch).items() if k != "name"}


def build_denoiser(arch: Mapping[str, Any], num_classes: int, resolution: int, sigma_data: float) -> EDMPrecond:
    """Build an EDM denoiser from an arch dict ({"name": ..., **settings}; missing settings take their defaults)."""
    net = ARCHITECTURES[arch["name"]](num_classes=num_classes, resolution=resolution, **arch_kwargs(arch))
    return EDMPrecond(net, sigma_data)


MAX_CLASSES = 100_000  # MAX_RESOLUTION, MAX_WIDTH (any integer field of an arch): the schema's (settings.py)
MAX_BLOCKS = 64  # residual blocks per level (num_blocks, num_res_blocks)
MAX_LIST = 16  # entries of a list field (channel multipliers, attention resolutions, filter taps)
BLOCK_FIELDS = ("num_blocks", "num_res_blocks")


def _field_problem(key: str, value: Any) -> str | None:
    """What is wrong with one arch field (None: within bounds)."""
    if isinstance(value, bool) or key == "name":
        return None
    if isinstance(value, int):
        limit = MAX_BLOCKS if key in BLOCK_FIELDS else MAX_WIDTH
        return None if 0 <= value <= limit else f"{key} = {value} (expected 0 .. {limit})"
    if isinstance(value, float):
        return None if math.isfinite(value) and abs(value) <= MAX_WIDTH else f"{key} = {value} (not a sane number)"
    if isinstance(value, str):
        return None if len(value) <= 64 else f"{key}: a {len(value)}-character string"
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST:
            return f"{key} has {len(value)} entries (at most {MAX_LIST})"
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_WIDTH]
        return f"{key} = {list(value)[:8]} (expected integers 0 .. {MAX_WIDTH})" if bad else None
    return f"{key} is a {type(value).__name__}"


def check_arch_bounds(arch: Any, num_classes: Any, resolution: Any) -> None:
    """FormatError naming the first field of ``arch`` / ``num_classes`` / ``resolution`` out of bounds."""
    if not isinstance(arch, Mapping) or arch.get("name") not in ARCHITECTURES:
        name = arch.get("name") if isinstance(arch, Mapping) else arch
        raise FormatError(f"arch: unknown architecture {name!r} (expected one of {sorted(ARCHITECTURES)})")
    for what, value, limit in (("resolution", resolution, MAX_RESOLUTION), ("num_classes", num_classes, MAX_CLASSES)):
        if isinstance(value, bool) or not isinstance(value, int) or not (what == "num_classes" or value > 0) \
                or not 0 <= value <= limit:
            raise FormatError(f"{what} = {value!r}: expected an integer {int(what == 'resolution')} .. {limit}")
    problems = [p for p in (_field_problem(str(k), v) for k, v in arch.items()) if p]
    if problems:
        raise FormatError(f"arch ({arch['name']}): {'; '.join(problems[:3])}")


def expected_shapes(arch: Mapping[str, Any], num_classes: int, resolution: int,
                    sigma_data: float) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every state-dict entry of the denoiser ``arch`` builds, from a build on the meta device
    (no memory); the bounds are checked first."""
    check_arch_bounds(arch, num_classes, resolution)
    try:
        with torch.device("meta"):
            net = build_denoiser(arch, num_classes, resolution, sigma_data)
    except (TypeError, ValueError, RuntimeError, KeyError, AssertionError, ZeroDivisionError) as err:
        raise FormatError(f"arch ({arch['name']}) does not build: {type(err).__name__}: {err}") from err
    return {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}


class WeightsMismatch(FormatError):
    """The weights present are not the state dict of the network the arch describes: ``missing``, ``unexpected``
    and ``wrong`` (of another shape) name the entries; ``expected`` holds every entry's shape in the network's
    order, ``shapes`` those of the weights present. Importers re-word it in their file's own tensor names."""

    def __init__(self, arch_name: str, expected: Mapping[str, tuple[int, ...]],
                 shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.expected, self.shapes = dict(expected), dict(shapes)
        self.missing = sorted(set(expected) - set(shapes))
        self.unexpected = sorted(set(shapes) - set(expected))
        self.wrong = sorted(k for k in set(expected) & set(shapes) if tuple(expected[k]) != tuple(shapes[k]))
        first = f"; {self.wrong[0]}: {list(shapes[self.wrong[0]])} in the weights, " \
                f"{list(expected[self.wrong[0]])} in the arch" if self.wrong else ""
        super().__init__(f"the weights do not fit the {arch_name} network of the recorded arch ({len(self.missing)} "
                         f"missing {self.missing[:3]}, {len(self.unexpected)} unexpected {self.unexpected[:3]}, "
                         f"{len(self.wrong)} of another shape{first})")


def check_weights_fit(arch: Mapping[str, Any], num_classes: int, resolution: int,
                      shapes: Mapping[str, tuple[int, ...]], sigma_data: float) -> None:
    """FormatError unless ``shapes`` (the weights present: name -> shape) are exactly the state dict of the
    network ``arch`` describes (WeightsMismatch when the arch is sane but the shapes differ); only then may it be
    built for real (its size is then the weights' size)."""
    expected = {k: shape for k, (shape, _) in expected_shapes(arch, num_classes, resolution, sigma_data).items()}
    if expected.keys() != shapes.keys() or any(tuple(expected[k]) != tuple(shapes[k]) for k in expected):
        raise WeightsMismatch(arch["name"], expected, shapes)


def check_stored_whole(weights: Mapping[str, torch.Tensor], file_bytes: int) -> None:
    """FormatError unless every tensor's elements are stored (no stride-0 or overlapping view of a smaller
    storage) and all of them together fit in the ``file_bytes`` of the file they come from: a network built for
    weights that pass is no larger than the file."""
    total = 0
    for name, tensor in weights.items():
        size = tensor.numel() * tensor.element_size()
        if size > tensor.untyped_storage().nbytes():
            raise FormatError(f"tensor {name}: a {list(tensor.shape)} view of a {tensor.untyped_storage().nbytes()}"
                              "-byte storage (repeated elements); weights are stored whole")
        total += size
    if total > file_bytes:
        raise FormatError(f"the weights would take {total} bytes, more than the file's {file_bytes} (tensors "
                          "sharing their storage)")


def check_finite(weights: Mapping[str, torch.Tensor]) -> None:
    """FormatError naming the first floating-point tensor that holds NaN or infinite values (a network with them
    samples black images)."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FormatError(f"tensor {name} holds non-finite values (NaN or inf): not usable weights")


def load_denoiser(arch: Any, num_classes: Any, resolution: Any, sigma_data: float,
                  weights: Any) -> EDMPrecond:
    """The one way weights from a file become a network: ``weights`` (name -> tensor) must be a dict of tensors,
    the arch within bounds and its parameter shapes (on the meta device) exactly those of ``weights``
    (``check_weights_fit``: FormatError otherwise, nothing built), every value finite (``check_finite``); then
    the denoiser is built and loaded."""
    if not isinstance(weights, Mapping) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise FormatError("the weights are not a dict of tensors")
    check_weights_fit(arch, num_classes, resolution, {k: tuple(t.shape) for k, t in weights.items()}, sigma_data)
    check_finite(weights)
    net = build_denoiser(arch, num_classes, resolution, sigma_data)
    net.load_state_dict(weights)
    return net
