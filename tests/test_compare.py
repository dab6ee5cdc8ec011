"""python -m dmd2.compare: runs grouped by the settings that differ, final and best values as mean +- sd over
seeds, CSV numbers and a plot per eval metric."""
from __future__ import annotations

import csv
import os
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dmd2.config.errors import FILE_ERROR, FORMAT_ERROR
from dmd2.eval.compare import find_runs, main, table
from tests.conftest import HANG_GUARD_S, ROOT, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(folder: Path, ratio: int, seed: int, fds: list[float], near: list[float]) -> None:
    """A finished run: config.yaml and metrics.jsonl with evaluations at steps 0, 50, 100 (and a cut last line)."""
    folder.mkdir(parents=True)
    config = {"stage": "distill", "seed": seed, "output_dir": str(folder), "dfake_gen_update_ratio": ratio,
              "data": {"name": "gaussian_mixture", "root": "generated"}, "denoising_sigmas": [80.0],
              "logger": {"name": "none"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": 25, "train/loss_fake": 0.5}]
    rows += [{"step": step, "eval/mixture_fd": fd, "eval/mixture_near": n, "eval/seconds": 1.0}
             for step, fd, n in zip((0, 50, 100), fds, near)]
    (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n" + '{"step": 10')  # cut line


# 2 settings x 3 seeds: (fd at steps 0, 50, 100), (near at steps 0, 50, 100)
RUNS = {1: [([9.0, 2.0, 3.0], [0.1, 0.5, 0.4]), ([9.0, 3.0, 4.0], [0.1, 0.6, 0.5]), ([9.0, 1.0, 5.0], [0.1, 0.7, 0.3])],
        5: [([9.0, 1.2, 1.0], [0.1, 0.8, 0.9]), ([9.0, 1.4, 1.5], [0.1, 0.8, 0.85]), ([9.0, 2.5, 2.0], [0.1, 0.9, 0.7])]}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for ratio, runs in RUNS.items():
        for seed, (fds, near) in enumerate(runs):
            make_run(tmp_path / "sweep" / f"r{ratio}s{seed}", ratio, seed, fds, near)
    (tmp_path / "sweep" / "r1s0" / ".hydra").mkdir()
    (tmp_path / "sweep" / "r1s0" / ".hydra" / "config.yaml").write_text("seed: 0\n")  # Hydra's copy: not a run
    return tmp_path / "sweep"


def pm(values: list[float]) -> str:
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def test_final_and_best_values_over_seeds(sweep):
    header, rows = table(find_runs([str(sweep)]))
    assert header[:2] == ["dfake_gen_update_ratio", "n"]  # seed, output_dir, logger: not settings
    assert header[2:] == ["eval/mixture_fd final", "eval/mixture_fd best (min)", "eval/mixture_near final",
                          "eval/mixture_near best (max)", "steps", "wall s"]  # eval/seconds: a cost, left out
    by_ratio = {row[0]: dict(zip(header, row)) for row in rows}
    for ratio, runs in RUNS.items():
        row = by_ratio[str(ratio)]
        assert row["n"] == "3"
        assert row["eval/mixture_fd final"] == pm([fds[-1] for fds, _ in runs])
        assert row["eval/mixture_fd best (min)"] == pm([min(fds) for fds, _ in runs])     # lower is better
        assert row["eval/mixture_near final"] == pm([near[-1] for _, near in runs])
        assert row["eval/mixture_near best (max)"] == pm([max(near) for _, near in runs])  # higher is better
        assert row["steps"] == "100 ± 0"


def test_cli_writes_markdown_csv_and_plots(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sweep / "r1*"), str(sweep / "r5s0"), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].startswith("| dfake_gen_update_ratio | n | eval/mixture_fd final |")
    assert (out / "compare.md").read_text() == stdout
    written = list(csv.reader(open(out / "compare.csv")))
    assert written[0][:4] == ["dfake_gen_update_ratio", "n", "eval/mixture_fd final mean",
                              "eval/mixture_fd final sd"]
    row = dict(zip(written[0], written[1]))
    assert row["n"] == "3" and float(row["eval/mixture_fd best (min) mean"]) == pytest.approx(2.0)
    assert float(row["eval/mixture_fd best (min) sd"]) == pytest.approx(1.0)
    assert len(written) == 3
    for name in ("compare_mixture_fd.png", "compare_mixture_near.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000


def test_chosen_metric_only(sweep, capsys):
    assert main([str(sweep), "--metric", "eval/mixture_fd"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == ("| dfake_gen_update_ratio | n | eval/mixture_fd final | "
                                                       "eval/mixture_fd best (min) | steps | wall s |")


def test_clear_errors(sweep, tmp_path, capsys):
    assert main([str(tmp_path / "empty*")]) == FILE_ERROR
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == FILE_ERROR
    assert "no runs" in capsys.readouterr().err
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / "config.yaml").write_text("seed: 0\n")
    assert main([str(tmp_path / "crashed")]) == FILE_ERROR
    assert "without metrics.jsonl" in capsys.readouterr().err
    assert main([str(sweep), "--metric", "eval/fid"]) == FILE_ERROR
    assert "no run logged it" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_multirun_end_to_end(tmp_path):
    """Two settings x two seeds of a tiny known-answer teacher, then the command a sweep script ends with."""
    sweep = tmp_path / "multirun"
    proc = run_cli("train.py", "-m", "debug=smoke", "logger=none", "data=gaussian_mixture", "data.num_classes=2",
                   "data.synthetic_per_class=16", "max_steps=2", "sample_every=0", "save_every=2", "eval_every=1",
                   "eval.num_samples=20", "eval.batch_size=20", "lr=1e-4,2e-4", "seed=0,1",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "dmd2.compare", str(sweep), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = proc.stdout.splitlines()[0]
    assert header.startswith("| lr | n | ") and "| eval/mixture_coverage final |" in header
    assert [line.split(" | ")[1] for line in proc.stdout.splitlines()[2:]] == ["2", "2"]
    assert (out / "compare_mixture_fd.png").read_bytes().startswith(PNG)


def measured_run(folder: Path, num: int, reference: str, fid: float) -> None:
    folder.mkdir(parents=True)
    config = {"stage": "distill", "seed": 0, "lr": 1e-4, "eval": {"num_samples": num, "feature_network": {
        "name": "inception", "path": None, "resize": "clean"}, "reference": {"name": reference, "folder": None}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/fid": fid, "eval/fid_std": 0.1}) + "\n")


def test_values_of_different_sample_counts_or_references_never_share_a_column(tmp_path, capsys):
    measured_run(tmp_path / "a", 1000, "auto", 30.0)
    measured_run(tmp_path / "b", 2000, "auto", 20.0)
    header, rows = table(find_runs([str(tmp_path)]))
    assert "eval/fid final" not in header
    assert "eval/fid@1k final" in header and "eval/fid@2k final" in header
    cells = [dict(zip(header, row)) for row in rows]
    assert {(c["eval/fid@1k final"], c["eval/fid@2k final"]) for c in cells} == {("30", ""), ("", "20")}
    assert "eval/fid was measured with different samples" in capsys.readouterr().err
    measured_run(tmp_path / "c", 2000, "cifar10_train", 10.0)  # now the reference differs too
    header, _ = table(find_runs([str(tmp_path)]))
    assert {"eval/fid@2k ref=auto final", "eval/fid@2k ref=cifar10_train final",
            "eval/fid@1k ref=auto final"} <= set(header)
    assert main([str(tmp_path), "--metric", "eval/fid"]) == 0  # the plain name asks for every one of its columns


def test_out_writes_a_contact_sheet_of_each_settings_latest_samples(sweep, tmp_path, capsys):
    from PIL import Image

    for name, size in (("r1s0", 40), ("r5s1", 60)):  # a grid in one run of each setting (r5s0 has none)
        samples = sweep / name / "samples"
        samples.mkdir()
        Image.new("RGB", (size, 10), "red").save(samples / "samples_generator_000050.png")
        Image.new("RGB", (size, 20), "blue").save(samples / "samples_generator_000100.png")  # the latest
        Image.new("RGB", (size, 99), "green").save(samples / "samples_teacher_000000.png")  # not the generator's
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    assert f"[compare] contact sheet: {out / 'contact_sheet.png'}" in capsys.readouterr().err
    sheet = Image.open(out / "contact_sheet.png").convert("RGB")
    assert sheet.width >= 60 and sheet.height == 2 * (14 + 2 + 20) + 8  # two titled panels of the 20-px grids
    assert sheet.getpixel((5, 14 + 2 + 5)) == (0, 0, 255)  # the latest grid (blue), under its title
    capsys.readouterr()
    empty = tmp_path / "none"
    make_run(empty / "r", 1, 0, [1.0, 1.0, 1.0], [0.1, 0.1, 0.1])
    assert main([str(empty), "--out", str(tmp_path / "out2")]) == 0
    assert "no contact sheet: no run has a sample grid" in capsys.readouterr().err


def one_run(folder: Path, rows: list, config: str = "seed: 0\nlr: 1.0\n") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config)
    (folder / "metrics.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return folder


def test_yaml_alias_bomb_and_python_tags_are_refused_at_once(tmp_path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    one_run(tmp_path / "bomb", [{"step": 1, "eval/fd": 1.0}], bomb)
    assert main([str(tmp_path / "bomb")]) == FORMAT_ERROR
    assert "alias" in capsys.readouterr().err
    one_run(tmp_path / "tag", [{"step": 1, "eval/fd": 1.0}], "a: !!python/object/apply:os.system ['true']\n")
    assert main([str(tmp_path / "tag")]) == FORMAT_ERROR
    one_run(tmp_path / "list", [{"step": 1, "eval/fd": 1.0}], "- 1\n")
    assert main([str(tmp_path / "list")]) == FORMAT_ERROR
    assert "expected a mapping" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ['[1, 2]', '3', '{"step": "abc", "eval/fd": 1}', '{"step": 1e400}',
                                 '{"step": Infinity}', '{"eval/fd": 1.0}', '{"step": true}'])
def test_malformed_rows_are_refused_naming_the_line(tmp_path, capsys, bad):
    one_run(tmp_path / "r", [{"step": 1, "eval/fd": 2.0}, bad, {"step": 2, "eval/fd": 1.0}])
    assert main([str(tmp_path / "r")]) == FORMAT_ERROR
    assert "metrics.jsonl:2" in capsys.readouterr().err


def test_non_utf8_unreadable_metrics_and_out_file_are_refused(tmp_path, capsys):
    run = one_run(tmp_path / "r", [{"step": 1, "eval/fd": 2.0}])
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "eval/fd": 2.0}\n{"step": 2, "\xff\xfe": 1.0}\n{"step": 3}\n')
    assert main([str(run)]) == FORMAT_ERROR
    assert "metrics.jsonl:2" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 1, "eval/fd": 2.0}\n')
    (tmp_path / "file").write_text("x")
    assert main([str(run), "--out", str(tmp_path / "file")]) == FILE_ERROR
    assert "cannot write" in capsys.readouterr().err
    if os.geteuid() != 0:
        (run / "metrics.jsonl").chmod(0)
        assert main([str(run)]) == FILE_ERROR
        assert "cannot be read" in capsys.readouterr().err


def test_a_run_reached_twice_counts_once_and_n_is_per_metric(tmp_path):
    one_run(tmp_path / "s" / "a", [{"step": 1, "eval/fd": 2.0}])
    one_run(tmp_path / "s" / "b", [{"step": 1, "eval/fd": 4.0}])
    one_run(tmp_path / "s" / "c", [{"step": 1, "train/loss": 4.0}])  # no eval/fd
    (tmp_path / "link").symlink_to(tmp_path / "s" / "a")
    runs = find_runs([str(tmp_path / "s"), str(tmp_path / "s" / "a") + "/", str(tmp_path / "link")])
    assert len(runs) == 3
    header, rows = table(runs)
    row = dict(zip(header, rows[0]))
    assert row["n"] == "3" and row["eval/fd final"] == "3 ± 1.4 (n=2)"


def test_wall_time_of_a_resumed_run_is_the_sum_of_its_segments(tmp_path):
    rows = [{"step": 1, "wall_s": 10.0}, {"step": 2, "wall_s": 100.0},        # first segment, then stopped
            {"step": 3, "wall_s": 5.0}, {"step": 4, "eval/fd": 1.0, "wall_s": 50.0}]  # resumed
    one_run(tmp_path / "r", rows)
    (run,) = find_runs([str(tmp_path / "r")])
    assert run.seconds == pytest.approx(150.0)
    assert "wall_s" not in run.series


def test_the_logger_stamps_each_row_with_its_segment_seconds(tmp_path):
    from dmd2.train.logger import RunLogger

    logger = RunLogger(str(tmp_path), {"name": "none"}, {}, "train")
    logger.log({"train/loss": 1.0}, 1)
    logger.finish()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and 0 <= row["wall_s"] < 60
