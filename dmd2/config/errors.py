"""Errors caused by a user's input, and the exit status each gives train.py, evaluate.py and generate.py.

This module imports nothing heavy: the scripts' entry points catch these errors (see ``dmd2.config.cli``) before torch is
loaded. The statuses are documented in README.md ("Exit statuses").
"""
from __future__ import annotations

CONFIG_ERROR = 2  # a config value: unknown key, a key of the other stage, wrong type, out of range, contradictions
FILE_ERROR = 3  # a file or folder a key names is missing or unusable: checkpoint, export, dataset, resume file
EVALUATION_ERROR = 4  # the FID / FD setup: feature-network weights, reference statistics or images
TRAINING_FAILED = 5  # training ended without a usable result: every update skipped, or non-finite weights


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range."""


class FileError(ConfigError):
    """A file or folder named by a config key does not exist or is not what the key expects."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or not of the expected kind."""


class GeneratorError(ValueError):
    """A source that cannot be loaded, or labels / seeds that do not fit the model."""


class EvaluationError(RuntimeError):
    """A file the evaluation needs is missing or unusable (weights, statistics, feature network), or the evaluation
    does not fit what is measured (resolution, network, resize, sample count)."""


class TrainingFailed(RuntimeError):
    """A run that went through its steps without a usable result (every update skipped, or weights that are no
    longer finite): no final checkpoint is written."""
