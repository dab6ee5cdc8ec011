"""Errors caused by input end the scripts with their message and a documented exit status, without a Python
traceback (README "Exit statuses"); HYDRA_FULL_ERROR=1 adds the traceback. One table of statuses, by error class,
serves every entry point, and README's table is that one."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from dmd2.config import cli, errors
from dmd2.config.cli import stage_of_key
from dmd2.config.errors import CONFIG_ERROR, EVALUATION_ERROR, EXIT_STATUSES, FILE_ERROR, run_tool
from tests.conftest import ROOT, run_cli


def readme_exit_table() -> dict[str, int]:
    """error class -> status, from the rows of README's "Exit statuses" table that name a class."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Exit statuses"):]
    section = section[:section.index("\n#", 1)]
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", section, re.M)
    assert len(rows) == len({name for _, name in rows}), rows
    return {name: int(status) for status, name in rows}


def test_the_readme_table_is_the_code_table():
    assert readme_exit_table() == {cls.__name__: status for cls, status in EXIT_STATUSES.items()}


def test_no_cause_is_a_kind_of_another():
    """An error has one cause, so its status never depends on the order of except clauses."""
    for a, b in itertools.permutations(EXIT_STATUSES, 2):
        assert not issubclass(a, b), (a, b)
    for cls in EXIT_STATUSES:
        assert issubclass(cls, errors.UserError) and errors.exit_status(cls("x")) == EXIT_STATUSES[cls]
    assert errors.exit_status(ValueError("a bug")) is None and errors.exit_status(errors.UserError()) is None


def test_scripts_and_tools_use_the_table(capsys):
    assert cli.exit_status(ConfigCompositionException("no such option")) == CONFIG_ERROR
    assert cli.exit_status(KeyError("a bug")) is None
    for cls, status in EXIT_STATUSES.items():
        assert cli.exit_status(cls("x")) == status

        def work(cls=cls) -> None:
            raise cls("what went wrong")
        assert run_tool("python -m dmd2.tool", work) == status
        assert capsys.readouterr().err == "python -m dmd2.tool: error: what went wrong\n"
    assert run_tool("t", lambda: None) == 0
    with pytest.raises(KeyError):
        run_tool("t", lambda: {}["a bug"])  # a bug keeps its traceback


def assert_user_error(proc, status: int, *words: str) -> None:
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-3000:])


def test_stage_of_key():
    assert stage_of_key("generator_lr") == "distill" and stage_of_key("teacher_checkpoint") == "distill"
    assert stage_of_key("lr") == "teacher" and stage_of_key("p_mean") == "teacher"
    assert stage_of_key("batch_size") is None and stage_of_key("no_such_key") is None


def test_a_key_of_the_other_stage_is_named_as_such(tmp_path):
    proc = run_cli("train.py", "generator_lr=5e-6", cwd=tmp_path)
    assert_user_error(proc, CONFIG_ERROR, "`generator_lr` is a `stage=distill` key: add stage=distill")
    assert "+generator_lr" not in proc.stderr  # Hydra's advice to append the key does not apply
    proc = run_cli("train.py", "stage=distill", "lr=1e-4", cwd=tmp_path)
    assert_user_error(proc, CONFIG_ERROR, "`lr` is a `stage=teacher` key: add stage=teacher")


