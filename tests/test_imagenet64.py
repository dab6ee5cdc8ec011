"""The ImageNet 64x64 benchmark: the ADM architecture, its import from EDM pickles, EDM's dataset format and the
dmd2_imagenet64 preset. CPU, tiny widths, no network access."""
from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dmd2.config.settings import arch_settings
from dmd2.data.batches import build_loader
from dmd2.data.datasets import EDMDataset, build_dataset, image_transform
from dmd2.io.checkpoint import load_checkpoint, network_from_checkpoint
from dmd2.io.import_edm import import_edm
from dmd2.io.import_edm import main as import_main
from dmd2.io.weights import build_denoiser
from dmd2.networks import count_parameters
from dmd2.networks.gan_head import GANHead
from dmd2.networks.precond import EDMPrecond
from tests.conftest import SMOKE, compose_cfg
from tests.test_import_edm import EDMPrecondStandIn, make_persistent, persistence_module

TINY_ADM = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16])  # 1 head at 16x16


def adm_state_names(resolution: int, model_channels: int, channel_mult: list[int], num_blocks: int,
                    attn: list[int], label_dim: int) -> set[str]:
    """Parameter names of EDM's DhariwalUNet, written down from its architecture description: mapping layers,
    enc '<r>x<r>_conv' then per level '_down' (not the first) and '_block<i>'; dec '_in0' (attention), '_in1' at
    the lowest level, '_up' elsewhere, num_blocks + 1 '_block<i>'; every block has norm0, conv0, affine, norm1,
    conv1, a 1x1 'skip' when the width changes (none when only resampling), and norm2/qkv/proj with attention."""
    names = {"map_layer0.weight", "map_layer0.bias", "map_layer1.weight", "map_layer1.bias", "out_norm.weight",
             "out_norm.bias", "out_conv.weight", "out_conv.bias"} | ({"map_label.weight"} if label_dim else set())

    def block(prefix: str, cin: int, cout: int, attention: bool) -> set[str]:
        parts = ["norm0", "conv0", "affine", "norm1", "conv1"] + (["skip"] if cin != cout else [])
        parts += ["norm2", "qkv", "proj"] if attention else []
        return {f"{prefix}.{p}.{w}" for p in parts for w in ("weight", "bias")}

    widths, c = [], model_channels * channel_mult[0]
    names |= {f"enc.{resolution}x{resolution}_conv.weight", f"enc.{resolution}x{resolution}_conv.bias"}
    widths.append(c)
    for level, mult in enumerate(channel_mult):
        r = resolution >> level
        if level:
            names |= block(f"enc.{r}x{r}_down", c, c, False)
            widths.append(c)
        for i in range(num_blocks):
            names |= block(f"enc.{r}x{r}_block{i}", c, model_channels * mult, r in attn)
            c = model_channels * mult
            widths.append(c)
    for level in reversed(range(len(channel_mult))):
        r = resolution >> level
        if level == len(channel_mult) - 1:
            names |= block(f"dec.{r}x{r}_in0", c, c, True) | block(f"dec.{r}x{r}_in1", c, c, False)
        else:
            names |= block(f"dec.{r}x{r}_up", c, c, False)
        for i in range(num_blocks + 1):
            cin = c + widths.pop()
            names |= block(f"dec.{r}x{r}_block{i}", cin, model_channels * channel_mult[level], r in attn)
            c = model_channels * channel_mult[level]
    return names


def test_adm_parameter_names_and_the_published_size():
    net = build_denoiser(arch_settings("adm", **TINY_ADM), 1000, 32, 0.5).net
    expected = adm_state_names(32, 32, [1, 2], 1, [16], 1000)
    assert {k for k in net.state_dict() if "resample_filter" not in k} == expected
    with torch.device("meta"):  # the published width, counted without allocating
        published = build_denoiser(arch_settings("adm"), 1000, 64, 0.5)
    assert count_parameters(published) == 295_899_267  # EDM: "296M"
    assert (published.net.bottleneck_channels, published.net.bottleneck_resolution) == (768, 8)


