"""Using what was trained: the generator export, dmd2.load_generator, generate.py's seeds / classes / npz, class
names from the data to the files, and W&B artifacts of the run."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dmd2
import generate as generate_script
from dmd2.config.errors import ConfigError, FormatError
from dmd2.config.seeds import parse_seeds
from dmd2.io.checkpoint import load_checkpoint
from dmd2.io.files import file_sha256
from dmd2.io.sampler import per_sample_noise
from dmd2.train.distill import class_names
from tests.conftest import compose_cfg, wandb_artifacts, wandb_records

TINY_CLASSES = [f"class{c:02d}" for c in range(10)]  # tests/conftest.py make_image_folder


def generate(tmp_path: Path, *overrides: str) -> dict:
    """generate.py's own function on a composed config (the CLI is tested in test_distill.py)."""
    return generate_script.generate(compose_cfg(["device=cpu", *overrides], config_name="generate"))


def png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_a_distillation_exports_its_generator_with_metadata(dmd2_run):
    folder, ckpt = dmd2_run / "generator", dmd2_run / "dmd2_final.pt"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png"]
    meta = json.loads((folder / "config.json").read_text())
    state = load_checkpoint(str(ckpt))
    assert (meta["kind"], meta["weights"], meta["sampler"], meta["resolution"]) == (
        "dmd2", "ema", {"denoising_sigmas": [80.0], "nfe": 1}, 32)
    assert meta["class_names"] == TINY_CLASSES and meta["arch"] == state["arch"] and meta["sigma_data"] == 0.5
    p = meta["provenance"]
    assert (p["step"], p["checkpoint"], p["checkpoint_sha256"]) == (5, "dmd2_final.pt", file_sha256(str(ckpt)))
    assert p["teacher_checkpoint"].endswith("teacher_final.pt") and len(p["config_sha256"]) == 16
    assert p["wandb_run_id"] == state["wandb_run_id"] and meta["training_config"]["generator_ema_decay"] == 0.9
    # the generator's EMA weights and nothing else: far smaller than the training checkpoint
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    assert weights.keys() == state["generator_ema"].keys()
    assert all(torch.equal(weights[k], state["generator_ema"][k]) for k in weights)
    assert ckpt.stat().st_size > 5 * (folder / "model.safetensors").stat().st_size
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: dmd2\nlicense: mit\n") and "dmd2.load_generator" in card
    assert "| license | MIT" in card and "![samples](samples.png)" in card
    assert "| quality | not measured during training" in card  # the fixture's run evaluated nothing
    grid = Image.open(folder / "samples.png")  # one row per class (10 rows of 6), their names on the left
    assert grid.height > 10 * 32 and grid.width > 6 * 32


def test_the_model_card_states_the_fd_with_its_sample_count_and_reference():
    from dmd2.io.export import card_metric

    meta = {"provenance": {"step": 400}, "training_config": {"eval": {"num_samples": 2000, "reference": {
        "name": "folder", "folder": "data/cifar10-jpeg/train"}}}}
    line = card_metric(meta, {"eval/fd_featnet": 12.345, "eval/fd_featnet_std": 0.21, "eval/fd_featnet_best": 11.0,
                              "train/loss_dm": 0.5})
    assert line == "fd_featnet = 12.35 ± 0.21 from 2000 samples against folder (data/cifar10-jpeg/train), at step 400"
    meta["training_config"]["eval"]["reference"] = {"name": "auto"}
    assert "against the training data (reference.name=auto)" in card_metric(meta, {"eval/fid": 3.0})


def test_export_load_and_sample_gives_bitwise_the_images_generate_py_writes(dmd2_run, tmp_path):
    seeds = list(range(20))
    written = generate(tmp_path, f"checkpoint={dmd2_run / 'dmd2_final.pt'}", f"output_dir={tmp_path / 'png'}",
                       "seeds=0-19", "batch_size=8")
    assert written["num_images"] == 20 and (tmp_path / "png" / "grid.png").is_file()
    from_pngs = torch.stack([png(tmp_path / "png" / TINY_CLASSES[s % 10] / f"{s:06d}.png") for s in seeds])

    for source in (dmd2_run / "generator", dmd2_run / "generator" / "model.safetensors", dmd2_run / "dmd2_final.pt"):
        gen = dmd2.load_generator(str(source))
        images = gen.sample(seeds=seeds, batch_size=8)
        assert images.dtype == torch.uint8 and images.shape == (20, 3, 32, 32)
        assert torch.equal(images, from_pngs), source

    # npz output (from the export folder): ADM's evaluator layout, readable by numpy alone
    generate(tmp_path, f"checkpoint={dmd2_run / 'generator'}", f"output_dir={tmp_path / 'npz'}", "seeds=0-19",
             "batch_size=8", "format=npz")
    with np.load(tmp_path / "npz" / "samples.npz") as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (20, 32, 32, 3)
        np.testing.assert_array_equal(data["arr_0"], from_pngs.permute(0, 2, 3, 1).numpy())
        np.testing.assert_array_equal(data["arr_1"], [s % 10 for s in seeds])
        np.testing.assert_array_equal(data["seeds"], seeds)
        assert list(data["class_names"]) == TINY_CLASSES


