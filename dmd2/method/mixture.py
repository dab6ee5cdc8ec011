"""A known-answer data set: a class-conditional mixture of Gaussians in image space (``data=gaussian_mixture``).

Class c has K equally weighted components N(mu[c,k], std^2 I) over images [3,R,R] in [-1, 1]; the means are
smooth random images (a 3x3 random field per channel, bilinearly upsampled, squashed into [-0.75, 0.75]), all
drawn from ``mixture_seed``. Because the distribution is known in closed form, so are:

- its per-class moments (``class_moments``), hence a Frechet distance in pixel space to the *exact* data
  distribution rather than to a sample of it;
- which component a sample belongs to, hence mode coverage and the fraction of samples on a mode
  (``mixture_scores``: a sample that blurs two modes lies far from both);
- the posterior mean E[x0 | x0 + sigma n] at every sigma (``exact_denoise``), hence a teacher's error per noise
  level and a distillation whose teacher has no error at all (``ExactDenoiser``, ``exact_teacher=true``).

The data set (``MixtureDataset``) holds ``synthetic_per_class`` draws per class, quantized to the 256 levels every
image of this pipeline has (quantization adds variance (2/255)^2/12 = 5e-6 per pixel to std^2 = 2.5e-3 at the
default std: 0.2 %, ignored by the exact formulas). There are no augmentations: a flipped mean image would be
another mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd2.method.edm import Denoiser
from dmd2.method.frechet import frechet_to_reference
from dmd2.method.randomness import derived_seed, torch_generator

MEAN_AMPLITUDE = 0.75  # mean images lie in [-0.75, 0.75]: with std <= 0.05 a sample is clipped with p < 1e-6
NEAR_RADIUS = 2.0      # "on a mode": ||x - mu|| <= NEAR_RADIUS * std * sqrt(D) (a true sample has ratio 1 +- 0.05)
SCORES = ("fd", "near", "coverage", "weight_tv")  # the names of mixture_scores' scores, in its order
DATA_STREAM = 7        # the samples' random stream, apart from the means' (derived_seed(seed, DATA_STREAM))


@dataclass(frozen=True)
class GaussianMixture:
    """means [C,K,3,R,R] (C = max(1, num_classes): an unconditional mixture is one class), per-pixel ``std``;
    components of a class are equally weighted."""

    means: Tensor
    std: float

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def num_components(self) -> int:
        return self.means.shape[1]

    @property
    def dim(self) -> int:
        return self.means[0, 0].numel()


def make_mixture(num_classes: int, components: int, resolution: int, std: float, seed: int) -> GaussianMixture:
    """The mixture of ``num_classes`` (0: unconditional, one class) x ``components`` smooth mean images of side
    ``resolution``, a function of ``seed`` alone."""
    c = max(1, num_classes)
    field = torch.randn(c * components, 3, 3, 3, generator=torch_generator(derived_seed(seed, 0)))
    smooth = F.interpolate(field, size=(resolution, resolution), mode="bilinear", align_corners=True)
    means = MEAN_AMPLITUDE * torch.tanh(smooth)
    return GaussianMixture(means.view(c, components, 3, resolution, resolution), float(std))


def sample_mixture(mix: GaussianMixture, labels: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draws x [N,3,R,R] (not clipped, not quantized) for class ``labels`` [N], and their components [N]."""
    k = torch.randint(0, mix.num_components, (len(labels),), generator=gen)
    x = mix.means[labels, k] + mix.std * torch.randn(len(labels), *mix.means.shape[2:], generator=gen)
    return x, k


