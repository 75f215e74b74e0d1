"""Exceptions users see. Each message names the file and the fix; the CLI prints them without a traceback."""
from __future__ import annotations

__all__ = ["IPIQAError", "CheckpointError", "ImageError", "BundleError", "MissingDependencyError"]


class IPIQAError(Exception):
    """Base of every error ipiqa raises on purpose (bad input, bad file, missing extra)."""


class CheckpointError(IPIQAError):
    """A weights file is unreadable, incomplete or of another model."""


class ImageError(IPIQAError):
    """One image cannot be scored; batch runs record it as an error row and carry on."""


class BundleError(IPIQAError):
    """An export bundle is incomplete, tampered with, or built for another machine or version."""


class MissingDependencyError(IPIQAError, ImportError):
    """An optional dependency is absent; the message carries the pip command that adds it."""
