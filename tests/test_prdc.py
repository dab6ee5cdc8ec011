"""Precision, recall, density and coverage (dmd2.eval.prdc) and the classifier's class statistics: their math on
point sets with known answers, and on the known-answer mixture against its exact modes (a dropped mode is the
negative control)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmd2.eval.features import FeatureNetwork, classify
from dmd2.eval.measure import Diagnostics, diagnostic_scalars, mixture_diagnostics, score_features
from dmd2.eval.prdc import class_statistics, kth_neighbour_radii, prdc, subsample
from dmd2.eval.references import ReferenceStats
from dmd2.eval.statistics import feature_statistics
from dmd2.method.mixture import make_mixture, mode_distances, true_samples


def test_kth_neighbour_radius_on_a_line():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    assert kth_neighbour_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert kth_neighbour_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 5.0]
    with pytest.raises(ValueError):
        kth_neighbour_radii(x, 4)


def test_identical_sets_score_one_and_disjoint_sets_zero():
    real = np.random.default_rng(0).normal(size=(200, 4))
    same = prdc(real, real.copy(), k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0 and same["density"] >= 1.0
    far = prdc(real, real + 100.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_half_the_reference_missed_halves_recall_and_coverage_not_precision():
    rng = np.random.default_rng(1)
    real = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 50])
    fake = rng.normal(size=(600, 2))  # only the first cluster
    out = prdc(real, fake, k=5)
    assert out["precision"] > 0.95 and abs(out["recall"] - 0.5) < 0.03 and abs(out["coverage"] - 0.5) < 0.03
    assert 0.8 < out["density"] < 1.2  # where samples are, they are as dense as the data: fidelity is intact


def test_class_statistics():
    pred, labels = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 2, 2])
    out = class_statistics(pred, labels, 4)
    assert out["class_histogram"] == pytest.approx([2 / 6, 3 / 6, 1 / 6, 0])
    h = -sum(p * math.log(p) for p in (2 / 6, 3 / 6, 1 / 6)) / math.log(4)
    assert out["class_entropy"] == pytest.approx(h)
    assert out["label_agreement_per_class"][:3] == pytest.approx([1.0, 2 / 3, 0.5])
    assert math.isnan(out["label_agreement_per_class"][3]) and out["label_agreement"] == pytest.approx(4 / 6)
    assert class_statistics(np.zeros(10, int), None, 10)["class_entropy"] == 0.0


def test_subsample_is_seeded_and_keeps_small_sets():
    x = np.arange(20).reshape(10, 2)
    assert subsample(x, 20, 0) is x
    np.testing.assert_array_equal(subsample(x, 4, 3), subsample(x, 4, 3))
    assert len(subsample(x, 4, 3)) == 4


@pytest.fixture(scope="module")
def mixture_sets():
    mix = make_mixture(2, 3, 8, 0.05, 0)
    reference, _ = true_samples(mix, 1000, 0, stream=2)
    x, labels = true_samples(mix, 1000, 0, stream=1)
    return mix, reference, x, labels


def test_mixture_true_samples_cover_every_mode_and_a_dropped_mode_lowers_recall_and_coverage(mixture_sets):
    mix, reference, x, labels = mixture_sets
    diag = Diagnostics(5, 10000)
    true = mixture_diagnostics(mix, x, labels, reference, diag)
    t = true["prdc"]
    # true samples score near 1 (two finite samples of one distribution: about 0.95 at k = 5 and 1000 samples)
    assert min(t["precision"], t["recall"], t["coverage"]) > 0.9 and 0.9 < t["density"] < 1.1
    assert true["classes"]["label_agreement"] == 1.0 and true["classes"]["class_entropy"] == pytest.approx(1.0)
    # negative control: class 0's component 0 (1/6 of the mass) replaced by copies of its component 1
    nearest, _ = mode_distances(mix, x, labels)
    drop, donor = (labels == 0) & (nearest == 0), x[(labels == 0) & (nearest == 1)]
    dropped = x.clone()
    dropped[drop] = donor[torch.arange(int(drop.sum())) % len(donor)]
    d = mixture_diagnostics(mix, dropped, labels, reference, diag)["prdc"]
    # the exact answer: the reference balls around the lost mode (1/6 of them) stay empty
    assert d["coverage"] == pytest.approx(t["coverage"] * 5 / 6, abs=0.03)
    assert d["recall"] == pytest.approx(t["recall"] * 5 / 6, abs=0.04)
    assert abs(d["precision"] - t["precision"]) < 0.05  # what is produced is still realistic


def test_mixture_collapsed_to_one_class_has_zero_class_entropy(mixture_sets):
    mix, reference, x, labels = mixture_sets
    only0 = x[labels == 0]
    collapsed = only0[torch.arange(len(x)) % len(only0)]
    c = mixture_diagnostics(mix, collapsed, labels, reference, Diagnostics(0))
    assert c["prdc"] is None and c["classes"]["class_entropy"] == pytest.approx(0.0)
    assert c["classes"]["label_agreement_per_class"] == pytest.approx([1.0, 0.0])


def test_score_features_adds_prdc_and_the_classifiers_statistics():
    rng = np.random.default_rng(0)
    ref_feats = rng.normal(size=(300, 3)).astype(np.float32)
    feats = rng.normal(size=(200, 3)).astype(np.float32)
    ref = ReferenceStats(*feature_statistics(ref_feats), "test", "test.npz", feats=ref_feats)
    head = torch.nn.Linear(3, 4)
    net = FeatureNetwork("x", "FD (x)", "eval/fd_x", "none", lambda t: t, torch.device("cpu"), "x", classifier=head)
    labels = np.arange(200) % 4
    numbers = score_features(feats, ref, labels=labels, diag=Diagnostics(5), predicted=classify(feats, net))
    assert set(numbers["prdc"]) == {"precision", "recall", "density", "coverage"} and numbers["prdc_k"] == 5
    assert len(numbers["classes"]["class_histogram"]) == 4
    keys = set(diagnostic_scalars(numbers))
    assert keys == {"eval/precision", "eval/recall", "eval/density", "eval/coverage", "eval/class_entropy",
                    "eval/label_agreement"}
    assert score_features(feats, ref)["prdc"] is None  # off by default in the function (the settings turn it on)
