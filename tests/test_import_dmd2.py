"""Importing the official DMD2 generators (python -m dmd2.import_dmd2): a state dict of EDM's EDMPrecond around a
DhariwalUNet, keys prefixed ``model.`` as DMD2 saves them, becomes an export folder that samples as the official
code does (x = G(80 z; sigma 80, one-hot class)). CPU, tiny networks.

The tiny state dicts are written with the official key names: our ``adm`` network's module names are
DhariwalUNet's (checked against NVlabs/edm's own class outside the test suite), so its state dict with EDMPrecond's
``model.`` prefix in place of our wrapper's ``net.`` is the official layout.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dmd2.config.errors import FILE_ERROR, FormatError
from dmd2.config.settings import arch_settings
from dmd2.data.images import to_uint8
from dmd2.io.import_dmd2 import import_dmd2
from dmd2.io.import_dmd2 import main as import_main
from dmd2.io.loaded import load_generator
from dmd2.io.weights import build_denoiser
from tests.conftest import run_cli

# 16 px, two levels; 32 channels (no attention head fits) then 128 (attention, 2 heads of 64), 2 blocks per level
TINY_ADM = dict(model_channels=32, channel_mult=[1, 4], channel_mult_emb=2, num_blocks=2, attn_resolutions=[8],
                dropout=0.0, augment_dim=0)
CLASSES, RES = 5, 16


def official_state_dict(seed: int = 0, **arch: object) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """(state dict with the official key names, our denoiser holding the same weights). Every parameter is
    random (EDM zero-initialises some layers, which would hide a wrongly placed tensor)."""
    torch.manual_seed(seed)
    net = build_denoiser(arch_settings("adm", **{**TINY_ADM, **arch}), CLASSES, RES, 0.5).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    state = {"model." + k[len("net."):]: v.clone() for k, v in net.state_dict().items()}
    return state, net


def official_one_step(net: torch.nn.Module, seeds: list[int], labels: list[int]) -> torch.Tensor:
    """The official sampler, written out: x = G(80 z; sigma 80, one_hot(c)), z seeded as our seed s draws it."""
    from dmd2.io.sampler import per_sample_noise

    z = per_sample_noise(seeds, 0, (3, RES, RES))
    one_hot = torch.eye(CLASSES)[torch.tensor(labels)]
    with torch.no_grad():
        return net(z * 80.0, torch.full((len(seeds),), 80.0), one_hot)


def test_the_architecture_is_read_off_the_tensors_and_the_export_samples_as_the_official_code(tmp_path):
    state, reference = official_state_dict()
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    out = tmp_path / "exports" / "dmd2-tiny"
    assert import_main([str(src), str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    arch = meta["arch"]
    assert (arch["name"], arch["model_channels"], arch["channel_mult"], arch["channel_mult_emb"],
            arch["num_blocks"], arch["attn_resolutions"], arch["augment_dim"], arch["in_channels"]) == (
        "adm", 32, [1, 4], 2, 2, [8], 0, 3)
    assert (meta["kind"], meta["num_classes"], meta["resolution"], meta["sigma_data"]) == ("dmd2", CLASSES, RES, 0.5)
    assert meta["sampler"] == {"denoising_sigmas": [80.0], "nfe": 1}

    gen = load_generator(str(out))
    assert gen.nfe == 1
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(4, 3, RES, RES, generator=g) * 5, torch.tensor([80.0, 10.0, 1.0, 0.1])
    labels = torch.tensor([0, 1, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(gen.sampler.net(x, sigma, labels), reference(x, sigma, labels), rtol=0, atol=0)
    seeds, classes = [0, 1, 2, 7], [0, 1, 2, 2]
    expected = to_uint8(official_one_step(reference, seeds, classes))
    assert torch.equal(gen.sample(labels=classes, seeds=seeds), expected)


def test_safetensors_input_unprefixed_keys_and_another_layout(tmp_path):
    from safetensors.torch import save_file

    state, reference = official_state_dict(seed=1, channel_mult=[2, 2], num_blocks=1, attn_resolutions=[16, 8])
    src = tmp_path / "gen.safetensors"
    save_file({k[len("model."):]: v.contiguous() for k, v in state.items()}, str(src))
    meta, weights = import_dmd2(str(src))
    assert (meta["arch"]["channel_mult"], meta["arch"]["num_blocks"], meta["arch"]["attn_resolutions"]) == (
        [2, 2], 1, [16, 8])
    assert all(torch.equal(weights[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__("model.dec.8x8_in0.qkv.weight", torch.zeros(3 * 128, 64, 1, 1)),
     r"model\.dec\.8x8_in0\.qkv\.weight has shape \[384, 64, 1, 1\], expected \[384, 128, 1, 1\]"),
    (lambda s: s.pop("model.out_conv.bias"), r"model\.out_conv\.bias is missing \(expected shape \[3\]"),
    (lambda s: s.__setitem__("model.extra.weight", torch.zeros(2)), r"unexpected tensor model\.extra\.weight"),
    (lambda s: s.__setitem__("stray", torch.zeros(2)), r"'stray' lacks the 'model\.' prefix"),
    (lambda s: s.__setitem__("model.map_layer0.weight", torch.zeros(70, 32)),
     r"map_layer0 .* is 70 channels, not a multiple of the base width 32"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("model.enc.8x8_block1.")],
     r"level 8x8 has encoder blocks \[0\], expected block0"),
])
def test_what_does_not_fit_is_refused_naming_the_tensor(edit, message, tmp_path):
    state, _ = official_state_dict()
    edit(state)
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    with pytest.raises(FormatError, match=message):
        import_dmd2(str(src))


def test_an_existing_folder_is_never_overwritten_and_bad_files_exit_3(tmp_path, capsys):
    state, _ = official_state_dict()
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # 2 before: the tools exit with the status of the error's class, as the scripts do (FileError, FormatError: 3)
    assert import_main([str(src), str(out)]) == FILE_ERROR
    assert "already exists; refusing to overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "junk.bin").write_bytes(b"not a state dict")
    assert import_main([str(tmp_path / "junk.bin"), str(tmp_path / "new")]) == FILE_ERROR
    assert "not a readable state dict" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_generate_py_samples_the_imported_generator_with_no_extra_flags(tmp_path):
    state, reference = official_state_dict()
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    out = tmp_path / "export"
    assert import_main([str(src), str(out)]) == 0
    images = tmp_path / "images"
    r = run_cli("generate.py", f"checkpoint={out}", "seeds=0-4", f"output_dir={images}", "format=npz")
    assert r.returncode == 0, r.stderr
    arr = np.load(images / "samples.npz")["arr_0"]
    expected = to_uint8(official_one_step(reference, list(range(5)), [s % CLASSES for s in range(5)]))
    assert np.array_equal(arr, expected.permute(0, 2, 3, 1).numpy())


def test_a_huge_declared_architecture_is_refused_before_any_network_is_built(tmp_path, monkeypatch):
    """The arch read off the tensors is checked like any weights from a file (bounds, then its shapes on the meta
    device) before a network exists: a file whose few tensors declare 8192-channel levels (stride-0 views: a few
    bytes on disk, a network of tens of GB) is refused without building anything off the meta device (before:
    the network was built first, then compared)."""
    from dmd2.networks import ARCHITECTURES

    real_adm, devices = ARCHITECTURES["adm"], []

    def meta_only(*args, **kwargs):
        devices.append(torch.empty(0).device.type)  # the default device: "meta" inside torch.device("meta")
        assert devices[-1] == "meta", "a network was built for real before its weights were checked"
        return real_adm(*args, **kwargs)

    state, _ = official_state_dict()
    width = 8192
    state["model.map_layer0.weight"] = torch.zeros(1).expand(2 * width, width)
    state["model.enc.16x16_block0.conv1.weight"] = torch.zeros(1).expand(width, 3, 3, 3)
    state["model.enc.8x8_block0.conv1.weight"] = torch.zeros(1).expand(4 * width, width, 3, 3)
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    assert src.stat().st_size < 2 ** 25  # the tiny network's other tensors: 13 MB
    monkeypatch.setitem(ARCHITECTURES, "adm", meta_only)
    with pytest.raises(FormatError, match=r"tensor model\.\S+ (has shape|is missing|a \[\d+, \d+\] view)"):
        import_dmd2(str(src))
    assert devices in ([], ["meta"])  # refused when read (stride-0 views), else by the meta-device fit


def test_the_imported_export_carries_the_fields_of_every_export(dmd2_run, tmp_path):
    """import_dmd2 writes its metadata through the one writer dmd2.export uses: the same fields, the teacher's
    SHA-256 null (unknown: the official file does not record it) and said to be unknown."""
    state, _ = official_state_dict()
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    assert import_main([str(src), str(tmp_path / "out")]) == 0
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    exported = json.loads((dmd2_run / "generator" / "config.json").read_text())
    assert ours.keys() == exported.keys() and ours["provenance"].keys() == exported["provenance"].keys()
    p = ours["provenance"]
    assert p["teacher_sha256"] is None and p["teacher_checkpoint"] is None
    assert set(p["unknown"]) == {"teacher_checkpoint", "teacher_sha256", "wandb_run_id"}
    assert exported["provenance"]["unknown"] == [] and exported["provenance"]["teacher_sha256"]


def test_a_consistent_architecture_of_expanded_tensors_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """Every tensor a stride-0 view of one zero, all shapes those of an 8192-channel ADM: the meta-device fit
    passes, but the weights are not stored whole (a 4 KB file would have become a multi-GB network)."""
    from dmd2.io.weights import expected_shapes
    from dmd2.networks import ARCHITECTURES

    def never(*args, **kwargs):
        raise AssertionError("a network was built")

    arch = arch_settings("adm", **{**TINY_ADM, "model_channels": 8192})
    shapes = expected_shapes(arch, CLASSES, RES, 0.5)
    state = {"model." + k[len("net."):]: torch.zeros(1, dtype=dtype).expand(shape) if shape else torch.zeros((), dtype=dtype)
             for k, (shape, dtype) in shapes.items()}
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    assert src.stat().st_size < 2 ** 20
    monkeypatch.setitem(ARCHITECTURES, "adm", never)
    with pytest.raises(FormatError, match=r"view of a \d+-byte storage"):
        import_dmd2(str(src))


def test_a_compressed_member_is_refused_before_torch_inflates_it(tmp_path):
    import zipfile

    state, _ = official_state_dict()
    plain, packed = tmp_path / "plain.bin", tmp_path / "packed.bin"
    torch.save(state, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(FormatError, match="compressed member"):
        import_dmd2(str(packed))


def test_level_names_with_two_sides_or_huge_numbers_are_not_levels(tmp_path):
    state, _ = official_state_dict()
    state["model.enc.16x1048576_block9.x"] = torch.zeros(1)
    state["model.enc." + "9" * 5000 + "x1_conv.weight"] = torch.zeros(1)
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    with pytest.raises(FormatError, match="unexpected tensor"):
        import_dmd2(str(src))


def test_non_finite_weights_are_refused_at_import_and_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from dmd2.io.import_dmd2 import import_command

    state, _ = official_state_dict()
    bad = dict(state)
    bad["model.out_conv.weight"] = torch.full_like(state["model.out_conv.weight"], float("nan"))
    torch.save(bad, tmp_path / "nan.bin")
    with pytest.raises(FormatError, match=r"out_conv.weight holds non-finite"):
        import_dmd2(str(tmp_path / "nan.bin"))
    torch.save(state, tmp_path / "ok.bin")
    import_command(str(tmp_path / "ok.bin"), str(tmp_path / "export"))
    weights_file = tmp_path / "export" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights_file), "pt") as f:
        header = f.metadata()
    weights = load_file(str(weights_file))
    weights["net.out_conv.weight"][0] = float("inf")
    save_file(weights, str(weights_file), metadata=header)
    with pytest.raises(FormatError, match="non-finite"):
        load_generator(str(tmp_path / "export"))


def test_a_pickle_is_refused_without_the_advice_to_run_it(tmp_path, capsys):
    import pathlib

    torch.save({"model.x": pathlib.PurePosixPath("/etc")}, tmp_path / "obj.bin")
    assert import_main([str(tmp_path / "obj.bin"), str(tmp_path / "out")]) == FILE_ERROR
    err = capsys.readouterr().err
    assert "pickled Python objects" in err and "weights_only=False" not in err
