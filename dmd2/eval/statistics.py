"""Statistics of features: mean and covariance, the Frechet distance (the project's eigenvalue form,
dmd2.method.frechet), KID (clean-fid's) and the bootstrap behind each value's standard deviation. Pure functions of arrays; features are [N,D] (N images, D dimensions)."""
from __future__ import annotations

import numpy as np
from cleanfid.fid import kernel_distance

from dmd2.method.frechet import frechet_distance as gaussian_frechet_distance
from dmd2.method.frechet import frechet_to_reference


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features [N,D] -> (mean [D], covariance [D,D]), float64, as clean-fid computes them (N >= 2)."""
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features [N>=2, D], got shape {feats.shape}")
    return np.mean(feats, axis=0, dtype=np.float64), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1 [D], sigma1 [D,D]) and N(mu2, sigma2): the eigenvalue form of
    dmd2.method.frechet, equal to clean-fid's ``frechet_distance`` (a SciPy ``sqrtm``) to rounding (tested)."""
    return float(gaussian_frechet_distance(mu1, sigma1, mu2, sigma2))


def kernel_inception_distance(feats: np.ndarray, ref_feats: np.ndarray, seed: int = 0) -> float:
    """KID (clean-fid's ``kernel_distance``: 100 subsets of up to 1000) between features [N,D] and [M,D]; the
    random subsets come from ``seed``, so reruns agree, and the global NumPy random state is left as it was."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(ref_feats.astype(np.float64), feats.astype(np.float64)))
    finally:
        np.random.set_state(state)


def bootstrap_indices(rng: np.random.Generator, labels: np.ndarray | None, n: int) -> np.ndarray:
    """One bootstrap resample of n items -> indices [n]: n draws with replacement, within each class when
    ``labels`` [n] are given (the class counts stay as they were: evaluations draw classes round-robin, so a rerun
    with other seeds has the same counts)."""
    if labels is None:
        return rng.integers(0, n, n)
    parts = [members[rng.integers(0, len(members), len(members))]
             for members in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.concatenate(parts)


def resample_statistics(centered: np.ndarray, mean: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D,D]) of a resample that holds item i counts[i] times, from the features centered
    on their mean (``centered`` [N,D] = feats - ``mean`` [D]; ``counts`` [N]): equal to
    ``feature_statistics(feats[idx])`` up to float32 rounding, without copying the features."""
    n = int(counts.sum())
    weights = counts.astype(centered.dtype)
    shift = (weights @ centered).astype(np.float64) / n
    scatter = (centered * weights[:, None]).T @ centered
    cov = (scatter.astype(np.float64) - n * np.outer(shift, shift)) / (n - 1)
    return mean + shift, cov


def bootstrap_std(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, resamples: int, seed: int,
                  ref_feats: np.ndarray | None = None, labels: np.ndarray | None = None
                  ) -> tuple[float | None, float | None]:
    """The sampling noise of FD (and, given ``ref_feats`` [M,D], KID) of the generated features [N,D] against a
    fixed reference N(ref_mu [D], ref_sigma [D,D]): the standard deviation over ``resamples`` bootstrap resamples
    of the generated samples (within each class of ``labels`` [N] when given), i.e. the spread a rerun with other
    seeds would show (the reference is the same in every run, so it is not resampled). Resamples come from
    ``seed``; returns (fd_std, kid_std), None where not computed."""
    if resamples < 2:
        return None, None
    rng = np.random.default_rng(seed)
    distance = frechet_to_reference(ref_mu, ref_sigma)
    mean = feats.mean(axis=0, dtype=np.float64)
    centered = (feats - mean).astype(np.float32)  # one copy for all resamples; no [N,D] float64 per resample
    fds, kids = [], []
    for b in range(resamples):
        idx = bootstrap_indices(rng, labels, len(feats))
        fds.append(distance(*resample_statistics(centered, mean, np.bincount(idx, minlength=len(feats)))))
        if ref_feats is not None:
            kids.append(kernel_inception_distance(feats[idx], ref_feats, seed + 1 + b))
    return float(np.std(fds, ddof=1)), (float(np.std(kids, ddof=1)) if kids else None)
