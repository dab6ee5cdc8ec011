"""DMD2: distill class-conditional EDM diffusion models into one-step generators.

    import dmd2
    gen = dmd2.load_generator("exports/dmd2-cifar10")        # or a checkpoint .pt, or hf://owner/repo
    images = gen.sample(labels=["cat", "dog"], seeds=[0, 1])  # uint8 [2, 3, 32, 32]
"""
from __future__ import annotations

from typing import Any

from dmd2.version import __version__

__all__ = ["Generator", "load_generator", "export_generator", "__version__"]


def __getattr__(name: str) -> Any:  # the API loads torch and the networks only when first used
    if name in ("Generator", "load_generator"):
        from dmd2.io import loaded

        return getattr(loaded, name)
    if name == "export_generator":
        from dmd2.io.export import export_generator

        return export_generator
    raise AttributeError(f"module 'dmd2' has no attribute {name!r}")
