"""Untrusted files and values are checked against what they can hold before anything is allocated: seed ranges,
EDM pickles (declared byte counts, tensor views, architectures) and export folders (architecture and resolution
against the weights' bytes). Each refusal must come at once and without a big allocation."""
from __future__ import annotations

import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from dmd2.config.errors import ConfigError, FormatError
from dmd2.config.seeds import MAX_SEEDS, count_seeds, parse_seeds
from dmd2.config.validate import check_settings
from tests.conftest import compose_cfg


@contextmanager
def peak_below(limit_mb: float) -> Iterator[None]:
    """Fail when the Python allocations in the block peak above ``limit_mb`` (tracemalloc: Python objects and
    NumPy / PyTorch CPU buffers allocated through Python's allocator are counted)."""
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < limit_mb * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_seed_ranges_are_checked_without_building_the_list():
    assert count_seeds("0-9,20,30-32") == 14 and count_seeds(["0-99999", 5]) == 100001
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7] and len(parse_seeds(f"0-{MAX_SEEDS - 1}")) == MAX_SEEDS
    cfg = compose_cfg(["checkpoint=x.pt", "seeds=0-99999999"], config_name="generate")
    with peak_below(5):
        with pytest.raises(ConfigError, match=r"'seeds' = '0-99999999'.*at most 1000000 seeds"):
            check_settings(cfg)
        with pytest.raises(ConfigError, match=r"names 100000000 seeds; one run takes at most 1000000"):
            parse_seeds("0-99999999")
        with pytest.raises(ConfigError, match="at most"):
            parse_seeds([f"0-{MAX_SEEDS - 1}", 7])  # the count over every part


# ------------------------------------------------------------------------------------------------ export folders


def crafted_export(source: Path, folder: Path, **changes) -> Path:
    """A copy of the export ``source`` whose config.json has ``changes`` (dotted keys reach into sub-dicts)."""
    import json
    import shutil

    shutil.copytree(source, folder)
    meta = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        target = meta
        for p in parents:
            target = target[p]
        target[last] = value
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("changes,message", [
    ({"arch.emb_dim": 60000}, r"the weights do not fit the simple_unet network .* of another shape"),
    ({"arch.channels": [4096, 8192, 16384, 32768]}, r"weights do not fit .* of another shape"),
    ({"arch.noise_emb_dim": 10 ** 9}, r"noise_emb_dim = 1000000000 \(expected 0 \.\. 65536\)"),
    ({"resolution": 10 ** 6}, r"resolution = 1000000: expected an integer 1 \.\. 1024"),
    ({"num_classes": 10 ** 9}, r"num_classes = 1000000000"),
    ({"arch.num_res_blocks": 10 ** 6}, r"num_res_blocks = 1000000 \(expected 0 \.\. 64\)"),
    ({"arch.channels": list(range(1, 10 ** 5))}, r"channels has 99999 entries"),
    ({"sampler.denoising_sigmas": [80.0] * 10 ** 6}, r"sampler.denoising_sigmas is missing or out of bounds"),
    ({"arch.name": "huge_net"}, r"unknown architecture 'huge_net'"),
])
def test_a_crafted_export_config_is_refused_before_any_network_is_built(dmd2_run, tmp_path, changes, message):
    import dmd2

    folder = crafted_export(dmd2_run / "generator", tmp_path / "crafted", **changes)
    dmd2.load_generator(str(dmd2_run / "generator"))  # the first load's imports are not counted below
    with peak_below(64):
        with pytest.raises(FormatError, match=message) as err:
            dmd2.load_generator(str(folder))
    assert str(folder) in str(err.value)


# ------------------------------------------------------------------------------------------------ EDM pickles


