"""Seed lists as EDM's generate.py takes them (pure parsing: used by the config schema and the generator)."""
from __future__ import annotations

from typing import Any

from dmd2.errors import GeneratorError


def parse_seeds(spec: Any) -> list[int]:
    """Seeds as EDM's generate.py takes them: 7, '0-63', '0-9,20,30-32' or a list of those -> [ints]."""
    if isinstance(spec, bool):
        raise GeneratorError(f"seeds: expected a number, a range like 0-63 or a list, got {spec!r}")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)) or (hasattr(spec, "__iter__") and not isinstance(spec, str)):
        return [s for part in spec for s in parse_seeds(part)]
    seeds: list[int] = []
    for part in str(spec).split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise GeneratorError(f"seeds: {part!r} is not a number or a range like 0-63") from None
        if first < 0 or last < first:
            raise GeneratorError(f"seeds: {part!r} is not a range of non-negative numbers low-high")
        seeds.extend(range(first, last + 1))
    return seeds