def test_a_seed_gives_its_own_image_whatever_the_other_seeds_and_the_batch_size(dmd2_run):
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7] and parse_seeds(5) == [5] and parse_seeds(["0-1", 9]) == [0, 1, 9]
    for bad in ("3-1", "a", "-2", True):
        with pytest.raises(ConfigError, match="seeds"):
            parse_seeds(bad)
    shape = (1, 3, 32, 32)
    assert torch.equal(per_sample_noise([3, 7], 0, shape), per_sample_noise(range(10), 0, shape)[[3, 7]])
    gen = dmd2.load_generator(str(dmd2_run / "generator"))
    alone = gen.sample(seeds=[7, 3], batch_size=1)
    among = gen.sample(seeds=range(10), batch_size=10)[[7, 3]]
    # the same noise; the network's float rounding may differ with the batch size in the last bit (<= 1 level)
    assert (alone.int() - among.int()).abs().max() <= 1
    assert torch.equal(gen.sample(seeds=[7, 3], batch_size=1), alone)  # and a rerun is bitwise
    with pytest.raises(ConfigError, match="no seeds"):
        gen.sample(seeds=[])


def test_class_names_travel_from_the_data_to_checkpoints_exports_and_outputs(teacher_ckpt, dmd2_run, tmp_path):
    assert load_checkpoint(str(teacher_ckpt))["class_names"] == TINY_CLASSES
    assert load_checkpoint(str(dmd2_run / "dmd2_final.pt"))["class_names"] == TINY_CLASSES
    gen = dmd2.load_generator(str(dmd2_run / "generator"))
    assert gen.class_names == TINY_CLASSES
    by_name = gen.sample(labels=["class03", "class07"], seeds=[3, 7], batch_size=2)
    assert torch.equal(by_name, gen.sample(seeds=[3, 7], batch_size=2))  # seed s of all classes is class s mod 10
    with pytest.raises(ConfigError, match="unknown class 'cat'.*class00"):
        gen.sample(labels="cat", seeds=[0])
    generate(tmp_path, f"checkpoint={dmd2_run / 'generator'}", f"output_dir={tmp_path / 'two'}",
             "classes=[class02,5]", "seeds=0-3")
    assert sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*.png")) == [
        "class02/000000.png", "class02/000002.png", "class05/000001.png", "class05/000003.png", "grid.png"]
    # a dataset whose classes are not the teacher's (same labels, other meanings) is refused for distillation
    assert class_names({"class_names": None}, TINY_CLASSES, "image_folder") == TINY_CLASSES
    with pytest.raises(ConfigError, match="not the teacher's"):
        class_names({"class_names": TINY_CLASSES}, TINY_CLASSES[::-1], "image_folder")


def test_generate_refuses_bad_requests_before_sampling(dmd2_run, tmp_path):
    ckpt = f"checkpoint={dmd2_run / 'dmd2_final.pt'}"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="'output_dir'.*is a file"):
        generate(tmp_path, ckpt, f"output_dir={blocker}")
    with pytest.raises(ConfigError, match="'classes'.*unknown class 'dog'"):
        generate(tmp_path, ckpt, f"output_dir={tmp_path / 'x'}", "classes=[dog]")
    with pytest.raises(ConfigError, match="'seeds'"):
        generate(tmp_path, ckpt, f"output_dir={tmp_path / 'x'}", "seeds=9-1")
    assert not (tmp_path / "x").exists()


