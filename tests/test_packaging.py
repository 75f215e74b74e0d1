"""What ``pip install ipiqa`` installs: every module of the four source folders, under the ipiqa name only.

An editable install hides a package missing from the wheel (the checkout is on the path), so these tests
build the real wheel from a copy of the build's inputs and read its file list.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE")


def pyproject(path: Path = PYPROJECT) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def package_dirs(path: Path = PYPROJECT) -> dict[str, str]:
    """pyproject's mapping: installed package name -> repo folder ("ipiqa.runtime" -> "runtime")."""
    return pyproject(path)["tool"]["setuptools"]["package-dir"]


def expected_modules(root: Path = ROOT) -> set[str]:
    """Every .py file under the mapped folders, as the path it must have inside the wheel."""
    found = set()
    for package, folder in package_dirs(root / "pyproject.toml").items():
        base = root / folder
        for py in base.rglob("*.py"):
            rel = py.relative_to(base)
            if "__pycache__" not in rel.parts:
                found.add("/".join([*package.split("."), *rel.parts]))
    return found


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    """Build the wheel (no isolation, no deps: seconds) from a copy, so the shared checkout gets no build/."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, src / name)
    for folder in set(package_dirs().values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", str(src), "-w", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("ipiqa-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_mapping_covers_the_four_source_folders():
    assert package_dirs() == {"ipiqa": "ipiqa", "ipiqa.export": "export", "ipiqa.runtime": "runtime",
                              "ipiqa.training": "training"}


def test_wheel_contains_every_package_under_the_four_folders(wheel_names):
    packages = {"/".join(p.split("/")[:-1]) for p in expected_modules() if p.endswith("/__init__.py")}
    assert "ipiqa/runtime/backends" in packages  # the subpackage a hand-written list once missed
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in wheel_names)
    assert not missing, f"packages missing from the wheel: {missing}"


def test_wheel_contains_every_module_under_the_four_folders(wheel_names):
    missing = sorted(expected_modules() - set(wheel_names))
    assert not missing, f"modules missing from the wheel: {missing}"


def test_wheel_installs_nothing_but_ipiqa_at_the_top_level(wheel_names):
    top = {name.split("/")[0] for name in wheel_names}
    assert top == {"ipiqa", f"ipiqa-{pyproject()['project']['version']}.dist-info"}, top
