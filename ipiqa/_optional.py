"""Import optional dependencies lazily, with an error that says which extra installs them."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise naming ``pip install 'ipiqa[extra]'``. Never installs anything."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"'{module}' is needed here but could not be imported ({exc}). "
            f"Install it with: pip install 'ipiqa[{extra}]'"
        ) from exc