def quantize(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> the nearest of the 256 levels a uint8 image has (what the pipeline stores)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


# --------------------------------------------------------------------------------------------- exact answers


def class_moments(mix: GaussianMixture) -> tuple[Tensor, Tensor]:
    """The exact mean [C,D] and covariance [C,D,D] (float64) of each class:
    m = mean_k mu_k, S = mean_k (mu_k - m)(mu_k - m)^T + std^2 I."""
    mu = mix.means.flatten(2).double()                         # [C,K,D]
    m = mu.mean(1)                                             # [C,D]
    centred = mu - m[:, None]
    cov = torch.einsum("ckd,cke->cde", centred, centred) / mix.num_components
    return m, cov + mix.std ** 2 * torch.eye(mix.dim, dtype=torch.float64)


def exact_denoise(mix: GaussianMixture, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
    """E[x0 | x] for x = x0 + sigma n, x0 from class ``labels`` [B]: x [B,3,R,R], sigma [B] -> [B,3,R,R].

    Each component seen through the noise is N(mu_k, (std^2 + sigma^2) I), so the posterior weights are
    softmax_k(-||x - mu_k||^2 / (2 (std^2 + sigma^2))), and within component k the posterior mean is
    mu_k + std^2 / (std^2 + sigma^2) (x - mu_k). Computed in float64."""
    mu = mix.means.to(x.device, torch.float64)[labels]                     # [B,K,3,R,R]
    xd, var = x.double(), (mix.std ** 2 + sigma.double() ** 2).view(-1, 1)  # var [B,1]
    d2 = (xd[:, None] - mu).flatten(2).pow(2).sum(-1)                      # [B,K]
    w = torch.softmax(-d2 / (2 * var), dim=1).view(*d2.shape, 1, 1, 1)
    shrink = (mix.std ** 2 / var).view(-1, 1, 1, 1, 1)
    return (w * (mu + shrink * (xd[:, None] - mu))).sum(1).to(x.dtype)


class ExactDenoiser(nn.Module):
    """The mixture's exact denoiser with the interface of a network denoiser: (x [B,3,R,R], sigma [B],
    class_labels [B]) -> [B,3,R,R]. No parameters. Labels of an unconditional mixture are ignored."""

    def __init__(self, mix: GaussianMixture, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.mixture, self.sigma_data = mix, sigma_data

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor) -> Tensor:
        labels = class_labels.long() if self.mixture.num_classes > 1 else torch.zeros_like(class_labels).long()
        return exact_denoise(self.mixture, x.float(), sigma.float().reshape(-1).expand(x.shape[0]), labels)


def mode_distances(mix: GaussianMixture, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """For samples x [N,3,R,R] of classes ``labels`` [N]: the nearest component of their class [N] and the
    distance to it in units of a true sample's typical distance std * sqrt(D) [N]."""
    mu = mix.means[labels].flatten(2).double()                             # [N,K,D]
    d = (x.flatten(1).double()[:, None] - mu).norm(dim=-1)                 # [N,K]
    nearest = d.argmin(1)
    return nearest, d.gather(1, nearest[:, None])[:, 0] / (mix.std * math.sqrt(mix.dim))


def mixture_scores(mix: GaussianMixture, images: Tensor, labels: Tensor) -> dict[str, float]:
    """Exact scores of samples ``images`` (uint8 [N,3,R,R], or floats in [-1, 1]) with class ``labels`` [N]:

    - ``fd``: the Frechet distance in pixel space (pixels in [-1, 1]) between each class's samples and its exact
      moments, averaged over classes (``dmd2.method.frechet``: exact with fewer samples than pixels);
    - ``near``: the fraction of samples within NEAR_RADIUS typical distances of a component of their class
      (a blend of two modes is far from both);
    - ``coverage``: the fraction of (class, component) pairs that receive at least half their share
      (n_class / K) of the samples on a mode;
    - ``weight_tv``: total-variation distance between the samples' nearest-component frequencies and the
      uniform weights, averaged over classes (0 = every mode at its weight).

    Needs at least two samples of every class."""
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
    labels = labels.long().cpu() if mix.num_classes > 1 else torch.zeros(len(images), dtype=torch.long)
    x = x.cpu()
    nearest, ratio = mode_distances(mix, x, labels)
    near = ratio <= NEAR_RADIUS
    m, cov = class_moments(mix)
    fds, covered, tvs = [], 0, []
    k = mix.num_components
    for c in range(mix.num_classes):
        sel = labels == c
        n = int(sel.sum())
        if n < 2:
            raise ValueError(f"mixture scores need at least 2 samples of every class; class {c} has {n}")
        xc = x[sel].flatten(1).double().numpy()
        fds.append(frechet_to_reference(m[c].numpy(), cov[c].numpy())(xc.mean(0), np.cov(xc, rowvar=False)))
        on_mode = torch.bincount(nearest[sel & near], minlength=k).double()
        covered += int((on_mode >= 0.5 * n / k).sum())
        freq = torch.bincount(nearest[sel], minlength=k).double() / n
        tvs.append(0.5 * float((freq - 1 / k).abs().sum()))
    return dict(zip(SCORES, (float(np.mean(fds)), float(near.double().mean()), covered / (mix.num_classes * k),
                             float(np.mean(tvs)))))


def true_samples(mix: GaussianMixture, num: int, seed: int = 0, stream: int = 1) -> tuple[Tensor, Tensor]:
    """``num`` true samples, quantized, classes round-robin as evaluations draw them: (x [num,3,R,R], labels
    [num]), from the random stream ``stream`` of ``seed`` (1: the floor's samples, 2: the reference set of
    precision / recall)."""
    labels = torch.arange(num) % mix.num_classes
    x, _ = sample_mixture(mix, labels, torch_generator(derived_seed(seed, DATA_STREAM + stream)))
    return quantize(x), labels


def reference_scores(mix: GaussianMixture, num: int, seed: int = 0) -> dict[str, float]:
    """The scores of ``num`` true samples (quantized, classes round-robin as evaluations draw them): the floor
    a perfect model reaches at this sample count."""
    return mixture_scores(mix, *true_samples(mix, num, seed, 1))


def mean_span_features(mix: GaussianMixture, images: Tensor) -> Tensor:
    """The mixture's own features of samples (uint8 [N,3,R,R] or floats in [-1, 1]): their coordinates in an
    orthonormal basis of the span of the C*K component means -> float64 [N, rank] (rank <= C*K). The modes differ
    only there; the other D - rank directions hold isotropic noise alone, which would swamp nearest-neighbour
    distances in pixel space (the role a feature network plays for images)."""
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
    basis, r = torch.linalg.qr(mix.means.flatten(2).flatten(0, 1).double().T)  # [D,C*K]
    keep = r.diagonal().abs() > 1e-9 * r.diagonal().abs().max()
    return x.cpu().flatten(1).double() @ basis[:, keep]


def mixture_classes(mix: GaussianMixture, images: Tensor) -> Tensor:
    """The exact classifier of the mixture: for samples (uint8 [N,3,R,R] or floats in [-1, 1]) the class of the
    nearest component of any class -> [N] (the Bayes classifier when the components' spread is small against
    their separation, as at the default std)."""
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
    mu = mix.means.flatten(2).double().flatten(0, 1)                      # [C*K,D]
    d = torch.cdist(x.cpu().flatten(1).double(), mu)                      # [N,C*K]
    return d.argmin(1) // mix.num_components


def denoising_errors(denoiser: nn.Module, mix: GaussianMixture, sigmas: list[float], num: int, seed: int = 0,
                     batch_size: int = 500, device: torch.device | str = "cpu") -> list[dict[str, float]]:
    """A denoiser's error against the exact one, per noise level: for each sigma, ``num`` true samples x0
    (classes round-robin), x = x0 + sigma n; ``mse`` = mean (D(x) - D*(x))^2 per pixel, and ``mse_x0`` = mean
    (D*(x) - x0)^2, the error no denoiser can beat (so mse / mse_x0 is the relative excess)."""
    rows = []
    for j, sigma in enumerate(sigmas):
        gen = torch_generator(derived_seed(seed, 1000 + j))
        sq, sq0, count = 0.0, 0.0, 0
        for lo in range(0, num, batch_size):
            labels = torch.arange(lo, min(num, lo + batch_size)) % mix.num_classes
            x0, _ = sample_mixture(mix, labels, gen)
            x = x0 + sigma * torch.randn(x0.shape, generator=gen)
            s = torch.full((len(labels),), float(sigma))
            exact = exact_denoise(mix, x, s, labels)
            with torch.no_grad():
                out = denoiser(x.to(device), s.to(device), labels.to(device)).float().cpu()
            sq += float(((out - exact) ** 2).sum())
            sq0 += float(((exact - x0) ** 2).sum())
            count += x0.numel()
        rows.append({"sigma": float(sigma), "mse": sq / count, "mse_x0": sq0 / count})
    return rows


# ------------------------------------------------------------------- the generator's distribution, fitted


@dataclass(frozen=True)
class FittedMixture:
    """A class-conditional mixture with diagonal covariances, fitted to samples (``fit_mixture``): weights
    [C,K], means [C,K,D] and variances [C,K,D] (float64)."""

    weights: Tensor
    means: Tensor
    variances: Tensor


def fit_mixture(mix: GaussianMixture, x: Tensor, labels: Tensor, iterations: int = 30, floor: float = 1e-5
                ) -> FittedMixture:
    """Fit, per class, a mixture of K + 1 diagonal Gaussians to samples x [N,3,R,R] of classes ``labels`` [N]
    by EM: K components start at the data's modes (so component k stays the generator's version of mode k) and
    one broad component at the class mean takes the samples that are on no mode. Variances are floored at
    ``floor``. The fitted mixture's exact denoiser (``fitted_denoise``) is then the ideal fake score network."""
    x = x.flatten(1).double().cpu()
    labels = labels.long().cpu() if mix.num_classes > 1 else torch.zeros(len(x), dtype=torch.long)
    k = mix.num_components
    ws, mus, vs = [], [], []
    for c in range(mix.num_classes):
        xc = x[labels == c]                                                   # [n,D]
        if len(xc) < 2:
            raise ValueError(f"fit_mixture: class {c} has {len(xc)} sample(s); a fit needs at least 2 per class")
        mu = torch.cat([mix.means[c].flatten(1).double(), xc.mean(0, keepdim=True)])  # [K+1,D]
        var = torch.cat([torch.full((k, x.shape[1]), mix.std ** 2, dtype=torch.float64),
                         xc.var(0, keepdim=True).clamp_min(floor)])
        w = torch.full((k + 1,), 1.0 / (k + 1), dtype=torch.float64)
        for _ in range(iterations):
            logp = diagonal_log_densities(xc, mu, var) + w.log()              # [n,K+1]
            r = torch.softmax(logp, dim=1)
            nk = r.sum(0).clamp_min(1e-12)
            w = nk / nk.sum()
            mu = (r.T @ xc) / nk[:, None]
            var = ((r.T @ xc.pow(2)) / nk[:, None] - mu.pow(2)).clamp_min(floor)
        ws.append(w), mus.append(mu), vs.append(var)
    return FittedMixture(torch.stack(ws), torch.stack(mus), torch.stack(vs))


def diagonal_log_densities(x: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """log N(x; mu_k, diag(var_k)) for x [N,D], mu and var [K,D] -> [N,K] (float64)."""
    d2 = ((x[:, None] - mu[None]) ** 2 / var[None]).sum(-1)
    return -0.5 * (d2 + var.log().sum(-1)[None] + x.shape[1] * math.log(2 * math.pi))


def fitted_denoise(fit: FittedMixture, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
    """E[x0 | x] under the fitted mixture, x = x0 + sigma n: x [B,3,R,R], sigma [B], labels [B] -> [B,3,R,R].
    Component k seen through the noise is N(mu_k, diag(v_k + sigma^2)); within it the posterior mean is
    mu_k + v_k / (v_k + sigma^2) (x - mu_k). The generalisation of ``exact_denoise`` to weighted, diagonal
    components."""
    xd = x.flatten(1).double().cpu()                                         # [B,D]
    s2 = sigma.double().cpu().view(-1, 1, 1) ** 2                            # [B,1,1]
    c = labels.long().cpu() if fit.weights.shape[0] > 1 else torch.zeros(len(xd), dtype=torch.long)
    mu, v = fit.means[c], fit.variances[c]                                   # [B,K,D]
    var = v + s2
    logp = -0.5 * (((xd[:, None] - mu) ** 2 / var).sum(-1) + var.log().sum(-1)) + fit.weights[c].log()  # [B,K]
    post = torch.softmax(logp, dim=1)
    within = mu + v / var * (xd[:, None] - mu)
    return (post[:, :, None] * within).sum(1).view_as(x).to(x.dtype)


def dm_gradient_errors(generator_samples: Tensor, labels: Tensor, real: nn.Module, fake: nn.Module,
                       mix: GaussianMixture, fit: FittedMixture, sigmas: list[float], seed: int = 0
                       ) -> list[dict[str, float]]:
    """How far a distillation's networks are from their ideals, per noise level, on generator samples x [N,3,R,R]
    of classes ``labels`` [N] noised to x_t = x + sigma n:

    - ``fake_mse``: mean (D_fake(x_t) - D_gen(x_t))^2 per pixel, D_gen the exact denoiser of the generator's
      fitted distribution ``fit`` (what a perfect fake score network outputs); ``fake_mse_x0`` = mean
      (D_gen(x_t) - x)^2, the error no fake score network can beat;
    - ``real_mse``: mean (D_real(x_t) - D_data(x_t))^2, the real score's error against the data's exact denoiser
      on these (off-data) inputs;
    - ``signal``: mean (D_gen(x_t) - D_data(x_t))^2, the squared exact DM direction (unnormalised: D_fake -
      D_real at perfect networks); ``error``: mean of the squared difference between the networks' direction
      (D_fake - D_real) and the exact one; ``cosine``: their cosine similarity over the whole batch.

    Where ``error`` exceeds ``signal``, the generator's DM gradient is mostly the networks' error at that level."""
    rows = []
    labels = labels.long()
    for j, sigma in enumerate(sigmas):
        gen = torch_generator(derived_seed(seed, 2000 + j))
        x = generator_samples.float()
        s = torch.full((len(x),), float(sigma))
        x_t = x + sigma * torch.randn(x.shape, generator=gen)
        cls = labels if mix.num_classes > 1 else torch.zeros_like(labels)
        with torch.no_grad():
            d_fake, d_real = fake(x_t, s, labels).float(), real(x_t, s, labels).float()
        d_gen, d_data = fitted_denoise(fit, x_t, s, cls).float(), exact_denoise(mix, x_t, s, cls).float()
        net, ideal = d_fake - d_real, d_gen - d_data
        cos = float((net * ideal).sum() / (net.norm() * ideal.norm()).clamp_min(1e-30))
        rows.append({"sigma": float(sigma), "fake_mse": float(((d_fake - d_gen) ** 2).mean()),
                     "fake_mse_x0": float(((d_gen - x) ** 2).mean()),
                     "real_mse": float(((d_real - d_data) ** 2).mean()), "signal": float((ideal ** 2).mean()),
                     "error": float(((net - ideal) ** 2).mean()), "cosine": cos})
    return rows


DENOISING_SIGMAS = [0.002, 0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0]  # evaluate.py's noise levels
DENOISING_SAMPLES = 2000  # evaluate.py's samples per noise level (at most num_samples)


def gaussian_optimal_denoiser(mean: Tensor, std: Tensor) -> Denoiser:
    """The exact denoiser E[x0 | x] for data x0 ~ N(mean, diag(std^2)) [C,H,W], for tests and toy runs.

    D(x; sigma) = mean + std^2 / (std^2 + sigma^2) * (x - mean).
    """
    def denoise(x: Tensor, sigma: Tensor, class_labels: Tensor) -> Tensor:
        s2 = sigma.view(-1, *([1] * (x.dim() - 1))) ** 2
        return mean + std**2 / (std**2 + s2) * (x - mean)

    return denoise
