"""Progress of a long phase (reference statistics, sampling for an evaluation, generate.py, the training steps),
with a count and an ETA, readable on a terminal and in a file.

On a terminal (stdout and stderr both are one): a tqdm bar on stderr, and log messages printed while a bar is
open go above it (``bar_safe_logging``), never onto its line. Otherwise (nohup, SLURM, a pipe): no bar; a log
line every ``LINE_EVERY_S`` seconds and at the end, e.g. ``[reference] 12800/50000 images (26%), 410 images/s,
ETA 0:01:31``.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger(__name__)

LINE_EVERY_S = 30.0  # without a terminal: seconds between progress lines


def interactive() -> bool:
    """Whether the output is a terminal (a bar can be redrawn in place)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def clock(seconds: float) -> str:
    """0:01:31 (h:mm:ss); '?' for an unknown duration."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """``with Progress(total, "[reference]", "images") as p: ... p.update(n)``: a bar on a terminal, else progress
    lines; nothing when not ``enabled`` (ranks > 0, or a caller that reports otherwise)."""

    def __init__(self, total: int, what: str, unit: str = "images", enabled: bool = True,
                 bar: bool | None = None, every_s: float | None = None) -> None:
        self.total, self.what, self.unit = total, what, unit
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.enabled = enabled and total > 0
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if self.enabled and (interactive() if bar is None else bar):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit[:3], dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5, leave=False)

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line: count, share, rate and ETA (or, at the end, the time taken)."""
        seconds = (now if now is not None else time.perf_counter()) - self.t0
        rate = self.done / seconds if seconds > 0 else float("nan")
        if self.done >= self.total:
            return f"{self.what} {self.done}/{self.total} {self.unit} in {clock(seconds)} ({rate:.1f} {self.unit}/s)"
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return (f"{self.what} {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{rate:.1f} {self.unit}/s, ETA {clock(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.total and time.perf_counter() - self.t0 >= self.every_s:
            log.info(self.line())  # a phase long enough to have had lines ends with one
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BarSafeStream:
    """A console stream whose writes go through ``tqdm.write``: the open bars are cleared, the message printed
    on its own line, and the bars drawn again below it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def bar_safe_logging() -> Iterator[None]:
    """While a bar is open: the root logger's console handlers (stdout, stderr) write through ``BarSafeStream``,
    keeping their levels, filters and formats."""
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)]
    previous = [h.stream for h in handlers]
    for h in handlers:
        h.stream = BarSafeStream(h.stream)
    try:
        yield
    finally:
        for h, stream in zip(handlers, previous):
            h.stream = stream
