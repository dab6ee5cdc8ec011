"""Checkpoint and export layouts: a checkpoint carries its format version; one of an older layout (no ``format``)
is upgraded when loaded, and then samples, exports and resumes as a current one; exports written before the
current metadata fields still load; checkpoint file names are written and read by one pair of functions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import dmd2
from dmd2.config.errors import FormatError
from dmd2.config.settings import arch_settings
from dmd2.io.checkpoint import checkpoint_name, checkpoint_step, load_checkpoint, save_checkpoint
from dmd2.io.checkpoint_format import CHECKPOINT_FORMAT
from dmd2.io.export import export_generator
from tests.conftest import SMOKE, compose_cfg

SEEDS = list(range(12))


def same(a: Any, b: Any) -> bool:
    """Equal nested dicts / lists of tensors, numbers and strings."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def old_layout(state: dict[str, Any]) -> dict[str, Any]:
    """A dmd2 checkpoint as train.py writes it, in the keys of earlier versions: no ``format``, ``sigma_data``,
    ``denoising_sigmas`` (one step at ``conditioning_sigma``), ``teacher_sha256``, ``class_names``, ``rng_ranks``,
    ``generator_ema``, ``evaluation`` or ``metrics``; bare optimizer states under ``*_optimizer`` next to the
    learning-rate schedulers' states; the arch without the settings that are at their defaults. (The batch
    random stream is kept, so that a resumed run can be compared bitwise.)"""
    old = {k: v for k, v in state.items() if k not in ("format", "sigma_data", "denoising_sigmas", "teacher_sha256",
                                                        "class_names", "rng_ranks", "generator_ema", "evaluation",
                                                        "metrics")}
    for name in ("generator", "guidance"):
        old[f"{name}_optimizer"] = old.pop(f"{name}_updater")["optimizer"]
        old[f"{name}_scheduler"] = {"last_epoch": state["step"], "base_lrs": [1e-4]}
    defaults = arch_settings(state["arch"]["name"])
    old["arch"] = {k: v for k, v in state["arch"].items() if k == "name" or v != defaults[k]}
    assert len(old["arch"]) < len(state["arch"])
    return old


@pytest.fixture()
def old_checkpoint(dmd2_run: Path, tmp_path: Path) -> Path:
    raw = torch.load(dmd2_run / "dmd2_final.pt", map_location="cpu", weights_only=True)
    path = tmp_path / "old" / "dmd2_000005.pt"
    path.parent.mkdir()
    torch.save(old_layout(raw), path)
    return path


def test_checkpoints_carry_their_format_and_a_newer_one_is_refused(tmp_path):
    save_checkpoint({"kind": "teacher", "step": 3}, str(tmp_path / "a.pt"))
    assert torch.load(tmp_path / "a.pt", weights_only=True)["format"] == CHECKPOINT_FORMAT
    torch.save({"kind": "teacher", "step": 3, "format": CHECKPOINT_FORMAT + 1}, tmp_path / "b.pt")
    with pytest.raises(FormatError, match=r"b\.pt: checkpoint format 2; this version of dmd2 reads format 1"):
        load_checkpoint(str(tmp_path / "b.pt"))


def test_an_old_checkpoint_is_upgraded_to_the_current_layout(dmd2_run, old_checkpoint):
    current = load_checkpoint(str(dmd2_run / "dmd2_final.pt"))
    state = load_checkpoint(str(old_checkpoint))
    assert state["format"] == CHECKPOINT_FORMAT and state["sigma_data"] == 0.5
    assert state["denoising_sigmas"] == [state["conditioning_sigma"]] == [80.0]
    assert state["arch"] == current["arch"] and state["rng_ranks"] == [state["rng"]]
    assert same(state["rng_ranks"], current["rng_ranks"])
    for name in ("generator", "guidance"):
        assert f"{name}_optimizer" not in state and f"{name}_scheduler" not in state
        assert same(state[f"{name}_updater"], {"optimizer": current[f"{name}_updater"]["optimizer"], "skipped": 0})
    assert same(state["generator_ema"], current["generator"])  # trained with an EMA: it starts from the weights
    assert (state["teacher_sha256"], state["class_names"], state["evaluation"], state["metrics"]) == (
        None, None, None, {})
    assert same({k: v for k, v in state.items() if k not in ("generator_ema", "teacher_sha256", "class_names",
                                                           "evaluation", "metrics", "generator_updater",
                                                           "guidance_updater")},
                {k: v for k, v in current.items() if k not in ("generator_ema", "teacher_sha256", "class_names",
                                                             "evaluation", "metrics", "generator_updater",
                                                             "guidance_updater")})


