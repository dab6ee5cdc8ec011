"""The Frechet distance between Gaussians, written with symmetric eigendecompositions: fast for many
distributions against one reference, and exact when their covariances are singular. It is every Frechet distance
the project reports: FID / FD and their bootstrap (dmd2.eval.statistics; clean-fid still extracts and resizes the
features) and the exact scores of data=gaussian_mixture (dmd2.method.mixture). No general (non-symmetric) matrix
square root is taken, so no SciPy routine is needed."""
from __future__ import annotations

from typing import Callable

import numpy as np


def frechet_to_reference(ref_mu: np.ndarray, ref_sigma: np.ndarray) -> Callable[[np.ndarray, np.ndarray], float]:
    """A function (mu [D], sigma [D,D]) -> Frechet distance to N(ref_mu, ref_sigma), for many ``sigma`` against
    one reference: tr sqrt(S R) = sum sqrt(eig(R^1/2 S R^1/2)), with R^1/2 computed once (an eigendecomposition
    per call instead of a general matrix square root). Agrees with clean-fid's ``frechet_distance`` to rounding (tested),
    and stays exact when ``sigma`` is singular (fewer samples than dimensions) as long as ``ref_sigma`` is not."""
    w, v = np.linalg.eigh(np.asarray(ref_sigma, np.float64))
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_ref = float(np.trace(ref_sigma))

    def distance(mu: np.ndarray, sigma: np.ndarray) -> float:
        eig = np.linalg.eigvalsh(root @ sigma @ root)
        diff = mu - ref_mu
        return float(diff @ diff + np.trace(sigma) + trace_ref - 2 * np.sqrt(np.clip(eig, 0, None)).sum())

    return distance


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1 [D], sigma1 [D,D]) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S2^1/2 S1 S2^1/2), in float64 (``frechet_to_reference`` with the
    second Gaussian as the reference; tr sqrt(S1 S2) is the same either way round)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Gaussians of different dimensions: {mu1.shape} / {mu2.shape}, {sigma1.shape} / "
                         f"{sigma2.shape}")
    return frechet_to_reference(mu2, sigma2)(mu1, sigma1)
