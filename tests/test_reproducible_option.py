"""``--reproducible`` reaches every local scorer the command builds (file, --output-dir, Ray workers) and is refused
with --server, whose own setting applies; on the CPU the engine batch is fixed either way."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_image
from ipiqa.cli import cli
from ipiqa.runtime import scorer as scorer_module


@pytest.fixture
def built(monkeypatch):
    """Every Scorer the CLI builds, with the keyword arguments it was given."""
    made = []
    real = scorer_module.Scorer

    class Recording(real):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(scorer_module, "Scorer", Recording)
    return made


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    for i in range(3):
        make_image(tmp_path / "images" / f"{i}.png", seed=i)
    return tmp_path / "images"


@pytest.mark.parametrize("flag", [[], ["--reproducible"]], ids=["default", "reproducible"])
def test_the_file_mode_builds_its_scorer_with_the_flag(tiny_bundle, folder, tmp_path, built, flag):
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(cli, ["score", str(tiny_bundle), "--images", str(folder), "--prompt", "a cat",
                                      "-o", str(out), "-q", *flag])
    assert result.exit_code == 0, result.output
    assert [kw["reproducible"] for kw in built] == [bool(flag)]


def test_the_folder_mode_builds_its_scorer_with_the_flag(tiny_bundle, folder, tmp_path, built):
    result = CliRunner().invoke(cli, ["score", str(tiny_bundle), "--images", str(folder), "--prompt", "a cat",
                                      "--output-dir", str(tmp_path / "scores"), "-q", "--reproducible"])
    assert result.exit_code == 0, result.output
    assert [kw["reproducible"] for kw in built] == [True]


def test_reproducible_with_a_server_is_refused_naming_the_option(folder):
    result = CliRunner().invoke(cli, ["score", "--server", "localhost:1", "--images", str(folder), "--prompt", "x",
                                      "--reproducible"])
    assert result.exit_code == 1 and "--reproducible" in result.output and "Traceback" not in result.output
