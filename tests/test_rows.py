"""The row rules (runtime.rows) hold on every entry point: Python API, file runs and the CLI give the same row."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import read_csv
from ipiqa.errors import IPIQAError
from ipiqa.runtime.io import Row, read_rows
from ipiqa.runtime.rows import MISSING_PROMPT, clean_prompt, score_error
from ipiqa.runtime.scorer import Scorer


_csv = read_csv


@pytest.mark.parametrize("value", ["NaN", "nan", "null", "None", "0", " x ", "日本"])
def test_any_non_blank_text_is_a_prompt(value):
    assert clean_prompt(value) == value


@pytest.mark.parametrize("value", [None, "", "   ", "\t\n", float("nan")])
def test_only_empty_blank_null_or_nan_float_is_a_missing_prompt(value):
    assert clean_prompt(value) is None


@pytest.mark.parametrize("word", ["NaN", "null", "None"])
def test_words_that_look_missing_are_scored_in_a_csv_manifest(scorer, image, tmp_path, word):
    m = tmp_path / "m.csv"
    m.write_text(f"image,prompt\n{image},{word}\n", encoding="utf-8")
    scorer.score_files(m, tmp_path / "o.csv")
    (row,) = _csv(tmp_path / "o.csv")
    assert row["error"] == "" and row["prompt"] == word and float(row["quality"])


def test_jsonl_null_and_absent_key_are_missing_but_the_string_null_is_a_prompt(scorer, image, tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in [{"image": str(image), "prompt": None}, {"image": str(image)},
                                                   {"image": str(image), "prompt": "null"}]) + "\n")
    scorer.score_files(m, tmp_path / "o.jsonl")
    recs = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["error"] == MISSING_PROMPT for r in recs] == [True, True, False]


def test_a_blank_prompt_is_missing_in_the_api_and_in_file_runs_alike(scorer, image, tmp_path):
    (api,) = scorer.score([image], ["   "])
    scorer.score_files([Row(str(image), clean_prompt("   "))], tmp_path / "o.csv")
    (files,) = _csv(tmp_path / "o.csv")
    assert api["error"] == files["error"] == MISSING_PROMPT


def test_a_blank_default_prompt_for_a_folder_is_refused_before_the_run(scorer, image, tmp_path):
    with pytest.raises(IPIQAError, match="no prompts"):
        scorer.score_files(image.parent, tmp_path / "o.csv", prompt="  ")


def test_default_prompt_fills_only_missing_cells(image, tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(f"image,prompt\n{image},own\n{image},\n", encoding="utf-8")
    assert [r.prompt for r in read_rows(m, prompt="default")] == ["own", "default"]


def test_a_non_finite_score_is_an_error_row_in_the_api_and_in_file_runs(tiny_bundle, image, tmp_path, monkeypatch):
    with Scorer(tiny_bundle, device="cpu") as s:
        monkeypatch.setattr(s, "score_arrays", lambda x, p: np.full((len(x), len(s.outputs)), np.nan))
        (api,) = s.score([image], ["a cat"])
        s.score_files([Row(str(image), "a cat")], tmp_path / "o.csv")
    (files,) = _csv(tmp_path / "o.csv")
    assert api["quality"] is None and api["error"] == files["error"] == score_error([float("nan")] * 2)
    assert files["quality"] == ""


def test_an_unreadable_jsonl_line_is_an_error_row_and_the_next_line_is_scored(scorer, image, tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "%s", "prompt": "a"}\n{not json\n{"image": "%s", "prompt": "b"}\n' % (image, image))
    summary = scorer.score_files(m, tmp_path / "o.jsonl")
    recs = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert summary.rows == 3 and "m.jsonl:2: unreadable manifest line" in recs[1]["error"]
    assert recs[0]["error"] is None and recs[2]["error"] is None


BAD_INPUTS = ["fifo", "dev_zero", "missing", "blank prompt", "NaN prompt", "corrupt"]


def _bad_rows(tmp_path, image):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really")
    return [Row(str(fifo), "a"), Row("/dev/zero", "a"), Row(str(tmp_path / "missing.png"), "a"),
            Row(str(image), None), Row(str(image), "NaN"), Row(str(corrupt), "a")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_special_files_become_error_rows_and_the_run_finishes(tiny_bundle, image, tmp_path):
    """A FIFO would block open() forever: the CLI must finish (timeout = regression) with an error row for it."""
    rows = _bad_rows(tmp_path, image)
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "prompt"])
        w.writerows([[r.image, r.prompt or ""] for r in rows])
    out = tmp_path / "o.csv"
    proc = subprocess.run([sys.executable, "-m", "ipiqa.cli", "score", str(tiny_bundle), "--images", str(manifest),
                           "-o", str(out), "--device", "cpu", "-q", "--allow-errors"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = _csv(out)
    assert [r["image"] for r in got] == [r.image for r in rows]
    assert "named pipe" in got[0]["error"] and "not a regular file" in got[1]["error"]
    assert "file not found" in got[2]["error"] and got[3]["error"] == MISSING_PROMPT
    assert got[4]["error"] == "" and "corrupt" in got[5]["error"] or "not a readable image" in got[5]["error"]
    with Scorer(tiny_bundle, device="cpu") as s:  # the Python API gives the same rows
        api = s.score([r.image for r in rows], [r.prompt for r in rows])
    assert [a["error"] or "" for a in api] == [r["error"] for r in got]


# ---------------------------------------------------------------- size limits, before any decoding or tokenizing

from ipiqa import preprocess  # noqa: E402
from ipiqa.runtime.pipeline import decode_row  # noqa: E402
from ipiqa.runtime.rows import MAX_PROMPT_CHARS, image_bytes  # noqa: E402


class _Recorder:
    """A tokenizer that records every prompt it is given."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, prompts):
        self.seen.extend(prompts)
        return self.inner(prompts)


