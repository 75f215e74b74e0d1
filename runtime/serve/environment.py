"""The process environment PyTriton's python stub needs, prepared before the server (and the bundle) starts.

Two facts of this PyTriton (0.7):
- Its python-backend stub links ``libpython3.11``; a stub that loads the system's copy under a venv of another
  3.11 build fails (``'_thread.RLock' object has no attribute '_recursion_count'``). ``prepare_environment`` puts
  this interpreter's own ``LIBDIR`` first on ``LD_LIBRARY_PATH`` before the server process starts.
- Its stub reads numpy arrays with numpy 1.x's layout (the serve extra pins ``numpy<2``): under numpy 2 every
  array it hands over is garbage. ``prepare_environment`` refuses that environment with the fix.
"""
from __future__ import annotations

import os
import sysconfig

import numpy as np

from ipiqa.errors import IPIQAError

__all__ = ["prepare_environment"]


def prepare_environment() -> None:
    """Refuse numpy 2; put this interpreter's libpython first on ``LD_LIBRARY_PATH`` (see the module docstring)."""
    major = int(np.__version__.split(".")[0])
    if major >= 2:
        raise IPIQAError(f"ipiqa serve: PyTriton's python stub needs numpy<2 (it reads arrays with numpy 1.x's "
                         f"layout), and numpy {np.__version__} is installed; install the serve extra into its own "
                         "environment: pip install 'ipiqa[serve]' (it resolves numpy<2), or pip install 'numpy<2'")
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return  # a static interpreter: the stub loads the system libpython, which is then the only one
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if paths[:1] != [libdir]:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *[p for p in paths if p != libdir]])
