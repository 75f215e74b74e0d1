"""The ipiqa command line, end to end: every input row gets an output row; failures are one clear line."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_image
from ipiqa.cli import EXIT_ROW_ERRORS, cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(5):
        make_image(d / f"img{i}.png", seed=i)
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (d / "notes.txt").write_text("ignored: not an image suffix")
    return d


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_score_folder_with_one_corrupt_file_writes_every_other_row(tiny_model_file, folder, tmp_path):
    out = tmp_path / "scores.csv"
    res = run("score", tiny_model_file, "--images", folder, "--prompt", "a cat", "-o", out, "--batch", "2", "-q")
    assert res.exit_code == EXIT_ROW_ERRORS
    rows = _read_csv(out)
    assert [Path(r["image"]).name for r in rows] == sorted(p.name for p in folder.iterdir() if p.suffix != ".txt")
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and "corrupt.jpg" in bad[0]["error"] and bad[0]["quality"] == ""
    assert all(float(r["quality"]) == float(r["quality"]) and r["alignment"] for r in rows if not r["error"])


def test_allow_errors_exits_zero(tiny_model_file, folder, tmp_path):
    res = run("score", tiny_model_file, "--images", folder, "--prompt", "a cat", "-o", tmp_path / "s.csv",
              "--allow-errors", "-q")
    assert res.exit_code == 0


def test_scores_do_not_depend_on_batch_size(tiny_model_file, folder, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    run("score", tiny_model_file, "--images", folder, "--prompt", "x", "-o", a, "--batch", "1", "-q")
    run("score", tiny_model_file, "--images", folder, "--prompt", "x", "-o", b, "--batch", "4", "-q")
    for ra, rb in zip(_read_csv(a), _read_csv(b)):
        assert ra["quality"] == rb["quality"] or abs(float(ra["quality"]) - float(rb["quality"])) < 1e-5


def test_manifest_with_bom_relative_paths_and_missing_prompt(tiny_model_file, folder, tmp_path):
    manifest = folder / "list.csv"
    manifest.write_text("\ufeffimage,prompt\nimg0.png,a red fox\nimg1.png,\nmissing.png,a cat\n", encoding="utf-8")
    out = tmp_path / "s.jsonl"
    res = run("score", tiny_model_file, "--images", manifest, "-o", out, "-q")
    assert res.exit_code == EXIT_ROW_ERRORS
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] is None for r in recs] == [True, False, False]
    assert "missing prompt" in recs[1]["error"] and "file not found" in recs[2]["error"]
    assert isinstance(recs[0]["quality"], float) and recs[0]["prompt"] == "a red fox"


def test_manifest_without_image_column_is_refused_with_the_columns_found(tiny_model_file, tmp_path):
    (tmp_path / "m.csv").write_text("path,prompt\na.png,x\n")
    res = run("score", tiny_model_file, "--images", tmp_path / "m.csv")
    assert res.exit_code == 1 and "missing column(s) ['image']" in res.output and "Traceback" not in res.output


def test_folder_without_prompt_is_refused(tiny_model_file, folder):
    res = run("score", tiny_model_file, "--images", folder)
    assert res.exit_code == 1 and "--prompt" in res.output


def test_score_with_authors_pth_instead_of_model_says_how_to_import(authors_224_linear, folder):
    res = run("score", authors_224_linear[0], "--images", folder, "--prompt", "x")
    assert res.exit_code == 1 and "import-official" in res.output


def test_import_official_cli_writes_a_loadable_model(authors_224_linear, tmp_path):
    ft, clip_path, _, _ = authors_224_linear
    out = tmp_path / "m.safetensors"
    res = run("import-official", ft, "--clip", clip_path, "-o", out, "--outputs", "mos")
    assert res.exit_code == 0, res.output
    info = json.loads(run("info", out).output)
    assert (info["resolution"], info["outputs"], info["head"]) == (224, ["mos"], "linear")


def test_import_official_cli_failure_is_one_line_without_traceback(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 10)
    (tmp_path / "clip.pt").write_bytes(b"\x00" * 10)
    proc = subprocess.run([sys.executable, "-m", "ipiqa.cli", "import-official", str(tmp_path / "junk.pth"),
                           "--clip", str(tmp_path / "clip.pt"), "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "junk.pth" in proc.stderr and "Traceback" not in proc.stderr


def test_help_teaches_with_examples():
    assert "Example" in run("score", "--help").output
    assert "import-official" in run("--help").output


@pytest.mark.slow
def test_demo_runs_reference_export_and_runtime_which_agree(tmp_path):
    res = run("demo", "--out", tmp_path / "demo", "--resolution", "224")
    assert res.exit_code == 0, res.output
    ref, rt = (_read_csv(tmp_path / "demo" / f"scores_{k}.csv") for k in ("reference", "runtime"))
    assert len(ref) == len(rt) == 7 and sum(bool(r["error"]) for r in rt) == 1
    assert len({r["quality"] for r in ref if not r["error"]}) == 6  # inputs differ -> scores differ
    for a, b in zip(ref, rt):
        if not a["error"]:
            assert abs(float(a["quality"]) - float(b["quality"])) <= 1e-4
    assert "reference" in res.output and "runtime" in res.output
