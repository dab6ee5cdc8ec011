"""Console and file logging of the scripts (Hydra's ``hydra/job_logging: dmd2``, conf/hydra/job_logging/dmd2.yaml).

Every module logs through ``logging.getLogger(__name__)``: information goes to stdout, warnings and errors to
stderr, and everything, with times and levels, to the run's ``<script>.log`` in its Hydra folder.
"""
from __future__ import annotations

import logging


class BelowLevel(logging.Filter):
    """Passes records below ``level`` (the stdout handler leaves warnings and errors to the stderr one)."""

    def __init__(self, level: str | int = "WARNING") -> None:
        super().__init__()
        self.level = logging.getLevelName(level) if isinstance(level, str) else level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class NotFileOnly(logging.Filter):
    """Drops records logged with ``extra={"file_only": True}`` (the console handlers: training's status lines go
    to the run's log file only while a progress bar shows them on the terminal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)
