"""--calibration takes what --images takes (shards, Parquet, patterns, manifests naming SHARD::KEY): the split names
each image, and the picked ones decode exactly as the same images as loose files."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from ipiqa.export.calibration import (calibration_batches, calibration_fingerprint, held_out_images, image_input,
                                      split_calibration)

R = 32


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    """Two shards of 6 samples each, and the same images as loose files."""
    (tmp_path / "loose").mkdir()
    for s in range(2):
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as tf:
            for i in range(6 * s, 6 * s + 6):
                for name, data in ((f"{i:04d}.png", png(i)), (f"{i:04d}.txt", f"prompt {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                (tmp_path / "loose" / f"{i:04d}.png").write_bytes(png(i))
    return tmp_path


def test_a_shard_pattern_splits_into_labels_with_the_samples_prompts(shards):
    split = split_calibration(f"{shards}/{{00000..00001}}.tar", held_out=3)
    assert len(split.calibration) == 9 and len(split.held_out) == 3
    assert all("::" in str(p) for p in split.held_out) and not set(split.held_out) & set(split.calibration)
    assert split.prompts[0] == "prompt 0"


def test_calibration_images_from_shards_equal_the_same_images_as_files(shards):
    split = split_calibration(f"{shards}/*.tar", held_out=2)
    batches = np.concatenate(list(calibration_batches(list(split.calibration), R, size=10, batch=4)))
    names = [str(p).rsplit("::", 1)[1] for p in split.calibration]
    want = np.stack([image_input(shards / "loose" / f"{n}.png", R) for n in names])
    np.testing.assert_array_equal(batches, want)
    held, prompts = held_out_images(split, R)
    assert held.shape == (2, R, R, 3) and prompts == [f"prompt {int(str(p)[-4:])}" for p in split.held_out]


def test_a_manifest_naming_shard_samples_calibrates_on_them(shards, tmp_path):
    sheet = tmp_path / "sel.csv"
    sheet.write_text("image,prompt\n" + "".join(f"00001.tar::{i:04d},p{i}\n" for i in range(6, 12)))
    split = split_calibration(sheet, held_out=2)
    got = np.concatenate(list(calibration_batches(list(split.calibration), R, size=4)))
    assert got.shape == (4, R, R, 3) and split.prompts == ("p6", "p11")


def test_parquet_files_calibrate_from_their_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="needs ipiqa[parquet]")
    pq = pytest.importorskip("pyarrow.parquet", reason="needs ipiqa[parquet]")
    pq.write_table(pa.table({"image": pa.array([png(i) for i in range(6)], pa.binary())}), tmp_path / "d.parquet")
    split = split_calibration(tmp_path / "d.parquet", held_out=1)
    got = np.concatenate(list(calibration_batches(list(split.calibration), R, size=5)))
    assert got.shape == (5, R, R, 3) and split.prompts is None


def test_the_fingerprint_hashes_each_shard_once_not_each_label(shards):
    split = split_calibration(f"{shards}/*.tar", held_out=2)
    assert [name for name, _ in calibration_fingerprint(split)] == [f"{shards}/00000.tar", f"{shards}/00001.tar"]
