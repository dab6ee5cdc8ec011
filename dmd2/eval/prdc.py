"""Precision, recall, density and coverage of generated samples against reference samples, from their features,
and the class statistics of a classifier's predictions: pure functions of arrays.

- precision / recall (Kynkaanniemi et al., "Improved Precision and Recall Metric for Assessing Generative
  Models", 2019): each set's manifold is the union of balls around its points with radius the distance to the
  point's k-th nearest neighbour in the same set; precision is the fraction of generated samples inside the
  reference manifold (are samples realistic?), recall the fraction of reference samples inside the generated
  manifold (is the data's variety produced?).
- density / coverage (Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models", 2020):
  density counts, per generated sample, the reference balls containing it, divided by k (about 1 when the two
  distributions agree; above 1 when samples crowd where the data is dense); coverage is the fraction of reference
  balls that contain at least one generated sample (robust to outliers, unlike recall).

One k serves all four: ``PRDC_K`` = 5, Naeem et al.'s recommendation (Kynkaanniemi et al. use k = 3). All four are
better higher; a lost mode lowers recall and coverage, blurry or off-manifold samples lower precision and density.
"""
from __future__ import annotations

import numpy as np
import torch

PRDC_K = 5  # nearest neighbours defining each ball (Naeem et al.'s k)
PRDC_SCORES = ("precision", "recall", "density", "coverage")
CHUNK = 2048  # rows of a distance matrix computed at once


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between rows: a [N,D], b [M,D] -> [N,M] (float64 arithmetic on float64 inputs)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist" if a.dtype == torch.float64 else
                       "use_mm_for_euclid_dist_if_necessary")


def kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of x [N,D] the distance to its k-th nearest other row -> [N] (N > k)."""
    if len(x) <= k:
        raise ValueError(f"need more than k = {k} samples for k-nearest-neighbour radii, got {len(x)}")
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for lo in range(0, len(x), CHUNK):
        d = pairwise_distances(x[lo:lo + CHUNK], x)
        out[lo:lo + CHUNK] = d.kthvalue(k + 1, dim=1).values  # the 1st is the point itself (distance 0)
    return out


def prdc(real: np.ndarray, fake: np.ndarray, k: int = PRDC_K, device: torch.device | str = "cpu") -> dict[str, float]:
    """Precision, recall, density and coverage of generated features ``fake`` [M,D] against reference features
    ``real`` [N,D] with k nearest neighbours (both N and M above k). Distances are computed on ``device`` in
    blocks of rows; float64 inputs stay float64, others are float32."""
    dtype = torch.float64 if real.dtype == np.float64 and fake.dtype == np.float64 else torch.float32
    r = torch.as_tensor(np.ascontiguousarray(real), dtype=dtype, device=device)
    f = torch.as_tensor(np.ascontiguousarray(fake), dtype=dtype, device=device)
    r_radii, f_radii = kth_neighbour_radii(r, k), kth_neighbour_radii(f, k)
    in_real = torch.zeros(len(f), dtype=torch.bool, device=device)      # fake j inside some real ball
    balls_per_fake = torch.zeros(len(f), dtype=torch.float64, device=device)
    real_covered = torch.zeros(len(r), dtype=torch.bool, device=device)  # real ball i holds some fake
    real_in_fake = torch.zeros(len(r), dtype=torch.bool, device=device)  # real i inside some fake ball
    for lo in range(0, len(r), CHUNK):
        d = pairwise_distances(r[lo:lo + CHUNK], f)                      # [n,M]
        inside = d <= r_radii[lo:lo + CHUNK, None]
        in_real |= inside.any(0)
        balls_per_fake += inside.sum(0, dtype=torch.float64)
        real_covered[lo:lo + CHUNK] = inside.any(1)
        real_in_fake[lo:lo + CHUNK] = (d <= f_radii[None, :]).any(1)
    return {"precision": float(in_real.double().mean()), "recall": float(real_in_fake.double().mean()),
            "density": float(balls_per_fake.sum() / (k * len(f))), "coverage": float(real_covered.double().mean())}


def class_statistics(predicted: np.ndarray, labels: np.ndarray | None, num_classes: int) -> dict[str, object]:
    """What a classifier says of generated samples: ``predicted`` [N] class ids (argmax of its logits), ``labels``
    [N] the classes the samples were generated for (None: unconditional). Returns

    - ``class_histogram`` [C]: the fraction of samples predicted as each class;
    - ``class_entropy``: the histogram's entropy over log C (1 = every class equally often, 0 = one class);
    - with labels, ``label_agreement_per_class`` [C] (the fraction of class-c samples predicted as c; NaN for a
      class never asked for) and ``label_agreement`` (over all samples)."""
    c = max(int(num_classes), 1)
    hist = np.bincount(predicted.astype(np.int64), minlength=c)[:c].astype(np.float64) / max(len(predicted), 1)
    nz = hist[hist > 0]
    entropy = max(0.0, float(-(nz * np.log(nz)).sum() / np.log(c))) if c > 1 else 1.0  # never -0.0
    out: dict[str, object] = {"class_histogram": hist.tolist(), "class_entropy": entropy}
    if labels is not None:
        agree = predicted == labels
        per_class = [float(agree[labels == i].mean()) if (labels == i).any() else float("nan") for i in range(c)]
        out.update(label_agreement_per_class=per_class, label_agreement=float(agree.mean()))
    return out


def subsample(feats: np.ndarray, num: int, seed: int) -> np.ndarray:
    """At most ``num`` rows of ``feats`` [N,D], drawn without replacement from ``seed`` (all of them, in order,
    when N <= num)."""
    if len(feats) <= num:
        return feats
    idx = np.sort(np.random.default_rng(seed).choice(len(feats), num, replace=False))
    return feats[idx]
