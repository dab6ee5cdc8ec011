"""benchmarks/bench.py runs end to end at --tiny size on the CPU and writes a complete JSON report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HANG_GUARD_S, ROOT

pytestmark = pytest.mark.slow  # every test here runs bench.py end to end (over 30 s on two CPU cores)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "r.json"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| arch" in proc.stdout  # the table
    return json.loads(out.read_text())


def test_machine_and_settings(report: dict) -> None:
    machine, settings = report["machine"], report["settings"]
    for key in ("platform", "cpu_model", "torch", "device", "device_name", "torch_num_threads"):
        assert machine[key], key
    assert machine["torch_num_threads"] >= 1
    assert settings["batch_size"] >= 1 and settings["tiny"] is True and settings["device"] == "cpu"
    for key in ("archs", "compile", "bf16", "channels_last", "warmup", "iters"):
        assert key in settings, key
    assert "bench.py" in report["command"] and "--tiny" in report["command"]
    assert report["date"] and report["table"] and report["complete"] is True


def test_every_section_has_positive_numbers(report: dict) -> None:
    assert {r["arch"] for r in report["results"]} == set(report["settings"]["archs"])
    for r in report["results"]:
        assert positive(r["params"])
        assert positive(r["teacher_step"]["images_per_sec"]) and positive(r["teacher_step"]["peak_mem_mb"])
        dmd2 = r["dmd2"]
        for key in ("generator_update_step", "fake_score_only_step"):
            assert positive(dmd2[key]["images_per_sec"]) and positive(dmd2[key]["seconds_median"])
            assert positive(dmd2[key]["peak_mem_mb"])
        for r_ in (10, 5):
            avg = dmd2[f"avg_ratio_{r_}"]
            expect = (dmd2["generator_update_step"]["seconds_median"]
                      + (r_ - 1) * dmd2["fake_score_only_step"]["seconds_median"]) / r_
            assert avg["seconds_per_step"] == pytest.approx(expect)
            assert positive(avg["images_per_sec"])
        s = r["sampling"]
        for key, nfe in (("one_step", 1), ("four_step", 4), ("heun_35", 35)):
            assert positive(s[key]["images_per_sec"]) and s[key]["nfe"] == nfe
        assert positive(s["speedup_one_step_vs_heun35"]) and positive(s["peak_mem_mb"])
        f = r["fid_features"]
        assert positive(f["images_per_sec"]) and f["network"]
        assert "inception" in f
        o = r["overhead"]
        assert all(positive(p["seconds_median"]) for p in o["passes"].values())
        for key in ("generator_update_step", "fake_score_only_step", "avg_ratio_10", "avg_ratio_5"):
            assert positive(o[key]["ratio"]) and positive(o[key]["sum_of_passes_s"])
        assert r["memory_kind"]


def test_fast_paths_script_compares_each_switch_with_its_baseline(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    # three of the six settings: each switch runs through the same loop (tests/test_speed.py checks that every
    # switch, torch.compile included, trains like the plain path; compiling here would add half a minute)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "fast_paths.sh"), "--device", "cpu", "--tiny",
                           "--only", "fp32,bf16,channels_last", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert not any(line.startswith(("compile ", "fused_adamw ", "no_tf32 ")) for line in lines)
    for name, base in [("bf16", "fp32"), ("channels_last", "bf16")]:
        row = next(line for line in lines if line.startswith(name + " "))
        assert row.endswith(f"vs {base}") and "missing" not in row, row
    switched = json.loads((tmp_path / "channels_last.json").read_text())["settings"]
    assert switched["channels_last"] is True and switched["bf16"] is True


def test_the_fastgen_benchmark_times_both_variants_and_counts_the_2048_batch(tmp_path: Path) -> None:
    out = tmp_path / "fastgen.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fastgen.py"), "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("official", "fastgen"):
        r = report["steps"][name]
        assert 0 < r["critic_iteration_s"] and 0 < r["generator_iteration_s"]
        assert r["ratio5_mean_s"] == pytest.approx((r["generator_iteration_s"] + 4 * r["critic_iteration_s"]) / 5)
    mem = report["memory"]
    assert mem["activation_mib_per_sample"] > 0 and mem["static_gib"] > 0
    assert [(r["gpus"], r["micro_batch"] * r["rounds"] * r["gpus"]) for r in mem["gpus"]] == [(1, 2048), (4, 2048),
                                                                                              (8, 2048)]
