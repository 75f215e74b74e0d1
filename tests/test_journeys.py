"""What one command writes, the next one takes: the chains of issue 27 run as a user types them (click's runner,
in the user's folder, relative paths as written)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import read_csv
from ipiqa.cli import cli

pa = pytest.importorskip("pyarrow", reason="needs ipiqa[parquet]")
pq = pytest.importorskip("pyarrow.parquet", reason="needs ipiqa[parquet]")


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def ipiqa(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def write_shard(path, samples) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The user's folder, the current one, as in the README's commands."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def scores_by_image(path) -> dict[str, float]:
    return {r["image"]: float(r["quality"]) for r in read_csv(path) if not r["error"]}


def rescored_equal_first_run(first, selected, again) -> None:
    kept, want, got = read_csv(selected), scores_by_image(first), scores_by_image(again)
    assert kept and [r["image"] for r in read_csv(again)] == [r["image"] for r in kept]  # the selection's order
    assert all(not r["error"] for r in read_csv(again))
    for image, score in got.items():
        assert score == pytest.approx(want[image], abs=1e-6), image


def test_shards_scored_then_selected_then_rescored_give_the_first_scores(tiny_bundle, user):
    (user / "shards").mkdir()
    for s in range(2):  # 2 shards x 6 samples, 3 prompts: select keeps one per prompt, from either shard
        write_shard(user / "shards" / f"{s:05d}.tar",
                    [(f"{6 * s + i:06d}", {"jpg": image_bytes(6 * s + i), "txt": f"prompt {i % 3}".encode()})
                     for i in range(6)])
    ipiqa("score", tiny_bundle, "--images", "shards/*.tar", "-o", "s.csv", "--batch", "1", "-q")
    ipiqa("select", "s.csv", "--top-k", "1", "--per", "prompt", "-o", "sel.csv")
    assert len(read_csv("sel.csv")) == 3 and all("::" in r["image"] for r in read_csv("sel.csv"))
    ipiqa("score", tiny_bundle, "--images", "sel.csv", "-o", "again.csv", "--batch", "1", "-q")
    rescored_equal_first_run("s.csv", "sel.csv", "again.csv")


@pytest.mark.parametrize("layout", ["bytes", "huggingface bytes", "huggingface path only"])
def test_parquet_scored_then_selected_then_rescored_give_the_first_scores(tiny_bundle, user, layout):
    (user / "data").mkdir()
    for f in range(2):
        seeds = [10 * f + i for i in range(4)]
        if layout == "bytes":
            column = pa.array([image_bytes(s) for s in seeds], pa.binary())
        else:
            struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            for s in seeds:
                (user / "data" / f"{s}.png").write_bytes(image_bytes(s, "PNG"))
            cells = [{"bytes": None if "path only" in layout else image_bytes(s, "PNG"), "path": f"{s}.png"}
                     for s in seeds]
            column = pa.array(cells, struct)
        prompts = [f"prompt {i % 2}" for i in range(4)]
        pq.write_table(pa.table({"image": column, "prompt": prompts}), user / "data" / f"part-{f}.parquet")
    ipiqa("score", tiny_bundle, "--images", "data/*.parquet", "-o", "s.csv", "--batch", "1", "-q")
    ipiqa("select", "s.csv", "--top-k", "1", "--per", "prompt", "-o", "sel.csv")
    assert len(read_csv("sel.csv")) == 2 and all(".parquet::" in r["image"] for r in read_csv("sel.csv"))
    ipiqa("score", tiny_bundle, "--images", "sel.csv", "-o", "again.csv", "--batch", "1", "-q")
    rescored_equal_first_run("s.csv", "sel.csv", "again.csv")


def test_a_selection_is_rescored_into_an_output_folder_as_one_file_named_after_it(tiny_bundle, user):
    (user / "shards").mkdir()
    write_shard(user / "shards" / "00000.tar", [(f"{i:06d}", {"jpg": image_bytes(i), "txt": b"p"}) for i in range(4)])
    ipiqa("score", tiny_bundle, "--images", "shards/", "-o", "s.csv", "--batch", "1", "-q")
    ipiqa("select", "s.csv", "--top-k", "2", "-o", "sel.csv")
    out = ipiqa("score", tiny_bundle, "--images", "sel.csv", "--output-dir", "again", "--batch", "1", "-q")
    assert "1 manifest into again" in out
    rescored_equal_first_run("s.csv", "sel.csv", "again/sel.csv")


def _calibration_shards(user) -> None:
    (user / "shards").mkdir()
    for s in range(2):
        write_shard(user / "shards" / f"{s:05d}.tar",
                    [(f"{8 * s + i:06d}", {"png": image_bytes(8 * s + i, "PNG"), "txt": f"a photo {i}".encode()})
                     for i in range(8)])


@pytest.mark.parametrize("calibration", ["shards", "shards/*.tar", "shards/{00000..00001}.tar"],
                         ids=["folder", "glob", "braces"])
def test_export_int8_calibrates_on_shards_named_as_images_names_them(tiny_model_file, user, calibration):
    from ipiqa.bundle import read_bundle
    from ipiqa.export.cli import main as export_cli

    _calibration_shards(user)
    res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", "bundle", "--onnx-only", "--int8",
                                          "--calibration", calibration, "--calibration-size", "8"])
    assert res.exit_code == 0, res.output
    assert read_bundle(user / "bundle").onnx.int8["cpu"].calibration.held_out == 4
