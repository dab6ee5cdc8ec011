"""The eval config group (eval=featnet) and the optional, git-ignored local group of machine-specific paths."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dmd2.config.errors import FileError
from dmd2.config.validate import validate
from dmd2.train.objective import eval_metric_keys
from tests.conftest import CONF, ROOT, SMOKE, compose_cfg

FEATNET = [*SMOKE, "stage=teacher", "eval=featnet", "eval_every=2"]


def compose_with_local(tmp_path: Path, local: str | None, overrides: list[str]):
    """Compose train.py's config from a copy of conf/ with ``local`` as conf/local/default.yaml (None: no file)."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "local" / "default.yaml").unlink(missing_ok=True)
    if local is not None:
        (conf / "local" / "default.yaml").write_text(local)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_eval_featnet_takes_the_network_from_the_local_file(tmp_path, featnet):
    local = f"# @package _global_\npaths:\n  featnet: {featnet}\n"
    cfg = compose_with_local(tmp_path, local, FEATNET)
    fn = cfg.eval.feature_network
    assert (fn.name, fn.path, fn.resize, cfg.eval.reference.name) == ("torchscript", str(featnet), "none", "auto")
    validate(cfg)
    assert eval_metric_keys(cfg)[0] == "eval/fd_tiny-featnet"
    # the command line still wins over the local file
    other = tmp_path / "other-featnet.ts.pt"
    assert compose_with_local(tmp_path / "b", local, [*FEATNET, f"paths.featnet={other}"]).eval.feature_network.path \
        == str(other)


def test_without_a_local_file_nothing_changes_and_featnet_says_where_its_path_goes(tmp_path):
    assert compose_with_local(tmp_path, None, SMOKE).paths.featnet is None
    cfg = compose_with_local(tmp_path / "b", None, FEATNET)
    with pytest.raises(FileError, match="paths.featnet.*conf/local/default.yaml"):
        validate(cfg)
    assert compose_cfg(SMOKE).eval.feature_network.name == "inception"  # no eval group: the eval.* defaults


def test_the_local_file_is_git_ignored_and_its_example_is_not():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("conf/local/default.yaml")
    assert not ignored("conf/local/example.yaml")
    assert (ROOT / "conf" / "local" / "example.yaml").is_file()