def test_adm_shapes_bottleneck_gan_head_and_unconditional():
    torch.manual_seed(0)
    den = build_denoiser(arch_settings("adm", **TINY_ADM), 1000, 32, 0.5).eval()
    x, sigma, y = torch.randn(3, 3, 32, 32), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 500, 999])
    with torch.no_grad():
        out, bottleneck = den(x, sigma, y), den.denoise_first(x, sigma, y, len(x))[1]
        part, _ = den.denoise_first(x, sigma, y, 1)
    assert out.shape == x.shape and bottleneck.shape == (3, 64, 16, 16)
    torch.testing.assert_close(part, out[:1])
    assert GANHead(den.net.bottleneck_channels, den.net.bottleneck_resolution)(bottleneck).shape == (3,)
    uncond = build_denoiser(arch_settings("adm", **TINY_ADM), 0, 32, 0.5)
    assert uncond.net.map_label is None and uncond(x, sigma, y).shape == x.shape


def adm_snapshot(path: Path, label_dim: int = 1000, resolution: int = 32) -> EDMPrecond:
    """An EDM ADM snapshot in EDM's on-disk structure (see tests/test_import_edm.py); returns the network."""
    persistence = persistence_module("raise RuntimeError('EDM source must never run')")
    torch.manual_seed(0)
    kwargs = dict(TINY_ADM)
    reference = build_denoiser(arch_settings("adm", **TINY_ADM, dropout=0.1), label_dim, resolution, 0.5)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    for module in list(reference.net.modules())[1:]:
        if not isinstance(module, (nn.ModuleDict, nn.ModuleList)):
            make_persistent(module, persistence)
    make_persistent(reference.net, persistence, "DhariwalUNet", dict(img_resolution=resolution, in_channels=3,
                    out_channels=3, label_dim=label_dim, dropout=0.1, **kwargs))
    ema = EDMPrecondStandIn(reference.net, img_resolution=resolution, img_channels=3, label_dim=label_dim,
                            use_fp16=False, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5)
    make_persistent(ema, persistence, "EDMPrecond", dict(img_resolution=resolution, img_channels=3,
                    label_dim=label_dim, model_type="DhariwalUNet", dropout=0.1, **kwargs))
    with open(path, "wb") as f:
        pickle.dump(dict(ema=ema, dataset_kwargs=dict(path="imagenet-64x64.zip")), f)
    return reference.eval()


def test_an_adm_pickle_imports_with_equal_outputs(tmp_path):
    pkl = tmp_path / "edm-imagenet-64x64-cond-adm.pkl"
    reference = adm_snapshot(pkl)
    state = import_edm(str(pkl))
    assert state["arch"] == arch_settings("adm", **TINY_ADM, dropout=0.1)
    imported = network_from_checkpoint(state, "ema").eval()
    x, sigma, y = torch.randn(4, 3, 32, 32), torch.tensor([0.002, 0.5, 5.0, 80.0]), torch.tensor([1, 2, 998, 999])
    with torch.no_grad():
        torch.testing.assert_close(imported(x, sigma, y), reference(x, sigma, y), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ EDM dataset


def make_edm_dataset(root: Path, n: int = 12, num_classes: int = 1000, size: int = 32, as_zip: bool = True,
                     labels: bool = True) -> Path:
    """Images and dataset.json laid out as EDM's dataset_tool.py writes them (00000/img00000000.png, ...)."""
    rng = np.random.default_rng(0)
    files = {f"{i // 1000:05d}/img{i:08d}.png": rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(n)}
    meta = {"labels": [[name, (i * 97) % num_classes] for i, name in enumerate(files)] if labels else None}
    if as_zip:
        root.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root, "w") as z:
            for name, img in files.items():
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="png")
                z.writestr(name, buf.getvalue())
            z.writestr("dataset.json", json.dumps(meta))
    else:
        for name, img in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / name)
        (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("as_zip", [True, False])
def test_edm_dataset_reads_images_and_labels_from_a_zip_or_folder(as_zip, tmp_path):
    root = make_edm_dataset(tmp_path / ("data.zip" if as_zip else "data"), as_zip=as_zip)
    ds = build_dataset({"name": "edm_dataset", "root": str(root), "num_classes": 1000, "resolution": 32})
    assert len(ds) == 12 and ds.targets == [(i * 97) % 1000 for i in range(12)]
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 and y == 485
    if as_zip:
        with zipfile.ZipFile(root) as z:
            raw = z.read("00000/img00000005.png")
    else:
        raw = (root / "00000/img00000005.png").read_bytes()
    expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)


