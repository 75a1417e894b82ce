"""The package version, recorded in every checkpoint's meta.json and every benchmark result."""

__version__ = "0.1.0"
