"""Images to measure (evaluate.py images=<folder|zip|npz>) and the reference file it writes (write_reference=) are
untrusted input: each image is counted once, every error is a named refusal, and a small file never decodes to
gigabytes (headers and declared sizes are checked before anything is decoded)."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate as evaluate_script
from dmd2.config.errors import EvaluationError, FileError
from dmd2.eval.images import load_image_set
from tests.conftest import compose_cfg


def png(side: int = 8, value: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (value, value, value)).save(out, format="PNG")
    return out.getvalue()


def image_folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i}.png").write_bytes(png(value=10 * i))
    return root


def test_a_symlink_loop_in_a_folder_counts_each_image_once(tmp_path):
    folder = image_folder(tmp_path / "imgs")
    os.symlink(".", folder / "c0" / "loop")
    os.symlink(folder / "c1" / "0.png", folder / "c1" / "again.png")
    images, labels = load_image_set(str(folder))
    assert len(images) == 6 and list(labels) == [0, 0, 0, 1, 1, 1]


def make_zip(path: Path, members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(path, "w", method) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def test_zip_members_twice_resource_forks_and_truncated_pngs(tmp_path):
    good = [(f"c{c}/{i}.png", png(value=i)) for c in range(2) for i in range(2)]
    images, _ = load_image_set(str(make_zip(tmp_path / "ok.zip", good + [("__MACOSX/c0/._0.png", b"\0\5\26\7"),
                                                                        ("c0/._1.png", b"junk")])))
    assert len(images) == 4
    with pytest.raises(EvaluationError, match=r"c0/0.png is in the zip twice"):
        load_image_set(str(make_zip(tmp_path / "twice.zip", good + [good[0]])))
    with pytest.raises(EvaluationError, match=r"cannot read the image .*cut.zip/c1/1.png"):
        load_image_set(str(make_zip(tmp_path / "cut.zip", good[:-1] + [("c1/1.png", png()[:40])])))


def test_a_zip_member_of_zeros_or_a_huge_png_is_refused_before_it_is_decoded(tmp_path):
    zeros = make_zip(tmp_path / "zeros.zip", [("a.png", png()), ("b.png", b"\0" * (64 << 20))])
    assert zeros.stat().st_size < 1 << 20
    with pytest.raises(EvaluationError, match=r"cannot read the image .*zeros.zip/b.png"):
        load_image_set(str(zeros))
    big = io.BytesIO()
    Image.new("1", (8000, 8000)).save(big, format="PNG")  # 1-bit: a few KB; as RGB it would be 192 MB
    with pytest.raises(EvaluationError, match=r"8000x8000 pixels \(at most 4096"):
        load_image_set(str(make_zip(tmp_path / "big.zip", [("a.png", png()), ("b.png", big.getvalue())])))


def test_npz_headers_are_checked_before_the_arrays_are_read(tmp_path, monkeypatch):
    import dmd2.io.files

    monkeypatch.setattr(dmd2.io.files, "INFLATION_FLOOR", 1 << 20)  # the bound at a small scale (256 MiB in use)
    np.savez_compressed(tmp_path / "bomb.npz", arr_0=np.zeros((40, 128, 128, 3), np.uint8))  # 2 MB of zeros
    assert (tmp_path / "bomb.npz").stat().st_size < 10_000
    with pytest.raises(EvaluationError, match=r"compressed into \d+ \(more than 100 to 1"):
        load_image_set(str(tmp_path / "bomb.npz"))
    np.savez(tmp_path / "obj.npz", arr_0=np.array([None, 1], dtype=object))
    with pytest.raises(EvaluationError, match="holds Python objects"):
        load_image_set(str(tmp_path / "obj.npz"))
    # a header claiming 30 GiB over a few bytes of data
    np.savez(tmp_path / "lie.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with zipfile.ZipFile(tmp_path / "lie.npz") as zf:
        data = zf.read("arr_0.npy")
    lie = data.replace(b"(2, 4, 4, 3), ", b"(640, 4096, 4096, 3), ")[:len(data)]  # same header length
    lie = lie[:lie.index(b"\n")].rstrip() + b" " * (data.index(b"\n") - len(lie[:lie.index(b"\n")].rstrip())) \
        + data[data.index(b"\n"):]
    make_zip(tmp_path / "lie.npz", [("arr_0.npy", lie)], zipfile.ZIP_STORED)
    with pytest.raises(EvaluationError, match=r"declares \d+ bytes .* but the file holds"):
        load_image_set(str(tmp_path / "lie.npz"))


def test_write_reference_refuses_a_folder_a_path_under_a_file_and_an_existing_file(tmp_path):
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "old.npz").write_bytes(b"old")
    base = ["reference.name=folder", f"reference.folder={tmp_path}", "logger=none"]
    for target, message in ((tmp_path / "dir.npz", "not a folder"), (tmp_path / "file" / "r.npz", "is a file"),
                            (tmp_path / "old.npz", "overwrite_reference=true")):
        with pytest.raises(FileError, match=message):
            evaluate_script.validate(compose_cfg([f"write_reference={target}", *base], config_name="evaluate"))
    evaluate_script.validate(compose_cfg([f"write_reference={tmp_path / 'old.npz'}", "overwrite_reference=true",
                                          *base], config_name="evaluate"))


def test_an_edm_zip_with_a_member_twice_or_an_oversized_dataset_json_is_refused(tmp_path, monkeypatch):
    import json

    import dmd2.data.datasets
    from dmd2.data.datasets import EDMDataset

    members = [(f"00000/img{i:08d}.png", png(value=i)) for i in range(4)]
    labels = ("dataset.json", json.dumps({"labels": [[n, 0] for n, _ in members]}).encode())
    assert len(EDMDataset(str(make_zip(tmp_path / "ok.zip", members + [labels])), lambda x: x)) == 4
    with pytest.raises(FileError, match=r"img00000000.png is in the zip twice"):
        EDMDataset(str(make_zip(tmp_path / "twice.zip", members + [members[0], labels])), lambda x: x)
    monkeypatch.setattr(dmd2.data.datasets, "MAX_LABELS_BYTES", 1000)  # 256 MiB in use
    padded = ("dataset.json", labels[1][:-1] + b" " * 2000 + b"}")
    with pytest.raises(FileError, match=r"dataset.json is \d+ bytes \(at most 1000\)"):
        EDMDataset(str(make_zip(tmp_path / "padded.zip", members + [padded])), lambda x: x)
    with pytest.raises(FileError, match=r"dataset.json is not JSON"):
        EDMDataset(str(make_zip(tmp_path / "bad.zip", members + [("dataset.json", b"\xff[")])), lambda x: x)


@pytest.mark.parametrize("kind", ["image_folder", "edm_dataset"])
def test_an_unreadable_training_image_is_skipped_and_counted_within_the_allowed_fraction(kind, tmp_path, caplog):
    import json

    from dmd2.data.datasets import build_dataset

    root = image_folder(tmp_path / "data", classes=2, per_class=5)
    (root / "c1" / "4.png").write_bytes(png()[:40])  # truncated
    if kind == "edm_dataset":
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
        (root / "dataset.json").write_text(json.dumps({"labels": [[f, int(f[1])] for f in files]}))
    data = dict(name=kind, root=str(root), num_classes=2, resolution=8, max_unreadable=0.1)
    ds = build_dataset(data)
    caplog.set_level("WARNING")
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == 10 and "skipped" in caplog.text and "4.png" in caplog.text
    strict = build_dataset({**data, "max_unreadable": 0.0})
    with pytest.raises(FileError, match=r"4.png.*more than data.max_unreadable = 0"):
        [strict[i] for i in range(len(strict))]
