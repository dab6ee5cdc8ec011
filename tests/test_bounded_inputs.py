"""Untrusted files and values are checked against what they can hold before anything is allocated: seed ranges,
EDM pickles (declared byte counts, tensor views, architectures) and export folders (architecture and resolution
against the weights' bytes). Each refusal must come at once and without a big allocation."""
from __future__ import annotations

import tracemalloc
from contextlib import contextmanager
from typing import Iterator

import pytest

from dmd2.config import ConfigError, check_settings
from dmd2.errors import GeneratorError
from dmd2.seeds import MAX_SEEDS, count_seeds, parse_seeds
from tests.conftest import compose_cfg


@contextmanager
def peak_below(limit_mb: float) -> Iterator[None]:
    """Fail when the Python allocations in the block peak above ``limit_mb`` (tracemalloc: Python objects and
    NumPy / PyTorch CPU buffers allocated through Python's allocator are counted)."""
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < limit_mb * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_seed_ranges_are_checked_without_building_the_list():
    assert count_seeds("0-9,20,30-32") == 14 and count_seeds(["0-99999", 5]) == 100001
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7] and len(parse_seeds(f"0-{MAX_SEEDS - 1}")) == MAX_SEEDS
    cfg = compose_cfg(["checkpoint=x.pt", "seeds=0-99999999"], config_name="generate")
    with peak_below(5):
        with pytest.raises(ConfigError, match=r"'seeds' = '0-99999999'.*at most 1000000 seeds"):
            check_settings(cfg)
        with pytest.raises(GeneratorError, match=r"names 100000000 seeds; one run takes at most 1000000"):
            parse_seeds("0-99999999")
        with pytest.raises(GeneratorError, match="at most"):
            parse_seeds([f"0-{MAX_SEEDS - 1}", 7])  # the count over every part
