"""How far a run is: RowSource.count() where the total is cheap, the CLI's bar over it (or over shards for
--output-dir), and a summary line in the words of the input's kind."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import tqdm as tqdm_module
from click.testing import CliRunner
from PIL import Image

from conftest import make_image
from ipiqa.cli import cli
from ipiqa.runtime.io import RowSource

pa = pytest.importorskip("pyarrow", reason="needs ipiqa[parquet]")
pq = pytest.importorskip("pyarrow.parquet", reason="needs ipiqa[parquet]")


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "folder").mkdir()
    for i in range(3):
        make_image(d / "folder" / f"{i}.png", seed=i)
    (d / "m.csv").write_text("image,prompt\n" + "".join(f"folder/{i}.png,p\n" for i in range(3)))
    (d / "m.jsonl").write_text('{"image": "folder/0.png", "prompt": "p"}\n{"image": "folder/1.png", "prompt": "p"}')
    (d / "pq").mkdir()
    for f, n in ((0, 3), (1, 2)):
        pq.write_table(pa.table({"image": pa.array([png(i) for i in range(n)], pa.binary()), "prompt": ["p"] * n}),
                       d / "pq" / f"part-{f}.parquet")
    (d / "shards").mkdir()
    for s in range(2):
        with tarfile.open(d / "shards" / f"{s:05d}.tar", "w") as tf:
            for ext, data in (("png", png(s)), ("txt", b"p")):
                info = tarfile.TarInfo(f"k{s}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return d


@pytest.mark.parametrize("name, count", [("folder", 3), ("folder/0.png", 1), ("m.csv", 3), ("m.jsonl", 2),
                                         ("pq", 5), ("shards", None)])
def test_the_row_count_is_known_where_it_is_cheap(inputs, name, count):
    source = RowSource(inputs / name, "p")
    assert source.count() == count
    if count is not None:
        assert count == sum(1 for _ in source)


class SpyBar:
    """tqdm's place: records the bar each run opens and how far it went."""

    bars: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.n, self.format_dict = kwargs, 0, {"elapsed": 1.0}
        SpyBar.bars.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, text):
        self.postfix = text

    def close(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    SpyBar.bars = []
    monkeypatch.setattr(tqdm_module, "tqdm", SpyBar)
    return SpyBar.bars


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_a_folder_run_shows_done_out_of_its_images(tiny_bundle, inputs, bars, tmp_path):
    run("score", tiny_bundle, "--images", inputs / "folder", "--prompt", "p", "-o", tmp_path / "o.csv")
    assert bars[0].kwargs["total"] == 3 and bars[0].kwargs["unit"] == "img" and bars[0].n == 3


def test_a_shard_run_without_a_cheap_total_shows_rows_and_rate(tiny_bundle, inputs, bars, tmp_path):
    run("score", tiny_bundle, "--images", inputs / "shards", "-o", tmp_path / "o.csv")
    assert bars[0].kwargs["total"] is None and bars[0].n == 2


def test_an_output_dir_run_counts_shards_done_out_of_its_shards(tiny_bundle, inputs, bars, tmp_path):
    out = run("score", tiny_bundle, "--images", inputs / "shards", "--output-dir", tmp_path / "out")
    bar = bars[0]
    assert bar.kwargs["total"] == 2 and bar.kwargs["unit"] == "shard" and bar.n == 2 and bar.postfix.startswith("2 img")
    assert "2 tar shards into" in out


def test_summary_lines_name_parquet_inputs_as_parquet_files(tiny_bundle, inputs, tmp_path):
    out = run("score", tiny_bundle, "--images", inputs / "pq", "--output-dir", tmp_path / "out", "-q")
    assert "2 Parquet files into" in out and "shards" not in out
    out = run("score", tiny_bundle, "--images", inputs / "pq", "-o", tmp_path / "o.csv", "-q")
    assert "5 rows of 2 Parquet files scored" in out
    out = run("score", tiny_bundle, "--images", inputs / "m.csv", "-o", tmp_path / "m.csv", "-q")
    assert f"3 rows of manifest {inputs / 'm.csv'} scored" in out
