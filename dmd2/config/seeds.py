"""Seed lists as EDM's generate.py takes them (pure parsing: used by the config schema and the generator).

A spec is checked arithmetically (``seed_ranges`` / ``count_seeds``) before any list is built, so a range such
as 0-99999999 is refused at once, without materialising it: ``parse_seeds`` builds at most ``MAX_SEEDS``."""
from __future__ import annotations

from typing import Any

from dmd2.config.errors import ConfigError

MAX_SEEDS = 1_000_000  # seeds one run takes (20x a 50k-image FID set); more: split the range over several runs


def seed_ranges(spec: Any) -> list[tuple[int, int]]:
    """The inclusive (first, last) ranges of a seed spec (7, '0-63', '0-9,20,30-32' or a list of those), checked
    without expanding them (ConfigError naming the part that is wrong)."""
    if isinstance(spec, bool):
        raise ConfigError(f"seeds: expected a number, a range like 0-63 or a list, got {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise ConfigError(f"seeds: {spec} is negative")
        return [(spec, spec)]
    if isinstance(spec, (list, tuple)) or (hasattr(spec, "__iter__") and not isinstance(spec, str)):
        return [r for part in spec for r in seed_ranges(part)]
    ranges: list[tuple[int, int]] = []
    for part in str(spec).split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError(f"seeds: {part!r} is not a number or a range like 0-63") from None
        if first < 0 or last < first:
            raise ConfigError(f"seeds: {part!r} is not a range of non-negative numbers low-high")
        ranges.append((first, last))
    return ranges


def count_seeds(spec: Any) -> int:
    """How many seeds ``spec`` names (repeats counted), computed from its ranges; ConfigError when it is
    malformed or names more than ``MAX_SEEDS``."""
    count = sum(last - first + 1 for first, last in seed_ranges(spec))
    if count > MAX_SEEDS:
        raise ConfigError(f"seeds: {spec!r} names {count} seeds; one run takes at most {MAX_SEEDS} (split the "
                             f"range over several runs, e.g. seeds=0-{MAX_SEEDS - 1}, then "
                             f"seeds={MAX_SEEDS}-{2 * MAX_SEEDS - 1})")
    return count


def parse_seeds(spec: Any) -> list[int]:
    """Seeds as EDM's generate.py takes them: 7, '0-63', '0-9,20,30-32' or a list of those -> [ints] (at most
    ``MAX_SEEDS``, checked before the list is built)."""
    count_seeds(spec)
    return [s for first, last in seed_ranges(spec) for s in range(first, last + 1)]