def test_edm_dataset_checks_labels_and_class_count(tmp_path):
    unlabelled = make_edm_dataset(tmp_path / "u.zip", labels=False)
    with pytest.raises(ValueError, match="no labels; set data.num_classes=0"):
        build_dataset({"name": "edm_dataset", "root": str(unlabelled), "num_classes": 10, "resolution": 32})
    assert build_dataset({"name": "edm_dataset", "root": str(unlabelled), "num_classes": 0, "resolution": 32})[0][1] == 0
    labelled = make_edm_dataset(tmp_path / "l.zip")
    with pytest.raises(ValueError, match="labels up to 970; set data.num_classes=971"):
        build_dataset({"name": "edm_dataset", "root": str(labelled), "num_classes": 10, "resolution": 32})


@pytest.mark.parametrize("bad, what", [(-1, "integer >= 0"), (3.7, "integer >= 0"), (2.0, "integer >= 0"),
                                       ("3", "integer >= 0"), (None, "integer >= 0")])
def test_edm_dataset_refuses_negative_and_non_integer_labels(bad, what, tmp_path):
    """A -1 label passed the class-count check and crashed training midway; a float label was truncated. Both are
    refused when the dataset is built, naming the file and the entry (FileError: exit status 3)."""
    from dmd2.config.errors import FileError

    root = make_edm_dataset(tmp_path / "d", n=4, num_classes=10, as_zip=False)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"][2][1] = bad
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(FileError, match=rf"'{re.escape(str(root))}': dataset.json labels\[2\] = .*{what}"):
        build_dataset({"name": "edm_dataset", "root": str(root), "num_classes": 10, "resolution": 32})


def test_edm_dataset_resumes_at_the_exact_batch_and_works_in_loader_workers(tmp_path):
    ds = EDMDataset(str(make_edm_dataset(tmp_path / "d.zip", n=24)), image_transform(32))
    loader = iter(build_loader(ds, 4, num_workers=2, seed=3))
    uninterrupted = [next(loader) for _ in range(9)]  # crosses an epoch boundary (6 batches per epoch)
    resumed = iter(build_loader(ds, 4, num_workers=0, seed=3, start_step=5))
    for step in range(5, 9):
        x, y = next(resumed)
        torch.testing.assert_close(x, uninterrupted[step][0])
        torch.testing.assert_close(y, uninterrupted[step][1])


# ------------------------------------------------------------------------------------------------ the preset


@pytest.mark.slow
def test_the_imagenet64_preset_runs_two_steps_on_an_imported_adm(tmp_path):
    pkl = tmp_path / "adm.pkl"
    adm_snapshot(pkl)
    teacher = tmp_path / "adm.pt"
    assert import_main([str(pkl), str(teacher)]) == 0
    data = make_edm_dataset(tmp_path / "imagenet-32x32.zip", n=16)
    out = tmp_path / "run"
    # debug=smoke picks generated data: naming the preset's data again puts the zip back
    from train import train

    train(compose_cfg(["experiment=dmd2_imagenet64", *SMOKE, "arch=from_teacher", "data=edm_dataset",
                       f"data.root={data}", "data.resolution=32", f"teacher_checkpoint={teacher}", "max_steps=2",
                       "batch_size=4", f"output_dir={out}"]))
    state = load_checkpoint(str(out / "dmd2_final.pt"), kind="dmd2")
    cfg = state["config"]  # the preset's keys, except the ratio: debug=smoke's 2 (conf/debug_stage) wins over its 5
    assert (cfg["data"]["name"], cfg["data"]["num_classes"], cfg["dfake_gen_update_ratio"], cfg["gan_classifier"],
            cfg["gen_cls_loss_weight"], cfg["precision"]) == ("edm_dataset", 1000, 2, True, 3e-3, "bf16")
    assert state["arch"]["name"] == "adm" and "gan_head" in state