def test_unknown_keys_and_bad_values_are_config_errors(tmp_path):
    proc = run_cli("evaluate.py", "no_such_key=1", cwd=tmp_path)
    assert_user_error(proc, CONFIG_ERROR, "unknown config key 'no_such_key'", "evaluate.py --help")
    proc = run_cli("train.py", "debug=smoke", "logger=none", "lr=-1", f"output_dir={tmp_path / 'out'}",
                   f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert_user_error(proc, CONFIG_ERROR, "config key 'lr' = -1")


@pytest.mark.slow
def test_a_missing_or_unreadable_file_is_a_file_error(tmp_path):
    missing = tmp_path / "missing.pt"
    proc = run_cli("train.py", "debug=smoke", "logger=none", "stage=distill", f"teacher_checkpoint={missing}",
                   f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert_user_error(proc, FILE_ERROR, "config key 'teacher_checkpoint'", str(missing))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    proc = run_cli("generate.py", f"checkpoint={corrupt}", "device=cpu", f"output_dir={tmp_path / 'gen'}",
                   f"hydra.run.dir={tmp_path / 'hydra2'}", cwd=tmp_path)
    assert_user_error(proc, FILE_ERROR, "config key 'checkpoint'", "corrupt.pt")
    empty = tmp_path / "empty_data"  # a data root without class folders of images
    empty.mkdir()
    proc = run_cli("train.py", "debug=smoke", "logger=none", "data=image_folder", f"data.root={empty}",
                   f"output_dir={tmp_path / 'out2'}", f"hydra.run.dir={tmp_path / 'hydra3'}", cwd=tmp_path)
    assert_user_error(proc, FILE_ERROR, "data.root", "empty_data")


@pytest.fixture()
def checkpoint_info_only(tmp_path: Path) -> Path:
    """A file with the fields evaluate.py reads before it sets up the feature network (no weights)."""
    path = tmp_path / "teacher_000000.pt"
    torch.save({"kind": "teacher", "step": 0}, path)
    return path


@pytest.mark.parametrize("full_error", [False, True])
def test_an_evaluation_setup_error(tmp_path, checkpoint_info_only, full_error):
    proc = run_cli("evaluate.py", f"checkpoint={checkpoint_info_only}", "logger=none", "device=cpu",
                   f"feature_network.inception_weights={tmp_path / 'inception.pt'}",
                   f"output_dir={tmp_path / 'eval'}", f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path,
                   env={"HYDRA_FULL_ERROR": "1" if full_error else "0"})
    assert proc.returncode == EVALUATION_ERROR, proc.stderr[-3000:]
    assert "feature_network.inception_weights" in proc.stderr and "inception-2015-12-05.pt" in proc.stderr
    assert ("Traceback" in proc.stderr) == full_error, proc.stderr[-3000:]


@pytest.mark.parametrize("override", ["+typo=1", "++typo=1", "lr=inf", "seed=1180591620717411303424"])
def test_schema_wide_rule_refuses_before_the_run_takes_its_folder(tmp_path, override):
    out = tmp_path / "out"
    proc = run_cli("train.py", "debug=smoke", "logger=none", override, f"output_dir={out}",
                   f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert_user_error(proc, CONFIG_ERROR, override.lstrip("+").split("=")[0])
    assert not out.exists()  # refused before the lock, data and models


def truncated_jpeg_folder(root: Path) -> Path:
    from tests.conftest import make_image_folder

    make_image_folder(root, num_classes=2, per_class=4)
    bad = root / "class01" / "bad.jpg"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(bad)
    bad.write_bytes(bad.read_bytes()[:200])  # cut mid-stream
    (root / "class01" / "000.png").unlink()  # 8 images: every epoch of batch 2 reads them all
    return bad


def test_a_truncated_image_is_named(tmp_path):
    """PIL's 'image file is truncated' named no file; the data loader (in a worker process too) and the evaluation's
    image reader now name it, and the script exits with a file error without a traceback."""
    from dmd2.config.errors import EvaluationError, FileError
    from dmd2.data.datasets import build_dataset
    from dmd2.eval.images import read_image_file

    bad = truncated_jpeg_folder(tmp_path / "data")
    ds = build_dataset({"name": "image_folder", "root": str(tmp_path / "data"), "num_classes": 2, "resolution": 32})
    index = next(i for i, (path, _) in enumerate(ds.samples) if path.endswith("bad.jpg"))
    with pytest.raises(FileError, match=f"cannot read the image {bad}"):
        ds[index]
    with pytest.raises(EvaluationError, match=f"cannot read the image {bad}"):
        read_image_file(str(bad))
    proc = run_cli("train.py", "debug=smoke", "logger=none", "data=image_folder", f"data.root={tmp_path / 'data'}",
                   "data.num_classes=2", "batch_size=2", "data.num_workers=1", "perf.cache_dataset=false",
                   "max_steps=8", f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}")
    assert_user_error(proc, FILE_ERROR, f"cannot read the image {bad}")
