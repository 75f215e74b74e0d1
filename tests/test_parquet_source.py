"""Parquet image columns: bytes, the Hugging Face {bytes, path} struct and path strings as rows, the row rules for
bad cells, clear refusals for a file that is not Parquet or lacks the column, and reading a row group at a time."""
from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import read_csv, same_model_tolerance
from test_shards import outputs
from ipiqa.cli import EXIT_ROW_ERRORS, cli
from ipiqa.errors import IPIQAError
from ipiqa.runtime.io import RowSource
from ipiqa.runtime.io.partitions import score_partitions

pa = pytest.importorskip("pyarrow", reason="needs ipiqa[parquet]")
pq = pytest.importorskip("pyarrow.parquet", reason="needs ipiqa[parquet]")


def png(seed: int, size=(40, 36)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def cli_run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An HF-style file (struct column, `text` prompts) with a corrupt cell, an empty cell and a null prompt;
    the same good images as loose files."""
    d = tmp_path_factory.mktemp("pq")
    images = [png(i) for i in range(4)]
    for i, b in enumerate(images):
        (d / f"{i}.png").write_bytes(b)
    cells = [{"bytes": images[0], "path": "a.png"}, {"bytes": b"\x89PNG broken", "path": None},
             {"bytes": images[1], "path": None}, None, {"bytes": None, "path": "2.png"},
             {"bytes": images[3], "path": None}]
    texts = ["p0", "p1", None, "p3", "p4", "p5"]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"img": pa.array(cells, struct), "text": texts}), d / "hf.parquet", row_group_size=2)
    return d


def test_a_struct_column_gives_one_row_per_cell_with_errors_only_in_bad_cells(tiny_model_file, data, tmp_path):
    res = cli_run("score", tiny_model_file, "--images", data / "hf.parquet", "--image-column", "img",
                  "--prompt-column", "text", "-o", tmp_path / "o.csv", "-q", "--batch", "4")
    assert res.exit_code == EXIT_ROW_ERRORS, res.output
    rows = read_csv(tmp_path / "o.csv")
    f = data / "hf.parquet"
    assert [r["image"] for r in rows] == [f"{f}::{i}" for i in range(6)]
    errors = [r["error"] for r in rows]
    assert errors[0] == errors[4] == errors[5] == ""  # row 4 has no bytes: its path (beside the file) is read
    assert errors[1] == f"{f}::1: not a readable image"
    assert "missing prompt" in errors[2] and errors[3] == f"{f}::3: no image (the image cell is empty)"


def test_bytes_cells_score_like_the_same_images_as_files(scorer, tiny_model_file, data, tmp_path):
    scorer.score_files(RowSource(data / "hf.parquet", image_column="img", prompt_column="text"), tmp_path / "a.csv")
    m = tmp_path / "m.csv"
    m.write_text(f"image,prompt\n{data}/0.png,p0\n{data}/2.png,p4\n{data}/3.png,p5\n")
    scorer.score_files(m, tmp_path / "b.csv")
    got = [r for r in read_csv(tmp_path / "a.csv") if not r["error"]]
    want = read_csv(tmp_path / "b.csv")
    tolerance = same_model_tolerance(tiny_model_file, [r["image"] for r in want], [r["prompt"] for r in want])
    assert len(got) == 3
    for a, b in zip(got, want):
        assert abs(float(a["quality"]) - float(b["quality"])) <= tolerance


def test_a_path_column_resolves_against_the_files_folder_like_a_manifest(scorer, data, tmp_path):
    pq.write_table(pa.table({"image": ["0.png", "missing.png"], "prompt": ["a", "b"]}), data / "paths.parquet")
    rows = list(RowSource(data / "paths.parquet"))
    assert [r.image for r in rows] == [str(data / "0.png"), str(data / "missing.png")]
    scorer.score_files(RowSource(data / "paths.parquet"), tmp_path / "o.csv")
    out = read_csv(tmp_path / "o.csv")
    assert out[0]["error"] == "" and "file not found" in out[1]["error"]


def test_a_binary_column_and_a_folder_of_files_score_into_one_output_per_file(scorer, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):
        pq.write_table(pa.table({"image": pa.array([png(10 * k + i) for i in range(3)], pa.binary()),
                                 "prompt": [f"p{i}" for i in range(3)]}), src / f"part-{k}.parquet")
    summary = score_partitions(scorer, RowSource(src), tmp_path / "out", fmt="jsonl")
    assert (summary.scored, summary.rows, summary.errors) == (2, 6, 0)
    assert outputs(tmp_path / "out") == ["part-0.jsonl", "part-1.jsonl"]


@pytest.mark.parametrize("content", [b"", b"PAR1 but not really", b"image,prompt\nx.png,a\n"])
def test_a_file_that_is_not_parquet_is_refused_in_one_line_naming_it(tiny_model_file, tmp_path, content):
    (tmp_path / "bad.parquet").write_bytes(content)
    res = cli_run("score", tiny_model_file, "--images", tmp_path / "bad.parquet", "--prompt", "x", "-q")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"{tmp_path}/bad.parquet: not a Parquet file" in res.output


def test_a_missing_or_mistyped_column_is_refused_naming_what_the_file_has(tmp_path):
    pq.write_table(pa.table({"pixels": [1, 2], "caption": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(IPIQAError, match=r"no image column 'image'; found \['pixels', 'caption'\]"):
        RowSource(tmp_path / "x.parquet")
    with pytest.raises(IPIQAError, match="column 'pixels' is int64"):
        RowSource(tmp_path / "x.parquet", image_column="pixels")
    with pytest.raises(IPIQAError, match="no prompt column 'text'"):
        RowSource(tmp_path / "x.parquet", image_column="caption", prompt_column="text")


def test_a_text_model_without_a_prompt_column_or_prompt_is_refused(scorer, tmp_path):
    pq.write_table(pa.table({"image": pa.array([png(1)], pa.binary())}), tmp_path / "x.parquet")
    with pytest.raises(IPIQAError, match="no prompts"):
        scorer.score_files(RowSource(tmp_path / "x.parquet"), tmp_path / "o.csv")
    scorer.score_files(RowSource(tmp_path / "x.parquet", "a prompt"), tmp_path / "o.csv")
    assert read_csv(tmp_path / "o.csv")[0]["error"] == ""


def test_memory_follows_the_read_batch_not_the_file(tmp_path):
    """Arrow's allocations while reading are the same for a file 4x as long, and a small part of either."""
    from ipiqa.runtime.io.parquet_source import PARQUET_READ_ROWS

    blob = np.random.default_rng(0).bytes(100_000)  # an incompressible 'image' cell
    pool = pa.default_memory_pool()
    peaks = []
    for rows in (100, 400):  # 10 and 40 MB, row groups of 4 rows
        path = tmp_path / f"big{rows}.parquet"
        pq.write_table(pa.table({"image": pa.array([blob] * rows, pa.binary()), "prompt": ["p"] * rows}), path,
                       row_group_size=4, compression="none")
        base, peak, n = pool.bytes_allocated(), 0, 0
        for _ in RowSource(path):
            peak, n = max(peak, pool.bytes_allocated() - base), n + 1
        assert n == rows
        peaks.append(peak)
    assert peaks[1] <= 1.25 * peaks[0] and peaks[1] < 3 * PARQUET_READ_ROWS * len(blob) < 400 * len(blob) / 4
