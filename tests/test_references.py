"""Manifest rows naming a shard sample (SHARD::KEY) or a Parquet row (FILE::ROW): read from that member or row,
in the manifest's order, each file streamed once when the manifest follows its order; a bad reference is that
row's error only."""
from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from ipiqa.runtime.io import Row, RowSource
from ipiqa.runtime.io import references
from ipiqa.runtime.io.references import resolve_references

pa = pytest.importorskip("pyarrow", reason="needs ipiqa[parquet]")
pq = pytest.importorskip("pyarrow.parquet", reason="needs ipiqa[parquet]")


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path, keys):
    with tarfile.open(path, "w") as tf:
        for k in keys:
            for ext, data in (("jpg", jpeg(k)), ("txt", f"own {k}".encode())):
                info = tarfile.TarInfo(f"{k:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    write_shard(tmp_path / "a.tar", range(0, 6))
    write_shard(tmp_path / "b.tar", range(6, 12))
    return tmp_path


def manifest(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "prompt"])
        w.writerows(rows)
    return path


@pytest.fixture
def opens(monkeypatch):
    """How many times each referenced file is opened for reading."""
    counts: dict[str, int] = {}
    real = references._Reader.__init__

    def spy(self, path, *args):
        counts[path.name] = counts.get(path.name, 0) + 1
        real(self, path, *args)

    monkeypatch.setattr(references._Reader, "__init__", spy)
    return counts


def test_shard_references_are_read_from_their_members_in_the_manifests_order(shards, tmp_path):
    wanted = [("a.tar", 4), ("b.tar", 7), ("a.tar", 1), ("b.tar", 11)]
    m = manifest(tmp_path / "m.csv", [(f"{name}::{k:04d}", f"p{k}") for name, k in wanted])
    rows = list(RowSource(m))
    assert [r.image for r in rows] == [f"{tmp_path}/{name}::{k:04d}" for name, k in wanted]
    assert [r.source for r in rows] == [jpeg(k) for _, k in wanted]
    assert [r.prompt for r in rows] == [f"p{k}" for _, k in wanted] and all(r.error is None for r in rows)


def test_an_empty_prompt_cell_takes_the_samples_own_then_the_default(shards, tmp_path):
    m = manifest(tmp_path / "m.csv", [("a.tar::0002", ""), ("a.tar::0003", "mine")])
    assert [r.prompt for r in RowSource(m, "fallback")] == ["own 2", "mine"]


def test_a_manifest_in_each_shards_order_reads_each_shard_once(shards, tmp_path, monkeypatch, opens):
    monkeypatch.setattr(references, "WINDOW", 2)  # many windows: the readers carry on between them
    keys = [0, 2, 3, 5, 6, 8, 9, 11]
    m = manifest(tmp_path / "m.csv", [(f"{'a' if k < 6 else 'b'}.tar::{k:04d}", "p") for k in keys])
    assert [r.source for r in RowSource(m)] == [jpeg(k) for k in keys]
    assert opens == {"a.tar": 1, "b.tar": 1}


def test_a_manifest_out_of_the_shards_order_is_still_read_right(shards, tmp_path, monkeypatch, opens):
    monkeypatch.setattr(references, "WINDOW", 2)
    keys = [5, 0, 4, 1, 3, 2]
    m = manifest(tmp_path / "m.csv", [(f"a.tar::{k:04d}", "p") for k in keys])
    assert [r.source for r in RowSource(m)] == [jpeg(k) for k in keys]
    assert opens["a.tar"] > 1  # a key behind the reader: the shard is read again, never held whole


def test_a_missing_key_file_or_non_tar_is_that_rows_error_only(shards, tmp_path):
    (tmp_path / "fake.tar").write_bytes(b"image,prompt\n" * 100)
    m = manifest(tmp_path / "m.csv", [("a.tar::0001", "p"), ("a.tar::9999", "p"), ("gone.tar::0001", "p"),
                                      ("fake.tar::0001", "p"), ("b.tar::0007", "p")])
    rows = list(RowSource(m))
    assert rows[0].error is None and rows[4].error is None and rows[4].source == jpeg(7)
    assert "no such sample" in rows[1].error and "9999" in rows[1].error
    assert "gone.tar: no such shard or Parquet file" in rows[2].error
    assert "not a tar shard" in rows[3].error


def test_jsonl_manifests_reference_the_same_way(shards, tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"image": f"b.tar::{k:04d}", "prompt": "p"}) + "\n" for k in (9, 6)))
    assert [r.source for r in RowSource(m)] == [jpeg(9), jpeg(6)]


def test_parquet_references_read_bytes_and_path_only_cells(tmp_path):
    (tmp_path / "loose.jpg").write_bytes(jpeg(42))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": jpeg(0), "path": None}, {"bytes": None, "path": "loose.jpg"}, {"bytes": jpeg(2), "path": None}]
    pq.write_table(pa.table({"image": pa.array(cells, struct), "prompt": ["a", "b", "c"]}), tmp_path / "d.parquet",
                   row_group_size=1)
    m = manifest(tmp_path / "m.csv", [("d.parquet::2", "x"), ("d.parquet::1", ""), ("d.parquet::7", "x"),
                                      ("d.parquet::one", "x")])
    rows = list(RowSource(m))
    assert rows[0].source == jpeg(2) and rows[0].prompt == "x"
    assert str(rows[1].source) == str(tmp_path / "loose.jpg") and rows[1].prompt == "b"
    assert "no such row" in rows[2].error and "not a row number" in rows[3].error


def test_rows_that_are_not_references_pass_unchanged():
    rows = [Row("a.jpg", "p"), Row("x.tar::1", "p", error="kept"), Row("b.png", None)]
    assert list(resolve_references(rows)) == rows


def test_a_manifests_column_options_read_the_parquet_files_it_names(tmp_path):
    pq.write_table(pa.table({"img": pa.array([jpeg(0), jpeg(1)], pa.binary())}), tmp_path / "d.parquet")
    m = manifest(tmp_path / "m.csv", [("d.parquet::1", "p")])
    assert "no image column 'image'" in next(iter(RowSource(m))).error
    assert next(iter(RowSource(m, image_column="img"))).source == jpeg(1)
