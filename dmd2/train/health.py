"""Is the run healthy? The runner side of a distillation's health diagnostics (README "Is my run healthy?"):

- ``HealthMonitor`` watches every row the run logs after step 0 (RunLogger.watchers; step 0 is the starting point,
  a distillation's teacher one-step output, before any update) and raises an alert (a warning line, a
  W&B alert and a row in metrics.jsonl) once per event, with its step, when recall or the class entropy falls
  below its threshold, the saturated-pixel fraction exceeds its threshold, the FID / FD rises over k evaluations
  in a row by more than a set fraction, or the gradient-balance ratio leaves its band (HealthSettings in
  dmd2/config/settings.py);
- ``DenoiserPanels`` draws, at every sample grid, for a fixed batch of generated images and a few noise levels:
  the noisy image, the teacher's x0, the fake score network's x0, their difference and the DM gradient, as one
  labelled PNG (samples/diagnostics_denoiser_<step>.png in the run folder, W&B image diagnostics/denoiser), and
  the same along a multi-step generator's chain (diagnostics/chain).

Neither changes what training computes: the monitor only reads logged numbers; the panels run without gradient,
in eval mode, on noise of their own generator (never the training streams).
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from dmd2.method.losses import dm_gradient
from dmd2.method.randomness import torch_generator
from dmd2.train.logger import RunLogger

log = logging.getLogger(__name__)

PANEL_NOISE_OFFSET = 54321  # the panels' fixed noise: seed + offset, apart from the training streams and the grids


# --------------------------------------------------------------------------------------------- alerts


@dataclass
class Rule:
    """One alert: ``test(value)`` says whether the condition holds for a logged value of ``key``."""

    name: str
    key: str
    test: Callable[[float], bool]
    says: str  # what the alert means, for the message


@dataclass
class Event:
    """An alert that fired: its rule, step, value and message."""

    name: str
    step: int
    key: str
    value: float
    message: str


def alert_rules(h: Any, fd_key: str | None) -> list[Rule]:
    """The alert rules of ``health.*`` settings (HealthSettings); ``fd_key``: the FID / FD the run evaluates (its
    rise is tracked by the monitor itself)."""
    low, high = (float(v) for v in h.grad_ratio_band)
    return [
        Rule("recall_low", "eval/recall", lambda v: v < h.min_recall,
             f"recall below {h.min_recall}: the generator misses part of the data (lost modes)"),
        Rule("class_entropy_low", "eval/class_entropy", lambda v: v < h.min_class_entropy,
             f"class entropy below {h.min_class_entropy}: the generated classes are unbalanced (a class collapse)"),
        Rule("saturated_pixels", "train/saturated_fraction", lambda v: v > h.max_saturated,
             f"more than {h.max_saturated:.0%} of the generated pixels at +-1 after clamping"),
        Rule("grad_ratio_out_of_band", "train/gan_dm_grad_ratio", lambda v: not low <= v <= high,
             f"GAN / DM gradient ratio outside [{low:g}, {high:g}] (gen_cls_loss_weight: weight the GAN loss so its "
             "gradient is comparable to the DM gradient's)"),
    ]


def rising_run(values: list[float]) -> int:
    """How many evaluations in a row the last value of ``values`` has risen: 0 when it did not rise."""
    n = 0
    for a, b in zip(values[-2::-1], values[:0:-1]):  # (previous, current) pairs, newest first
        if not b > a:
            break
        n += 1
    return n


class HealthMonitor:
    """Watches logged rows and raises each alert once per event (when its condition starts to hold; it fires
    again only after the condition has cleared)."""

    def __init__(self, h: Any, fd_key: str | None, logger: RunLogger) -> None:
        self.rules = alert_rules(h, fd_key)
        self.fd_key, self.fd_rise, self.fd_rise_min = fd_key, int(h.fd_rise_evals), float(h.fd_rise_min)
        self.logger = logger
        self.active: set[str] = set()
        self.fds: list[float] = []
        self.events: list[Event] = []

    def attach(self) -> "HealthMonitor":
        self.logger.watchers.append(self.watch)
        return self

    def watch(self, metrics: Mapping[str, float], step: int) -> None:
        if step == 0:  # the starting point (a distillation: the teacher's one-step output), before any update
            if self.fd_key is not None and self.fd_key in metrics:
                self.fds.append(float(metrics[self.fd_key]))
            return
        for rule in self.rules:
            if rule.key in metrics:
                value = float(metrics[rule.key])
                self.update(rule.name, rule.key, value, not math.isnan(value) and rule.test(value), rule.says, step)
        if self.fd_key is not None and self.fd_rise > 0 and self.fd_key in metrics:
            self.fds.append(float(metrics[self.fd_key]))
            run = rising_run(self.fds)
            start, now = self.fds[-1 - run], self.fds[-1]
            rise = (now - start) / abs(start) if start != 0 else math.inf
            self.update("fd_rising", self.fd_key, now, run >= self.fd_rise and rise > self.fd_rise_min,
                        f"{self.fd_key} rose over {run} evaluations in a row", step)

    def update(self, name: str, key: str, value: float, holds: bool, says: str, step: int) -> None:
        if not holds:
            self.active.discard(name)
            return
        if name in self.active:
            return
        self.active.add(name)
        message = f"{key} = {value:.4g}: {says}"
        self.events.append(Event(name, step, key, value, message))
        log.warning(f"[health] step {step}: ALERT {name}: {message}")
        self.logger.alert(f"dmd2 health: {name}", f"step {step}: {message}")
        self.logger.log_event({"alert": name, "key": key, "value": value, "message": message}, step)


# --------------------------------------------------------------------------------------------- panels


def to_image(x: Tensor) -> np.ndarray:
    """Images [N,3,H,W] in [-1, 1] -> one horizontal strip, float [H, N*W, 3] in [0, 1]."""
    x = ((x.detach().float().clamp(-1, 1) + 1) / 2).cpu()
    return torch.cat(list(x), dim=2).permute(1, 2, 0).numpy()


def signed_image(x: Tensor) -> tuple[np.ndarray, float]:
    """Signed maps [N,3,H,W] -> a strip in [0, 1] (0.5 = zero, scaled by the largest |value|) and that scale."""
    scale = float(x.detach().abs().max().clamp_min(1e-12))
    return to_image(x / scale), scale


@torch.no_grad()
def denoiser_views(x: Tensor, y: Tensor, sigmas: list[float], real: nn.Module, fake: nn.Module,
                   noise: Tensor) -> list[dict[str, Tensor]]:
    """For generated images x [N,3,H,W] (classes y [N]) at each noise level sigma: x_t = x + sigma * noise
    (noise [N,3,H,W], the same at every level), the teacher's x0 D_real(x_t), the fake score network's x0
    D_fake(x_t), their difference and the DM gradient g (dmd2.method.losses.dm_gradient): one dict per sigma."""
    rows = []
    for sigma in sigmas:
        s = torch.full((len(x),), float(sigma), device=x.device, dtype=x.dtype)
        x_t = x + sigma * noise
        d_real, d_fake = real(x_t, s, y).to(x.dtype), fake(x_t, s, y).to(x.dtype)
        rows.append({"noisy": x_t, "teacher x0": d_real, "fake x0": d_fake, "teacher - fake": d_real - d_fake,
                     "DM gradient": dm_gradient(x, d_real, d_fake)})
    return rows


@torch.no_grad()
def chain_views(generator: nn.Module, z: Tensor, y: Tensor, sigmas: list[float]) -> list[dict[str, Tensor]]:
    """A multi-step generator's chain on noise z [S,N,3,H,W]: per step i its input x_i (z[0] * sigma_0, then the
    previous output renoised, x0_{i-1} + sigma_i z[i]) and its output x0_i (dmd2.method.samplers.
    backward_simulation's chain, without gradient)."""
    rows, x = [], z[0] * sigmas[0]
    for i, sigma in enumerate(sigmas):
        s = torch.full((z.shape[1],), float(sigma), device=z.device, dtype=z.dtype)
        out = generator(x, s, y)
        rows.append({"input": x, "output": out})
        if i + 1 < len(sigmas):
            x = out + sigmas[i + 1] * z[i + 1]
    return rows


def panel_figure(rows: list[dict[str, Tensor]], row_labels: list[str], title: str) -> Tensor:
    """A labelled grid: one row per entry of ``rows`` (labelled ``row_labels``), one column per kind of image
    (its key), each cell a strip of the batch; signed maps (difference, gradient) are drawn around grey = 0 with
    their scale in the label. Returns the picture as float [3,H,W] in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(rows[0])
    n = rows[0][kinds[0]].shape[0]
    fig, axes = plt.subplots(len(rows), len(kinds), figsize=(1.1 * n * len(kinds) + 0.8, 1.25 * len(rows) + 0.6),
                             squeeze=False)
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        for c, kind in enumerate(kinds):
            ax = axes[r][c]
            signed = kind in ("teacher - fake", "DM gradient")
            if signed:
                img, scale = signed_image(row[kind])
                name = f"{kind} (±{scale:.2g})"
            else:
                img, name = to_image(row[kind]), kind
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0 or signed:
                ax.set_title(name, fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from PIL import Image

    buf.seek(0)
    picture = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(picture).permute(2, 0, 1).contiguous()


@dataclass
class DenoiserPanels:
    """The panels' fixed batch: the first generated image of up to ``count`` grid rows (grid noise z
    [S,N,3,R,R], labels y [N]), its own noise for x_t, and the noise levels."""

    z: Tensor
    y: Tensor
    noise: Tensor
    sigmas: list[float]
    chain: list[float] = field(default_factory=list)  # a multi-step generator's denoising sigmas

    @classmethod
    def build(cls, grid_z: Tensor, grid_y: Tensor, per_class: int, count: int, sigmas: list[float],
              chain: list[float], seed: int) -> "DenoiserPanels":
        idx = torch.arange(0, len(grid_y), per_class)[:count]
        gen = torch_generator(seed + PANEL_NOISE_OFFSET)
        noise = torch.randn(len(idx), *grid_z.shape[2:], generator=gen).to(grid_z.device)
        return cls(grid_z[:, idx], grid_y[idx], noise, [float(s) for s in sigmas], list(chain))

    @torch.no_grad()
    def log(self, logger: RunLogger, generator: nn.Module, real: nn.Module, fake: nn.Module, step: int) -> None:
        """Draw and log the panels of ``generator`` (eval mode for the duration) against the teacher ``real``
        and the fake score network ``fake`` (both in eval mode for the duration)."""
        modes = [(net, net.training) for net in (generator, real, fake)]
        for net, _ in modes:
            net.eval()
        try:
            from dmd2.method.samplers import multistep_sample

            x = multistep_sample(generator, self.z, self.y, self.chain).float()
            rows = denoiser_views(x, self.y, self.sigmas, real, fake, self.noise)
            picture = panel_figure(rows, [f"sigma {s:g}" for s in self.sigmas],
                                   f"step {step}: generated images x, noised to x_t = x + sigma n; x0 estimates")
            logger.log_grid("diagnostics/denoiser", picture, step, "noisy | teacher x0 | fake x0 | difference | DM "
                            "gradient, by noise level")
            if len(self.chain) > 1:
                chain = chain_views(generator, self.z, self.y, self.chain)
                mid = self.sigmas[len(self.sigmas) // 2]
                for i, row in enumerate(chain):
                    view = denoiser_views(row["output"].float(), self.y, [mid], real, fake, self.noise)[0]
                    row.update({k: v for k, v in view.items() if k != "noisy"})
                labels = [f"step {i} (sigma {s:g})" for i, s in enumerate(self.chain)]
                picture = panel_figure(chain, labels, f"step {step}: the generator's chain; x0 estimates of each "
                                                      f"output at sigma {mid:g}")
                logger.log_grid("diagnostics/chain", picture, step, "input | output | teacher x0 | fake x0 | "
                                "difference | DM gradient, by chain step")
        finally:
            for net, was in modes:
                net.train(was)