class Reduced:
    """Pickles as ``fn(*args)``: lets a test write the records a hostile file would hold."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class ReducedWithState(Reduced):
    """Pickles as ``fn(*args)`` then ``__setstate__(state)`` (the BUILD opcode)."""

    def __init__(self, fn, args, state) -> None:
        super().__init__(fn, *args)
        self.state = state

    def __reduce__(self):
        return self.fn, self.args, self.state


def edm_records(parameters: dict, **model_kwargs) -> dict:
    """An EDM snapshot dict whose EDMPrecond holds a SongUNet record with ``parameters`` and ``model_kwargs``."""
    from tests.test_import_edm import persistence_module

    persistence = persistence_module("raise RuntimeError('never run')")

    def record(class_name: str, state: dict):
        return Reduced(persistence._reconstruct_persistent_obj, dict(type="class", version=6, module_src="",
                                                                      class_name=class_name, state=state))

    kwargs = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, **model_kwargs)
    model = record("SongUNet", dict(_init_args=(), _init_kwargs=kwargs, _parameters=parameters, _modules={}))
    ema = record("EDMPrecond", dict(_init_args=(), _init_kwargs=dict(sigma_data=0.5), _modules={"model": model}))
    return dict(ema=ema)


def legacy_storage_bytes(numel: int, data: bytes) -> bytes:
    """torch.save's legacy stream of one float32 storage that declares ``numel`` elements and holds ``data``."""
    import io
    import pickle

    import torch
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    class Storage:
        pass

    class Declares(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if isinstance(obj, Storage) else None

    out = io.BytesIO()
    for head in (MAGIC_NUMBER, PROTOCOL_VERSION, dict(protocol_version=PROTOCOL_VERSION, little_endian=True)):
        pickle.dump(head, out)
    Declares(out).dump(Storage())
    pickle.dump(["0"], out)
    out.write(numel.to_bytes(8, "little") + data)
    return out.getvalue()


def hostile_pickles() -> dict:
    import pickle

    import numpy as np
    import torch

    header = b"\x80\x04"
    return {
        # a bytes8 / frame / unicode8 opcode declaring 16-160 GB in a file of a few bytes
        "bytes8": (header + b"\x8e" + (16 << 30).to_bytes(8, "little") + b"xx.", r"expected 17179869184 bytes"),
        "frame": (header + b"\x95" + (160 << 30).to_bytes(8, "little") + b"N.", r"a frame of 171798691840 bytes"),
        "unicode8": (header + b"\x8d" + (20 << 30).to_bytes(8, "little") + b"x.", r"expected 21474836480 bytes"),
        # a tensor storage declaring 4e9 floats (16 GB) with 4 bytes present
        "storage": (pickle.dumps(edm_records({"w": Reduced(torch.storage._load_from_bytes, legacy_storage_bytes(
            4_000_000_000, b"\0" * 4))})), r"refusing a tensor: tensor storages declare 16000000000 bytes, but "
                                           r"only 12 are present"),
        # a 1-element storage viewed as 1e9 elements (stride 0): cloning it would take 4 GB
        "view": (pickle.dumps(edm_records({"w": torch.zeros(1).expand(1_000_000_000)})),
                 r"w: a \[1000000000\] view of a 4-byte storage"),
        # NumPy's array reduction with a shape of 1e10 bytes (NumPy's own pickles use (0,))
        "numpy": (pickle.dumps(edm_records({}, skip=Reduced(np.ndarray.__reduce__(np.zeros(0))[0], np.ndarray,
                                                          (10_000_000_000,), b"b"))),
                  r"refusing a NumPy array record of shape \(10000000000,\)"),
        # NumPy's own (0,) reduction, then a state of 1e9 object entries given by a one-element list (8 GB)
        "numpy_state": (pickle.dumps(edm_records({}, skip=ReducedWithState(
            np.ndarray.__reduce__(np.zeros(0))[0], (np.ndarray, (0,), b"b"),
            (1, (1_000_000_000,), np.dtype("O"), False, [0])))), r"refusing a NumPy array record \(shape"),
        # recorded constructor arguments of a 2e5-channel SongUNet with no weights: refused before any building
        "width": (pickle.dumps(edm_records({}, model_channels=200_000)), r"model_channels = 200000 \(expected"),
        "arch": (pickle.dumps(edm_records({"w": torch.zeros(3)}, model_channels=1024, channel_mult=[1, 2, 2, 2])),
                 r"the weights do not fit the edm_unet network .* missing"),
    }


@pytest.mark.parametrize("name", ["bytes8", "frame", "unicode8", "storage", "view", "numpy", "numpy_state",
                                  "width", "arch"])
def test_a_tiny_hostile_edm_pickle_is_refused_before_allocating(name, tmp_path):
    from dmd2.io.import_edm import EDMImportError, import_edm

    data, message = hostile_pickles()[name]
    pkl = tmp_path / f"{name}.pkl"
    pkl.write_bytes(data)
    assert len(data) < 4096
    with peak_below(64):
        with pytest.raises(EDMImportError, match=message) as err:
            import_edm(str(pkl))
    assert str(err.value).startswith(str(pkl))


def test_a_checkpoint_whose_arch_does_not_fit_its_weights_is_refused_before_building(teacher_ckpt, tmp_path):
    import torch

    import dmd2

    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    state["arch"] = {**state["arch"], "channels": [8192, 16384, 32768, 65536]}
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)
    with pytest.raises(FormatError, match=r"crafted\.pt: the checkpoint's 'ema' weights: the weights do not fit "
                                          r"the simple_unet network"):
        dmd2.load_generator(str(crafted))
