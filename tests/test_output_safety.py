"""Outputs never replace what the user did not ask to replace: export folders, imported checkpoints, generate.py's
folders (class folder names, another model's images) and the reference-statistics cache of an image folder."""
from __future__ import annotations

from pathlib import Path

from dmd2.export import main as export_main
from dmd2.import_edm import main as import_main
from tests.test_import_edm import edm_snapshot


def test_export_refuses_to_replace_files_already_in_the_folder(teacher_ckpt, tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    assert export_main([str(teacher_ckpt), str(folder)]) == 2
    err = capsys.readouterr().err
    assert "README.md already there" in err and "--overwrite" in err
    assert (folder / "README.md").read_text() == "my notes" and sorted(p.name for p in folder.iterdir()) == [
        "README.md"]
    assert export_main([str(teacher_ckpt), str(folder), "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "README.md").read_text() != "my notes"
    assert export_main([str(teacher_ckpt), str(folder)]) == 2  # an earlier export is not replaced either
    assert "model.safetensors, config.json, README.md already there" in capsys.readouterr().err


def test_import_edm_refuses_to_replace_an_existing_output(tmp_path, capsys):
    pkl, out = tmp_path / "edm.pkl", tmp_path / "teacher.pt"
    edm_snapshot(pkl, "ddpmpp", 10)
    out.write_bytes(b"precious")
    assert import_main([str(pkl), str(out)]) == 2
    assert f"{out}: already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert import_main([str(pkl), str(out), "--overwrite"]) == 0 and out.stat().st_size > 1000
