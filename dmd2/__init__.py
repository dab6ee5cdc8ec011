"""DMD2: distill class-conditional EDM diffusion models into one-step generators."""

__version__ = "0.1.0"
