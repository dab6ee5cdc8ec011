"""Errors the user can act on, one class per cause, and the one table of their exit statuses.

``EXIT_STATUSES`` is used by every entry point: train.py, evaluate.py and generate.py (``dmd2.config.cli``) and
every ``python -m dmd2.<tool>`` (``run_tool``). README.md's "Exit statuses" is this table (tests/test_cli_errors.py
compares them). No cause subclasses another: a file that is missing is a FileError wherever it is found, and the
order of ``except`` clauses decides nothing.

This module imports nothing heavy: the entry points catch these errors before torch is loaded.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """An error caused by the user's input or settings, reported as one message and an exit status (no
    traceback). Never raised itself: each subclass below names one cause."""


class ConfigError(UserError, ValueError):
    """A value: an unknown key, a value of the wrong type or out of range, keys that contradict each other or
    what a file holds (classes, resolution), an option this installation cannot serve, a folder in use by
    another run."""


class FileError(UserError, ValueError):
    """A file or folder a key or argument names: missing, unreadable or unwritable, or not what the key expects
    (a folder holding other files, an output that would be replaced)."""


class FormatError(UserError, ValueError):
    """A file that is there but is not a valid checkpoint, export or imported network: truncated or corrupted,
    of another kind, with metadata or an architecture out of bounds, or weights that do not fit its arch."""




class EvaluationError(UserError, RuntimeError):
    """The evaluation set-up: a file the evaluation needs is missing or unusable (weights, statistics, feature
    network, reference images), or the evaluation does not fit what is measured (resolution, network, resize,
    sample count)."""


class TrainingFailed(UserError, RuntimeError):
    """No usable result: a run that went through its steps without one (every update skipped, or weights that
    are no longer finite); no final checkpoint is written."""


# error class -> exit status (README "Exit statuses"; 0 = done, 1 = any other error, with its traceback)
EXIT_STATUSES: dict[type[UserError], int] = {
    ConfigError: 2,
    FileError: 3,
    FormatError: 3,
    EvaluationError: 4,
    TrainingFailed: 5,
}
CONFIG_ERROR = EXIT_STATUSES[ConfigError]
FILE_ERROR = EXIT_STATUSES[FileError]
FORMAT_ERROR = EXIT_STATUSES[FormatError]
EVALUATION_ERROR = EXIT_STATUSES[EvaluationError]
TRAINING_FAILED = EXIT_STATUSES[TrainingFailed]


def exit_status(err: BaseException) -> int | None:
    """The exit status of ``err`` (its class's, or the nearest base class's, in ``EXIT_STATUSES``); None for an
    error no cause names (a bug)."""
    for cls in type(err).__mro__:
        if cls in EXIT_STATUSES:
            return EXIT_STATUSES[cls]  # type: ignore[index]
    return None


def run_tool(prog: str, work: Callable[[], int | None]) -> int:
    """Run a ``python -m`` tool's ``work`` (its main after parsing the arguments): 0 when done (or what it
    returns), else the exit status of the UserError it raised, after printing '<prog>: error: <message>'."""
    try:
        return work() or 0
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        status = exit_status(err)
        return status if status is not None else 1
