"""Import optional dependencies lazily, with an error that says which extra installs them."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["require", "require_torch"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise naming ``pip install 'ipiqa[extra]'``. Never installs anything."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # One line: a broken install can raise a long multi-line ImportError; the fix is what the user needs.
        cause = " ".join(str(exc).split())
        cause = cause if len(cause) <= 200 else cause[:197] + "..."
        raise MissingDependencyError(
            f"'{module}' is needed here but could not be imported ({cause}). "
            f"Install it with: pip install 'ipiqa[{extra}]'"
        ) from exc


def require_torch(extra: str = "torch") -> None:
    """The PyTorch reference needs torch and open_clip (``ipiqa.model`` builds on its modules).

    Checked up front by commands that load the model, so a base install gets the pip command for the
    extra that command needs (``torch``, ``export`` or ``train``) instead of a ModuleNotFoundError.
    """
    require("torch", extra=extra)
    require("open_clip", extra=extra)