def test_an_old_checkpoint_samples_and_exports_as_the_current_one(dmd2_run, old_checkpoint, tmp_path):
    expected = dmd2.load_generator(str(dmd2_run / "dmd2_final.pt"), generator_weights="raw").sample(seeds=SEEDS)
    old = dmd2.load_generator(str(old_checkpoint))
    assert old.metadata["weights"] == "ema"  # the EMA slot, filled from the weights
    assert torch.equal(old.sample(seeds=SEEDS), expected)
    meta = export_generator(str(old_checkpoint), str(tmp_path / "export"))
    assert meta["provenance"]["teacher_sha256"] is None and "teacher_sha256" in meta["provenance"]["unknown"]
    assert meta["arch"] == load_checkpoint(str(dmd2_run / "dmd2_final.pt"))["arch"]
    assert torch.equal(dmd2.load_generator(str(tmp_path / "export")).sample(seeds=SEEDS), expected)
    from dmd2.io.loaded import source_info

    assert source_info(str(old_checkpoint))["step"] == 5


@pytest.mark.slow
def test_an_old_checkpoint_resumes_as_the_current_one(dmd2_run, old_checkpoint, teacher_ckpt, tiny_data, tmp_path):
    """train.py resumes from the upgraded checkpoint: one more step lands on the same weights as the resume
    from the checkpoint as written today (the generator's EMA aside: the old file had none to keep)."""
    from train import train

    base = [*SMOKE, "stage=distill", "data=image_folder", f"data.root={tiny_data}",
            f"teacher_checkpoint={teacher_ckpt}", "max_steps=6", "dfake_gen_update_ratio=2",
            "generator_ema_decay=0.9", "sample_every=0"]
    finals = []
    for name, source in (("old", old_checkpoint), ("current", dmd2_run / "dmd2_final.pt")):
        train(compose_cfg([*base, f"resume={source}", f"output_dir={tmp_path / name}"]))
        finals.append(load_checkpoint(str(tmp_path / name / "dmd2_final.pt")))
    old, current = finals
    assert old["step"] == current["step"] == 6
    for key in ("generator", "fake_unet", "generator_updater", "guidance_updater"):
        assert same(old[key], current[key]), key


def test_an_export_written_before_the_current_fields_still_loads(dmd2_run, tmp_path):
    """Exports written before ``provenance.unknown`` and ``provenance.teacher_sha256`` existed, with an arch
    that lacks settings at their defaults, load (folder and .safetensors file alone) and sample as before."""
    from safetensors.torch import load_file, save_file

    expected = dmd2.load_generator(str(dmd2_run / "generator")).sample(seeds=SEEDS)
    folder = tmp_path / "older"
    shutil.copytree(dmd2_run / "generator", folder)
    meta = json.loads((folder / "config.json").read_text())
    for key in ("unknown", "teacher_sha256"):
        del meta["provenance"][key]
    defaults = arch_settings(meta["arch"]["name"])
    meta["arch"] = {k: v for k, v in meta["arch"].items() if k == "name" or v != defaults[k]}
    (folder / "config.json").write_text(json.dumps(meta))
    weights = load_file(str(folder / "model.safetensors"))  # its header repeats the metadata, as the writer's did
    save_file(weights, str(folder / "model.safetensors"), metadata={"dmd2": json.dumps(meta)})
    alone = tmp_path / "alone.safetensors"
    save_file(load_file(str(folder / "model.safetensors")), str(alone), metadata={"dmd2": json.dumps(meta)})
    for source in (folder, alone):
        gen = dmd2.load_generator(str(source))
        assert torch.equal(gen.sample(seeds=SEEDS), expected), source
        p = gen.metadata["provenance"]
        assert p["teacher_sha256"] is None and p["unknown"] == ["teacher_sha256"]
        assert gen.metadata["arch"] == {**defaults, **meta["arch"]}


def test_checkpoint_file_names_are_written_and_read_by_one_pair_of_functions():
    assert checkpoint_name("dmd2", 10) == "dmd2_000010.pt" and checkpoint_name("teacher", "final") == "teacher_final.pt"
    assert checkpoint_name("teacher", 1234567) == "teacher_1234567.pt"
    assert checkpoint_step("teacher_000010.pt", "teacher") == 10 and checkpoint_step("dmd2_final.pt", "dmd2") == "final"
    for name in ("dmd2_000010.pt", "teacher_x.pt", "teacher_000010.pt.tmp", "teacher_.pt", "my_teacher_000010.pt"):
        assert checkpoint_step(name, "teacher") is None, name
