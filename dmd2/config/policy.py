"""Each key's policy, read from the schema (``dmd2.config.settings.Policy``): whether it may change when a run is
resumed, whether an override of it goes into a run's name, whether runs that differ in it are different groups
in ``python -m dmd2.compare``.

A setting declares its policy beside its meaning and rule (``setting(..., policy=ADJUSTABLE)``); a section
(``group`` / ``chosen``: eval, perf, paths, logger, ...) declares it for every key inside it, and a key inside may
set its own (data.num_workers). A flag nobody sets is the default (``DEFAULT_POLICY``: refused on resume, named,
splits groups). Keys that are no schema setting (world_size, teacher_sha256, hydra.*, local, ...) take theirs
from ``dmd2.config.settings.OTHER_KEYS``.

    resume_safe("lr")                  # True: takes effect from the resumed step
    names_a_run("data.num_workers")   # False: left out of run names
    splits_groups("seed")              # False: runs of other seeds are repetitions
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

from dmd2.config.settings import (DEFAULT_POLICY, OTHER_KEYS, SCHEMAS, DistillSettings, EvaluateSettings, Policy,
                                  TeacherSettings)

TRAINING = (TeacherSettings, DistillSettings)  # the settings a training run stores (checkpoints, config.yaml)
NAMED = (TeacherSettings, DistillSettings, EvaluateSettings)  # the scripts that name their runs from overrides
FLAGS = tuple(f.name for f in dataclasses.fields(Policy))


def options(name: str) -> list[type]:
    """The schemas of the config group ``name`` (the options of a ``chosen`` section): arch -> SimpleUNetArch,
    EDMUNetArch, ..."""
    return [node for path, node in SCHEMAS.items() if path.split("/")[1] == name]


def inner_schemas(f: dataclasses.Field) -> list[type]:
    """The schemas of the keys inside field ``f``: its group's node, a chosen section's options, or none."""
    if f.metadata.get("chosen"):
        return options(f.name)
    factory: Any = f.default_factory
    return [factory] if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory) else []


def declared(key: str, schemas: tuple[type, ...]) -> list[Policy]:
    """The policies that hold for ``key`` (dotted, or Hydra's group/option form), outermost first: those of its
    enclosing sections and its own, as far as ``schemas`` define it; for a key no schema has, its ``OTHER_KEYS``
    entry. The first schema that has a part decides it (tests/test_config.py checks they agree)."""
    parts = [p for p in re.split(r"[./]", key) if p]
    nodes: list[type] = list(schemas)
    found: list[Policy] = []
    for part in parts:
        field = next((f for node in nodes for f in dataclasses.fields(node) if f.name == part), None)
        if field is None:
            break
        found.append(field.metadata.get("policy", Policy()))
        nodes = inner_schemas(field)
    if not found and parts and parts[0] in OTHER_KEYS:
        found.append(OTHER_KEYS[parts[0]])
    return found


@functools.lru_cache(maxsize=4096)
def key_policy(key: str, schemas: tuple[type, ...]) -> Policy:
    """The policy of ``key`` with every flag decided: the innermost one set, else ``DEFAULT_POLICY``'s."""
    flags = {}
    for name in FLAGS:
        values = [getattr(p, name) for p in declared(key, schemas) if getattr(p, name) is not None]
        flags[name] = values[-1] if values else getattr(DEFAULT_POLICY, name)
    return Policy(**flags)


def resume_safe(key: str) -> bool:
    """Whether ``key`` of a training run's stored config may differ when the run is resumed (announced, in effect
    from the resumed step); any other difference is refused unless resume_allow_changes=true."""
    return bool(key_policy(key, TRAINING).resume_safe)


def names_a_run(key: str) -> bool:
    """Whether a command-line override of ``key`` (train.py or evaluate.py) belongs in the run's name: keys that
    only place or name a run (output_dir, device, logger.*, hydra.*, ...) are left out."""
    return bool(key_policy(key, NAMED).names_run)


def splits_groups(key: str) -> bool:
    """Whether training runs whose configs differ in ``key`` are different groups in ``python -m dmd2.compare``
    (not for a seed, a path, a name: runs differing only in those are repetitions of one setting)."""
    return bool(key_policy(key, TRAINING).splits_compare)
