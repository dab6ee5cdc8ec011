"""Outputs never replace what the user did not ask to replace: export folders, imported checkpoints, generate.py's
folders (class folder names, another model's images) and the reference-statistics cache of an image folder."""
from __future__ import annotations

from pathlib import Path

from dmd2.config.errors import FILE_ERROR
from dmd2.io.export import main as export_main
from dmd2.io.import_edm import main as import_main
from tests.test_import_edm import edm_snapshot


def test_export_refuses_to_replace_files_already_in_the_folder(teacher_ckpt, tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    # 2 before: the tools exit with the status of the error's class, as the scripts do (FileError: 3)
    assert export_main([str(teacher_ckpt), str(folder)]) == FILE_ERROR
    err = capsys.readouterr().err
    assert "README.md already there" in err and "--overwrite" in err
    assert (folder / "README.md").read_text() == "my notes" and sorted(p.name for p in folder.iterdir()) == [
        "README.md"]
    assert export_main([str(teacher_ckpt), str(folder), "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                         "samples.png"]
    assert (folder / "README.md").read_text() != "my notes"
    assert export_main([str(teacher_ckpt), str(folder)]) == FILE_ERROR  # an earlier export is not replaced either
    assert "model.safetensors, config.json, README.md, samples.png already there" in capsys.readouterr().err


def test_import_edm_refuses_to_replace_an_existing_output(tmp_path, capsys):
    pkl, out = tmp_path / "edm.pkl", tmp_path / "teacher.pt"
    edm_snapshot(pkl, "ddpmpp", 10)
    out.write_bytes(b"precious")
    assert import_main([str(pkl), str(out)]) == FILE_ERROR  # 2 before (as above)
    assert f"{out}: already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert import_main([str(pkl), str(out), "--overwrite"]) == 0 and out.stat().st_size > 1000


def test_folder_reference_statistics_follow_the_image_bytes_not_sizes_and_times(featnet, tmp_path):
    """Images replaced by others of the same size, their modification times put back: the cached statistics of
    the old images must not be reused."""
    import os

    import numpy as np
    import torch
    from PIL import Image

    from dmd2.eval.features import build_feature_network
    from dmd2.eval.references import reference_statistics

    folder, cache = tmp_path / "ref", tmp_path / "stats"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = [folder / f"{i}.bmp" for i in range(4)]  # uncompressed: every file has the same size
    for p in paths:
        Image.fromarray(rng.integers(0, 64, (32, 32, 3), dtype=np.uint8)).save(p)
    net = build_feature_network("torchscript", torch.device("cpu"), path=str(featnet), resize="none")
    first = reference_statistics("folder", net, str(cache), folder=str(folder))
    for p in paths:
        st = p.stat()
        Image.fromarray(rng.integers(192, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert p.stat().st_size == st.st_size
    second = reference_statistics("folder", net, str(cache), folder=str(folder))
    assert second.path != first.path and not np.allclose(second.mu, first.mu)
    assert np.allclose(reference_statistics("folder", net, str(cache), folder=str(folder)).mu, second.mu)  # and that is cached in turn


def generate(*overrides: str) -> dict:
    import generate as generate_script
    from tests.conftest import compose_cfg

    return generate_script.generate(compose_cfg(["device=cpu", "batch_size=8", *overrides], config_name="generate"))


def test_class_names_become_safe_distinct_folders_inside_output_dir(teacher_ckpt, tmp_path):
    import generate as generate_script

    names = ["..", "cat", "Cat", "a/b", ".", "grid.png", "dog", "dog", "", "bird"]
    assert generate_script.class_folders(names) == [
        "_-0", "cat-1", "Cat-2", "a_b", "_-4", "grid.png-5", "dog-6", "dog-7", "_-8", "bird"]
    assert generate_script.class_folders(["a", "a", "a-1"]) == ["0-a", "1-a", "2-a-1"]  # still colliding: ids first
    out = tmp_path / "out"
    generate(f"checkpoint={teacher_ckpt}", f"output_dir={out}", "seeds=0-9", "sampler.steps=1",
             f"class_names=[{','.join(repr(n) for n in names)}]")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png"))
    assert written == sorted(["out/grid.png"] + [f"out/{d}/{s:06d}.png" for s, d in enumerate(
        ["_-0", "cat-1", "Cat-2", "a_b", "_-4", "grid.png-5", "dog-6", "dog-7", "_-8", "bird"])])


def test_generate_refuses_a_folder_of_other_images_or_another_model_and_continues_its_own(
        teacher_ckpt, dmd2_run, tmp_path):
    import json

    import pytest

    from dmd2.config.errors import FileError

    out = tmp_path / "out"
    teacher = [f"checkpoint={teacher_ckpt}", f"output_dir={out}", "sampler.steps=1"]
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(FileError, match=r"'output_dir' = .*out' already holds files generate.py did not write "
                                        r"there \(no generate.json: holiday.jpg\).*overwrite=true"):
        generate(*teacher, "seeds=0-3")
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]
    generate(*teacher, "seeds=0-3", "overwrite=true")
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["identity"]["sampler"].startswith("teacher checkpoint") and manifest["checkpoint"] == str(
        teacher_ckpt)
    generate(*teacher, "seeds=4-5")  # the same model and settings: continuing
    assert (out / "class04" / "000004.png").is_file() and (out / "class00" / "000000.png").is_file()
    with pytest.raises(FileError, match=r"holds images of another model or settings \(generate.json differs in "
                                        r"weights_sha256, sampler\)"):
        generate(f"checkpoint={dmd2_run / 'dmd2_final.pt'}", f"output_dir={out}", "seeds=6-7")
    with pytest.raises(FileError, match=r"differs in sampler\)"):  # the same weights, another Heun step count
        generate(f"checkpoint={teacher_ckpt}", f"output_dir={out}", "sampler.steps=2", "seeds=6-7")
    assert not (out / "class06").exists()
    # the export of a checkpoint is the same model: it continues the checkpoint's folder
    generate(f"checkpoint={dmd2_run / 'dmd2_final.pt'}", f"output_dir={tmp_path / 'g'}", "seeds=0-1")
    generate(f"checkpoint={dmd2_run / 'generator'}", f"output_dir={tmp_path / 'g'}", "seeds=2-3")


def test_a_data_set_file_is_fingerprinted_by_its_bytes(tmp_path):
    import os

    from dmd2.eval.images import data_fingerprint

    archive = tmp_path / "data.zip"
    archive.write_bytes(b"A" * 64)
    data = {"name": "edm_dataset", "root": str(archive), "resolution": 32, "num_classes": 10}
    before = data_fingerprint(data)
    st = archive.stat()
    archive.write_bytes(b"B" * 64)
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data_fingerprint(data) != before
