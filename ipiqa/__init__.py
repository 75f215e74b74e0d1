"""IP-IQA: prompt-aware quality assessment of AI-generated images.

Importing ``ipiqa`` loads no torch: the heavy names below resolve on first use (PEP 562), so the
torch-free runtime can share this package.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from .config import IPIQAConfig
from .errors import BundleError, CheckpointError, ConfigError, ImageError, IPIQAError

__version__ = "0.1.0"
__all__ = ["IPIQAConfig", "IPIQAError", "ConfigError", "CheckpointError", "ImageError", "BundleError",
           "IPIQA", "tokenize", "load_model", "save_model", "import_official"]

_LAZY = {
    "IPIQA": "ipiqa.model",
    "tokenize": "ipiqa.model",
    "load_model": "ipiqa.checkpoint",
    "save_model": "ipiqa.checkpoint",
    "import_official": "ipiqa.official",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ipiqa' has no attribute {name!r}")
