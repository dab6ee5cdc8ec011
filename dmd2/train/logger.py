"""Run logging: a local metrics.jsonl (always) plus Weights & Biases (when ``logger.name == wandb``), and the
running means of a logging window.

Every write here is a side write: a failing one (a full disk, a folder made read-only, W&B) is reported once per
kind (config, metrics, samples, W&B) and ignored, so training goes on to its checkpoints. A metrics row is
written whole or not at all.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torchvision.utils import save_image

from dmd2.io.files import atomic_write

log = logging.getLogger(__name__)


STEP_KEY = "step"                             # the x axis of every logged series
STEPPED = ("train/*", "eval/*", "samples/*")  # the series plotted against it


class RunLogger:
    """Writes scalars to ``<output_dir>/metrics.jsonl`` and mirrors scalars, images and histograms to W&B."""

    def __init__(
        self, output_dir: str, logger_cfg: Mapping[str, Any], config: dict[str, Any], job_type: str,
        run_name: str | None = None, enabled: bool = True, resume_id: str | None = None,
        config_yaml: str | None = None, keep_until: int | None = None,
    ) -> None:
        """``keep_until``: a (re)started run's timeline begins after this step: rows of an existing metrics.jsonl
        past it are dropped when the file is opened (-1: all of them); None appends to the file as it is."""
        self.output_dir = output_dir
        self.enabled = enabled  # False on non-zero ranks: nothing is written
        self.run: Any = None
        self._metrics: int | None = None  # the file descriptor of metrics.jsonl, opened for appending
        self._failed: set[str] = set()    # the kinds of side write that failed (each reported once)
        self._keep_until = keep_until
        self._pending = (logger_cfg, config, job_type, run_name, resume_id, config_yaml) if enabled else None
        self._definitions: list[tuple[str, dict[str, Any]]] = []
        self.log_checkpoints = False  # logger.log_checkpoints of a started W&B run
        self._started = time.monotonic()  # each row's wall_s: seconds since this segment of the run started
        self.watchers: list[Callable[[Mapping[str, float], int], None]] = []  # see every logged row (health alerts)

    def start(self) -> None:
        """Open the run's outputs: ``config.yaml`` (when given), ``metrics.jsonl`` and the W&B run. Called by the
        first thing logged, so a run refused while it is being set up leaves ``output_dir`` as it was."""
        if self._pending is None:
            return
        logger_cfg, config, job_type, run_name, resume_id, config_yaml = self._pending
        self._pending = None
        if config_yaml is not None:
            path = os.path.join(self.output_dir, "config.yaml")
            self._side_write("config", path, lambda: atomic_write(path, lambda f: f.write(config_yaml.encode())))
        self._side_write("metrics", os.path.join(self.output_dir, "metrics.jsonl"), self._open_metrics)
        if logger_cfg.get("name") == "wandb":
            self.run = self._start_wandb(logger_cfg, config, job_type, run_name, resume_id)
            self.log_checkpoints = bool(logger_cfg.get("log_checkpoints", False))
            if self.run is not None:
                group, name = logger_cfg.get("group"), run_name or getattr(self.run, "id", "")
                log.info(f"[logger] W&B project {logger_cfg.get('project')}, run {name}"
                         + (f", group {group}" if group else "") + f" ({logger_cfg.get('mode', 'offline')})")
        # every series is plotted against the training step (also when a resumed run's W&B step differs)
        self._wandb("define_metric", STEP_KEY)
        for pattern in STEPPED:
            self._wandb("define_metric", pattern, step_metric=STEP_KEY)
        for key, kwargs in self._definitions:
            self._wandb("define_metric", key, **kwargs)

    def _side_write(self, kind: str, what: str, write: Callable[[], Any]) -> Any:
        """Run ``write``; on failure report it (the first failure of each ``kind`` only) and return None."""
        try:
            return write()
        except Exception as err:  # noqa: BLE001 - a side write must never stop training
            if kind not in self._failed:
                self._failed.add(kind)
                log.error(f"[logger] ERROR: writing {what} failed ({err}); training continues (later {kind} "
                          "failures are not reported)")
            return None

    def _open_metrics(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, "metrics.jsonl")
        dropped = trim_metrics(path, self._keep_until) if self._keep_until is not None else 0
        if dropped:
            log.info(f"[resume] {path}: {dropped} rows past step {max(self._keep_until, 0)} dropped (the "
                     "interrupted run's, which this run replaces)")
        self._metrics = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def _write_row(self, line: bytes) -> None:
        """Append one line whole: a failed or short write is cut off again (the file keeps whole rows)."""
        if self._metrics is None:  # opening it failed (e.g. a full disk at the start): try again
            self._open_metrics()
        fd = self._metrics
        assert fd is not None
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):
                raise OSError("short write (disk full?)")
        except BaseException:
            os.ftruncate(fd, size)
            raise

    @property
    def run_id(self) -> str | None:
        """The W&B run id (stored in checkpoints so a resumed run continues the same W&B run)."""
        self.start()
        return getattr(self.run, "id", None)

    def _start_wandb(self, cfg: Mapping[str, Any], config: dict[str, Any], job_type: str, run_name: str | None,
                     resume_id: str | None) -> Any:
        def init() -> Any:
            import wandb

            return wandb.init(
                project=cfg.get("project"), entity=cfg.get("entity"), mode=cfg.get("mode", "offline"),
                group=cfg.get("group"), tags=list(cfg.get("tags") or []), job_type=job_type, name=run_name,
                config=config, dir=self.output_dir, reinit="finish_previous",
                id=resume_id, resume="allow" if resume_id else None,
            )

        return self._guarded(init, "could not start", "continuing with metrics.jsonl only")

    def _guarded(self, call: Callable[[], Any], what: str, then: str = "", off: bool = False) -> Any:
        """Run a W&B ``call``: W&B never stops a run. A failure is reported (``what`` failed, ``then``) and, with
        ``off``, W&B is switched off for the rest of the run. Returns the call's result, None on failure."""
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - W&B must never stop a run
            if off:
                self.run, then = None, "W&B logging is off for the rest of this run"
            log.warning(f"[logger] W&B {what} ({err})" + (f"; {then}" if then else ""))
            return None

    def _wandb(self, fn: str, *args: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        run = self.run
        self._guarded(lambda: getattr(run, fn)(*args, **kwargs), f"{fn} failed", off=True)

    def _wandb_media(self, make: Callable[[], dict[str, Any]], step: int) -> None:
        """Log what ``make`` builds (images, tables, histograms: building them writes media files too) to W&B;
        a failure while building or logging turns W&B off like any failing W&B call."""
        if self.run is None:
            return
        payload = self._guarded(make, "media failed", off=True)
        if payload is not None:
            self._wandb("log", {**payload, STEP_KEY: step}, step=step)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.start()
        row = {"step": step, **{k: float(v) for k, v in metrics.items()},
               "wall_s": round(time.monotonic() - self._started, 3)}
        path = os.path.join(self.output_dir, "metrics.jsonl")
        self._side_write("metrics", path, lambda: self._write_row((json.dumps(row) + "\n").encode()))
        self._wandb("log", {**metrics, STEP_KEY: step}, step=step)
        for watch in self.watchers:
            watch(metrics, step)

    def log_event(self, event: Mapping[str, Any], step: int) -> None:
        """A row of metrics.jsonl that is not a scalar series (a health alert: its name, value, threshold and
        message), at ``step``; not sent to W&B's charts."""
        if not self.enabled:
            return
        self.start()
        path = os.path.join(self.output_dir, "metrics.jsonl")
        row = json.dumps({"step": step, **event})
        self._side_write("metrics", path, lambda: self._write_row((row + "\n").encode()))

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (wandb.alert: an e-mail / Slack notification, per the user's W&B settings); guarded like
        every W&B call, nothing without a W&B run."""
        if self.run is None:
            return
        import wandb

        self._guarded(lambda: self.run.alert(title=title, text=text, level=wandb.AlertLevel.WARN), "alert failed")

    def log_grid(self, key: str, grid: torch.Tensor, step: int, caption: str = "") -> str | None:
        """Save an image grid [3,H,W] in [0, 1] to ``samples/<key>_<step>.png`` and log it; return the path."""
        if not self.enabled:
            return None
        self.start()
        folder = os.path.join(self.output_dir, "samples")
        path = os.path.join(folder, f"{key.replace('/', '_')}_{step:06d}.png")
        written = self._side_write("samples", path, lambda: atomic_write(
            path, lambda f: save_image(grid, f, format="png"), suffix=".png") or path)
        if self.run is not None and written:
            import wandb

            self._wandb_media(lambda: {key: wandb.Image(path, caption=caption)}, step)
        return written

    def log_picture(self, key: str, picture: Any, step: int, caption: str = "") -> str | None:
        """Save a picture (a PIL image) to ``samples/<key>_<step>.png`` and log it; return the path."""
        if not self.enabled:
            return None
        self.start()
        path = os.path.join(self.output_dir, "samples", f"{key.replace('/', '_')}_{step:06d}.png")
        written = self._side_write("samples", path, lambda: atomic_write(
            path, lambda f: save_picture(picture, f), suffix=".png") or path)
        if self.run is not None and written:
            import wandb

            self._wandb_media(lambda: {key: wandb.Image(path, caption=caption)}, step)
        return written

    def log_samples(self, key: str, images: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None,
                    per_row: int, step: int, caption: str = "") -> str | None:
        """Images [N,3,H,W] in [-1, 1] with their labels [N]: a grid (``per_row`` images per row, each row's class
        name on its left, the caption and step above, small images enlarged: dmd2.io.pictures) and, in W&B, a
        Table of the images with their step, label and class name (``<key>_table``)."""
        from dmd2.data.images import to_uint8
        from dmd2.io.pictures import class_rows, labelled_grid

        if not self.enabled:
            return None
        rows, names = class_rows(to_uint8(images.detach().float()).cpu(), labels.tolist(), class_names, per_row)
        path = self.log_picture(key, labelled_grid(rows, names, title=", ".join(filter(None, [caption, f"step {step}"]))),
                                step, caption)
        if self.run is not None:
            import wandb

            def table() -> dict[str, Any]:
                uint8 = to_uint8(images.detach().float()).cpu()
                rows = wandb.Table(columns=["step", "label", "class", "image"])
                for img, label in zip(uint8, labels.tolist()):
                    name = class_names[label] if class_names and label < len(class_names) else str(label)
                    rows.add_data(step, label, name, wandb.Image(img.permute(1, 2, 0).numpy()))
                return {f"{key}_table": rows}

            self._wandb_media(table, step)
        return path

    def log_artifact(self, path: str, kind: str, step: int, final: bool = True,
                     metadata: Mapping[str, Any] | None = None) -> None:
        """With ``logger.log_checkpoints``: log a checkpoint file or an export folder as the W&B artifact
        ``<kind>-<run id>`` (type model), aliases latest, step-N (and final)."""
        if self.run is None or not self.log_checkpoints:
            return
        run = self.run

        def log_it() -> None:
            import wandb

            artifact = wandb.Artifact(artifact_name(kind, run.id), type="model", metadata=dict(metadata or {}))
            artifact.add_dir(path) if os.path.isdir(path) else artifact.add_file(path)
            run.log_artifact(artifact, aliases=["latest", f"step-{step}"] + (["final"] if final else []))

        self._guarded(log_it, f"artifact of {path} failed")

    def use_checkpoint(self, path: str, kind: str, run_id: str | None, role: str) -> None:
        """Record that this run consumed the checkpoint ``path`` (its ``role``: teacher, checkpoint), written by
        the W&B run ``run_id``: the config key ``inputs.<role>`` names it and its artifact ``<kind>-<run_id>``;
        online with ``logger.log_checkpoints`` the artifact is also marked as this run's input (W&B lineage;
        offline runs cannot use artifacts)."""
        if not self.enabled:
            return
        self.start()
        if self.run is None:
            return
        name, run = (artifact_name(kind, run_id) if run_id else None), self.run

        def link() -> None:
            run.config.update({"inputs": {role: {"path": os.path.abspath(path), "artifact": name}}},
                              allow_val_change=True)
            if self.log_checkpoints and name and not run.offline:
                import wandb

                artifact = wandb.Artifact(name, type="model")
                artifact.add_dir(path) if os.path.isdir(path) else artifact.add_file(path)
                run.use_artifact(artifact)

        self._guarded(link, f"could not link the {role} {path}")

    def log_histogram(self, key: str, values: torch.Tensor, step: int) -> None:
        if self.enabled and self.run is not None:
            import wandb

            self._wandb_media(lambda: {key: wandb.Histogram(values.detach().cpu().numpy())}, step)

    def define_metric(self, key: str, **kwargs: Any) -> None:
        """W&B ``define_metric`` (e.g. ``summary="min"``: the run summary keeps the best value); before the
        outputs are open it is applied when they open. Keys of the ``STEPPED`` series keep the step axis."""
        if not self.enabled:
            return
        if key.split("/")[0] + "/*" in STEPPED:
            kwargs.setdefault("step_metric", STEP_KEY)
        if self._pending is not None:
            self._definitions.append((key, kwargs))
        else:
            self._wandb("define_metric", key, **kwargs)

    def summary(self, values: Mapping[str, Any]) -> None:
        self.start()
        if self.enabled and self.run is not None:
            run = self.run
            self._guarded(lambda: run.summary.update(dict(values)), "summary failed")

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Close metrics.jsonl and finish the W&B run (``preempted``: stopped by a signal, to be resumed)."""
        if preempted:
            self._wandb("mark_preempting")
        if self._metrics is not None:
            os.close(self._metrics)
            self._metrics = None
        self._wandb("finish", exit_code=exit_code)
        self.run = None


def save_picture(picture: Any, f: Any) -> None:
    """Write a PIL picture to the open file ``f`` as PNG."""
    picture.save(f, format="png")


def row_step(line: bytes) -> int | None:
    """The step of a metrics.jsonl row, None for a line that is not a whole row."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def trim_metrics(path: str, keep_until: int) -> int:
    """Keep the rows of ``path`` (metrics.jsonl) up to step ``keep_until`` and drop the others, and any cut-off
    or unreadable line, rewriting the file atomically; return how many lines were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept = [line for line in lines if (step := row_step(line)) is not None and step <= keep_until]
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped or not lines[-1] == b"":
        atomic_write(path, lambda f: f.write(b"".join(line + b"\n" for line in kept)))
    return dropped


def artifact_name(kind: str, run_id: str) -> str:
    """The W&B artifact of a run's checkpoint or export: <kind>-<run id> (e.g. teacher-1a2b3c4d)."""
    return f"{kind}-{run_id}"


class RunningMeans:
    """Means of scalar logs over a logging window, accumulated on the device: no host read per step, one per
    window. Non-finite values are left out of their key's mean."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def add(self, values: dict[str, Tensor]) -> None:
        for key, v in values.items():
            v = v.detach().float().reshape(())
            ok = torch.isfinite(v)
            self.sums[key] = self.sums.get(key, 0) + torch.where(ok, v, torch.zeros_like(v))
            self.counts[key] = self.counts.get(key, 0) + ok.float()

    def pop(self) -> dict[str, float]:
        """The window's means (keys with no finite value left out), and a fresh window."""
        keys = list(self.sums)
        if not keys:
            return {}
        sums = torch.stack([self.sums[k] for k in keys]).tolist()
        counts = torch.stack([self.counts[k] for k in keys]).tolist()
        self.sums, self.counts = {}, {}
        return {k: s / n for k, s, n in zip(keys, sums, counts) if n > 0}
