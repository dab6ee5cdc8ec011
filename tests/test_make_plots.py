"""docs/convergence/make_plots.py: the README's convergence figures from run folders, with labels that hold "=" and ","."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("make_plots", ROOT / "docs/convergence/make_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_folder(path: Path, fds: list[float], batch_size: int = 128) -> str:
    path.mkdir(parents=True)
    rows = [{"step": 250 * i, "eval/mixture_fd": fd, "eval/mixture_near": 0.5, "eval/mixture_weight_tv": 0.05}
            for i, fd in enumerate(fds)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text(f"batch_size: {batch_size}\n")
    return str(path)


def test_rows_split_at_the_first_equals_sign_that_leaves_run_folders(tmp_path):
    plots = load_script()
    a = run_folder(tmp_path / "seed0", [3.0, 2.0, 1.0])
    b = run_folder(tmp_path / "lr_decay=none,seed=1", [3.0, 2.5, 1.5])  # a Hydra-style folder name
    assert plots.split_row(f"preset={a},{b}") == ("preset", [a, b])
    assert plots.split_row(f"lr_decay=none={a}") == ("lr_decay=none", [a])
    assert plots.split_row(f"a, b={b}") == ("a, b", [b])
    with pytest.raises(SystemExit, match="LABEL=FOLDER"):  # control: a folder that is not a run
        plots.split_row(f"preset={tmp_path / 'missing'}")
    with pytest.raises(SystemExit, match="LABEL=FOLDER"):
        plots.split_row(a)  # no label


def test_the_figure_is_drawn_from_the_rows(tmp_path, monkeypatch):
    plots = load_script()
    a, b = run_folder(tmp_path / "s0", [3.0, 2.0, 1.0]), run_folder(tmp_path / "s1", [3.0, 2.2, 1.2])
    out = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["make_plots.py", f"lr_decay=none={a},{b}", "--out", str(out),
                                      "--teacher-fd", "0.5"])
    plots.main()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
