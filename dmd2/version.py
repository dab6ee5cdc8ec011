"""The package version (its own module, so that modules needing it do not import the package's API)."""
__version__ = "0.1.0"
