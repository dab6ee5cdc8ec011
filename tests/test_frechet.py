"""The reported Frechet distance (the project's eigenvalue form) against clean-fid's, end to end through
clean-fid's own ``compute_fid``; and feature networks given as plain weights plus the module that builds them."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmd2.config.errors import EvaluationError
from dmd2.eval.features import build_feature_network
from dmd2.eval.images import load_image_set
from dmd2.eval.measure import evaluate_images
from dmd2.eval.references import reference_statistics
from dmd2.eval.statistics import feature_statistics, frechet_distance
from tests.conftest import TinyFeatures


pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")


def cleanfid_sqrtm_works() -> bool:
    """clean-fid 0.1.35 calls scipy.linalg.sqrtm(..., disp=False), which newer SciPy no longer takes."""
    from scipy import linalg

    return "disp" in inspect.signature(linalg.sqrtm).parameters


def small_network() -> torch.nn.Module:
    """The builder feature_network.module names in these tests (tests.test_frechet:small_network)."""
    return TinyFeatures()


def write_pngs(folder: Path, n: int, seed: int, shift: float = 0.0) -> None:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 180 + 30 + shift
    x = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    x = (x + 12 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 255).round().to(torch.uint8)
    folder.mkdir(parents=True)
    for i, img in enumerate(x):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "small-featnet.pt"
    torch.save(small_network().state_dict(), path)
    return path


def test_eigenvalue_form_equals_clean_fids_frechet_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 12)), rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    if cleanfid_sqrtm_works():
        from cleanfid.fid import frechet_distance as cleanfid_frechet

        assert ours == pytest.approx(float(cleanfid_frechet(mu1, s1, mu2, s2)), rel=1e-8)
    # a closed form: commuting (diagonal) covariances
    d1, d2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    want = 3.0 + (1 + 4 + 9) * 2 - 2 * (2 + 2 + 9)
    assert frechet_distance(np.ones(3), d1, np.zeros(3), d2) == pytest.approx(want, rel=1e-12)


def test_module_network_loads_plain_weights_and_names_the_fd(weights: Path):
    net = build_feature_network("module", torch.device("cpu"), path=str(weights), resize="none",
                                module="tests.test_frechet:small_network")
    assert net.metric == "FD (small-featnet)" and net.wandb_key == "eval/fd_small-featnet"
    assert net.identity.startswith("mod-small-featnet-")
    reference = TinyFeatures()
    reference.load_state_dict(torch.load(weights, weights_only=True))
    x = torch.rand(2, 3, 32, 32) * 255
    torch.testing.assert_close(net.model(x), reference(x))
    with pytest.raises(EvaluationError, match="cannot import"):
        build_feature_network("module", torch.device("cpu"), path=str(weights), module="tests.nowhere:net")
    torch.save({"conv1.weight": torch.zeros(1)}, weights.parent / "wrong.pt")
    with pytest.raises(EvaluationError, match="cannot load these weights"):
        build_feature_network("module", torch.device("cpu"), path=str(weights.parent / "wrong.pt"),
                              module="tests.test_frechet:small_network")


@pytest.mark.skipif(not cleanfid_sqrtm_works(), reason="clean-fid's compute_fid needs sqrtm(disp=...)")
def test_clean_resize_path_equals_clean_fids_compute_fid(weights: Path, tmp_path: Path):
    from cleanfid import fid as cleanfid

    write_pngs(tmp_path / "gen", 24, seed=1, shift=40)
    write_pngs(tmp_path / "ref", 24, seed=2)
    net = build_feature_network("module", torch.device("cpu"), path=str(weights), resize="clean",
                                module="tests.test_frechet:small_network")
    ref = reference_statistics("folder", net, str(tmp_path / "cache"), folder=str(tmp_path / "ref"))
    images, _ = load_image_set(str(tmp_path / "gen"))
    ours = evaluate_images(images, net, ref, batch_size=8, allow_few_samples=True)["value"]
    theirs = cleanfid.compute_fid(str(tmp_path / "gen"), str(tmp_path / "ref"), mode="clean",
                                  custom_feat_extractor=net.model, device=torch.device("cpu"), num_workers=0,
                                  batch_size=8, verbose=False)
    assert ours > 0.01 and ours == pytest.approx(float(theirs), rel=1e-5)
