"""Exceptions users see. Each message names the file and the fix; the CLI prints them without a traceback."""
from __future__ import annotations

__all__ = ["IPIQAError", "ConfigError", "CheckpointError", "ImageError", "BundleError", "MissingDependencyError"]


class IPIQAError(Exception):
    """Base of every error ipiqa raises on purpose (bad input, bad file, missing extra)."""


class ConfigError(IPIQAError, ValueError):
    """A config or settings value is wrong: a model config, a training config file, an option's value.

    The message names the key (or option), the value given and what is allowed. It is a ValueError too, so
    code that validates with ``except ValueError`` keeps working.
    """


class CheckpointError(IPIQAError):
    """A weights file is unreadable, incomplete or of another model."""


class ImageError(IPIQAError):
    """One image cannot be scored; batch runs record it as an error row and carry on."""


class BundleError(IPIQAError):
    """An export bundle is incomplete, tampered with, or built for another machine or version."""


class MissingDependencyError(IPIQAError, ImportError):
    """An optional dependency is absent; the message carries the pip command that adds it."""