def test_hub_layout_loads_through_hf_urls(dmd2_run, monkeypatch):
    """The export folder is what a Hub repository holds: hf://owner/name downloads it (huggingface_hub's
    snapshot_download, replaced here: no network) and loads it like the local folder."""
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[hub\]'"):
        dmd2.load_generator("hf://someone/dmd2-tiny")
    asked = []
    hub = types.SimpleNamespace(snapshot_download=lambda repo_id, allow_patterns: asked.append(
        (repo_id, sorted(allow_patterns))) or str(dmd2_run / "generator"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    gen = dmd2.load_generator("hf://someone/dmd2-tiny")
    assert asked == [("someone/dmd2-tiny", ["README.md", "config.json", "model.safetensors"])]
    assert torch.equal(gen.sample(seeds=[0, 1]), dmd2.load_generator(str(dmd2_run / "generator")).sample(seeds=[0, 1]))


def test_the_distillation_run_logs_its_artifacts_and_teacher_to_offline_wandb(dmd2_run):
    records = wandb_records(dmd2_run)
    run_id = load_checkpoint(str(dmd2_run / "dmd2_final.pt"))["wandb_run_id"]
    artifacts = wandb_artifacts(records)
    assert artifacts == {f"dmd2-{run_id}": ("model", ["final", "latest", "step-5"]),
                         f"generator-{run_id}": ("model", ["final", "latest", "step-5"])}
    config = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
    assert config["inputs"]["teacher"]["path"].endswith("teacher_final.pt")  # the teacher ran without W&B: no artifact
    metrics = {(r.metric.name or r.metric.glob_name): r.metric.step_metric for r in records if r.HasField("metric")}
    assert metrics["train/*"] == metrics["eval/*"] == metrics["samples/*"] == "step"
    keys = {i.key or "/".join(i.nested_key) for r in records if r.HasField("history") for i in r.history.item}
    assert {"train/loss_dm", "step", "samples/generator_ema_table/_type"} <= keys  # a Table of labelled samples


def test_evaluate_py_measures_an_export_as_its_checkpoint(dmd2_run, featnet, tiny_data, tmp_path):
    import evaluate as evaluate_script

    def measure(source: Path, out: str) -> dict:
        args = [f"checkpoint={source}", "feature_network.name=torchscript", f"feature_network.path={featnet}",
                "feature_network.resize=none", "reference.name=folder", f"reference.folder={tiny_data}",
                f"reference.cache_dir={tmp_path / 'stats'}", "num_samples=20", "batch_size=10", "num_workers=0",
                "logger=none", f"output_dir={tmp_path / out}"]
        (row,) = evaluate_script.evaluate(compose_cfg(args, config_name="evaluate"))
        return row

    export, checkpoint = measure(dmd2_run / "generator", "e"), measure(dmd2_run / "dmd2_final.pt", "c")
    assert (export["step"], export["kind"], export["weights"], export["nfe"]) == (5, "dmd2", "ema", 1)
    assert export["value"] == checkpoint["value"] > 0


@pytest.mark.parametrize("sigmas", [[80.0, float("nan")], [80.0, -1.0], [2.0, 80.0], [], [1e300]])
def test_damaged_noise_levels_are_refused_before_sampling(dmd2_run, tmp_path, sigmas):
    """NaN, negative or unordered denoising_sigmas in a checkpoint or an export gave black images; both are
    refused when loaded."""
    import shutil

    state = load_checkpoint(str(dmd2_run / "dmd2_final.pt"))
    state["denoising_sigmas"] = sigmas
    torch.save(state, tmp_path / "dmd2_damaged.pt")
    export = tmp_path / "export"
    shutil.copytree(dmd2_run / "generator", export)
    meta = json.loads((export / "config.json").read_text())
    meta["sampler"]["denoising_sigmas"] = sigmas
    (export / "config.json").write_text(json.dumps(meta))
    for source in (tmp_path / "dmd2_damaged.pt", export):
        with pytest.raises(FormatError, match="denoising_sigmas"):
            dmd2.load_generator(str(source))


def test_a_config_json_of_another_export_or_not_an_export_config_is_refused(dmd2_run, tmp_path, monkeypatch):
    """A kill between the export's two file moves could leave new weights beside the old config.json (loaded as
    the old step): the pair must carry the same provenance. A config.json that is no export's is a FormatError."""
    import shutil

    export = tmp_path / "export"
    shutil.copytree(dmd2_run / "generator", export)
    meta = json.loads((export / "config.json").read_text())
    meta["provenance"]["step"] -= 1
    (export / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="are of different exports"):
        dmd2.load_generator(str(export))
    for text in ("[]", "{}", "{not json", '"x"', "\udcff"):
        (export / "config.json").write_text(text, errors="surrogateescape")
        with pytest.raises(FormatError):
            dmd2.load_generator(str(export))
    from dmd2.io import export_format

    monkeypatch.setattr(export_format, "MAX_CONFIG_BYTES", 100)  # 16 MiB in use
    (export / "config.json").write_text(" " * 200 + "{}")
    with pytest.raises(FormatError, match="larger than 100 bytes"):
        dmd2.load_generator(str(export))
