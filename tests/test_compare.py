"""python -m dmd2.compare: runs grouped by the settings that differ, mean +- sd over seeds."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from dmd2.compare import find_runs, main, table


def make_run(folder: Path, ratio: int, seed: int, fd: float, steps: int = 100) -> None:
    folder.mkdir(parents=True)
    config = {"stage": "distill", "seed": seed, "output_dir": str(folder), "dfake_gen_update_ratio": ratio,
              "data": {"name": "gaussian_mixture", "root": "generated"}, "denoising_sigmas": [80.0]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": 50, "train/loss_fake": 0.5}, {"step": 0, "eval/mixture_fd": 9.0},
            {"step": steps, "eval/mixture_fd": fd, "eval/mixture_near": 0.5 + seed / 10}]
    (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n" + '{"step": 10')  # cut line


def test_groups_by_the_differing_keys_over_seeds(tmp_path, capsys):
    fds = {1: [3.0, 4.0, 5.0], 5: [1.0, 1.5, 2.0]}
    for ratio, values in fds.items():
        for seed, fd in enumerate(values):
            make_run(tmp_path / "sweep" / f"r{ratio}s{seed}", ratio, seed, fd)
    header, rows = table(find_runs([str(tmp_path / "sweep")]))
    assert header[:2] == ["dfake_gen_update_ratio", "n"]  # seed, output_dir: not settings
    by_ratio = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_ratio["5"]["n"] == "3"
    assert by_ratio["5"]["eval/mixture_fd"] == f"{1.5:.4g} ± {statistics.stdev(fds[5]):.2g}"  # the last value
    assert by_ratio["1"]["eval/mixture_near"] == f"{0.6:.4g} ± {0.1:.2g}"
    assert by_ratio["1"]["steps"] == "100 ± 0"

    assert main([str(tmp_path / "sweep" / "r1*"), str(tmp_path / "sweep" / "r5s0"), "--metric",
                 "eval/mixture_fd", "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| dfake_gen_update_ratio | n | eval/mixture_fd | steps | wall s |"
    written = list(csv.reader(open(tmp_path / "t.csv")))
    assert written[0][:3] == ["dfake_gen_update_ratio", "n", "eval/mixture_fd"] and len(written) == 3


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no runs"):
        main([str(tmp_path)])