def test_a_prompt_above_the_limit_is_an_error_row_naming_it_and_never_tokenized(scorer, image, monkeypatch):
    recorder = _Recorder(scorer.tokenizer)
    monkeypatch.setattr(scorer, "tokenizer", recorder)
    long = "a red fox " * (MAX_PROMPT_CHARS // 10 + 1)
    (bad, good) = scorer.score([str(image), str(image)], [long, "a red fox"])
    assert bad["error"].startswith(f"prompt of {len(long)} characters is above the {MAX_PROMPT_CHARS}-character limit")
    assert good["error"] is None and all(len(p) < 100 for p in recorder.seen)


def test_a_prompt_at_the_limit_is_scored(scorer, image):
    (record,) = scorer.score([str(image)], ["x" * MAX_PROMPT_CHARS])
    assert record["error"] is None


def test_an_image_only_model_ignores_a_long_prompt():
    assert row_error_for(Row("a.png", "x" * (MAX_PROMPT_CHARS + 1)), needs_prompt=False) is None


def row_error_for(row, needs_prompt):
    from ipiqa.runtime.rows import row_error

    return row_error(row, needs_prompt)


def test_an_image_file_above_the_byte_limit_is_an_error_row_naming_the_limit(scorer, image, monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_IMAGE_BYTES", image.stat().st_size - 1)
    (record,) = scorer.score([str(image)], ["a red fox"])
    assert record["error"].startswith(f"{image}: ") and "MiB limit (ipiqa.preprocess.MAX_IMAGE_BYTES)" in record["error"]


def test_image_bytes_above_the_limit_are_refused_before_decoding(image, monkeypatch):
    data = image.read_bytes()
    monkeypatch.setattr(preprocess, "MAX_IMAGE_BYTES", len(data) - 1)
    monkeypatch.setattr(preprocess, "_decode", lambda *a: pytest.fail("decoded an oversized image"))
    pixels, error = decode_row(Row("shard.tar::k", "a fox", source=data), 64, True)
    assert pixels is None and error.startswith("shard.tar::k: ") and "MiB limit" in error
    with pytest.raises(IPIQAError, match="MiB limit"):
        image_bytes(Row(str(image), "a fox"))  # what --server sends: refused before the file is read
