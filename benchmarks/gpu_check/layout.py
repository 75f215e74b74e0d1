"""The repository's package layout without an install: ``ipiqa.export``/``runtime``/``training`` live in
top-level folders (pyproject's ``package-dir``), so a bare GPU machine with ``PYTHONPATH=.`` sees ``ipiqa`` but
not its subpackages. Installing ipiqa there would need a build backend the image may lack; mapping the folders
as pyproject maps them costs nothing and runs the working tree as it is.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["ROOT", "package_dirs", "ensure_layout"]

ROOT = Path(__file__).resolve().parents[2]


def package_dirs(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, Path]:
    """``[tool.setuptools.package-dir]`` of pyproject: package name -> folder (the one source of the layout)."""
    import tomllib

    table = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-dir"]
    return {name: pyproject.parent / folder for name, folder in table.items()}


def ensure_layout() -> list[str]:
    """Make each mapped subpackage importable from its folder where nothing installed provides it
    -> the names mapped here (none in an installed or editable environment)."""
    import ipiqa

    mapped = []
    for name, folder in package_dirs().items():
        if name == "ipiqa" or name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(ipiqa, name.rsplit(".", 1)[1], module)
        mapped.append(name)
    return mapped
