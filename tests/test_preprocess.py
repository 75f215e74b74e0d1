"""Preprocessing equals the authors' torchvision eval transform, bit for bit, for every image mode."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ipiqa.config import CLIP_MEAN, CLIP_STD
from ipiqa.errors import ImageError
from ipiqa.preprocess import load_image, preprocess

transforms = pytest.importorskip("torchvision.transforms")


def authors_transform(resolution):
    return transforms.Compose([
        transforms.Resize((resolution, resolution), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def _random(size, mode, seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return img.convert(mode) if mode != "RGBA" else img


@pytest.mark.parametrize("size", [(1, 1), (37, 91), (512, 512), (1024, 768)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "LA", "1"])
@pytest.mark.parametrize("resolution", [224, 512])
def test_preprocess_equals_torchvision_eval_transform(size, mode, resolution):
    img = _random(size, mode)
    ref = authors_transform(resolution)(img.convert("RGB")).numpy()
    ours = preprocess(img, resolution)
    assert ours.dtype == np.float32 and ours.shape == (3, resolution, resolution)
    assert np.abs(ours - ref).max() <= 1e-6


def test_alpha_is_dropped_not_composited():
    img = Image.new("RGBA", (8, 8), (200, 10, 10, 0))  # fully transparent red
    assert np.allclose(preprocess(img, 32), preprocess(Image.new("RGB", (8, 8), (200, 10, 10)), 32))


def test_sixteen_bit_grayscale_is_rescaled_not_clipped():
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    ours = preprocess(Image.fromarray(wide), 32)
    eight = Image.fromarray(np.rint(wide / 257).astype(np.uint8), "L")
    assert np.array_equal(ours, preprocess(eight, 32))
    assert ours.max() < preprocess(Image.new("L", (8, 8), 255), 32).max()  # not all white


def test_float_images_are_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="f.tif.*mode F"):
        load_image(tmp_path / "f.tif")


@pytest.mark.parametrize("content,message", [(b"", "empty file"), (b"not an image", "not a readable image")])
def test_unreadable_files_are_named(tmp_path, content, message):
    (tmp_path / "x.jpg").write_bytes(content)
    with pytest.raises(ImageError, match=f"x.jpg: {message}"):
        load_image(tmp_path / "x.jpg")


def test_truncated_jpeg_fails_at_load_time(tmp_path):
    buf = tmp_path / "t.jpg"
    _random((64, 64), "RGB").save(buf)
    buf.write_bytes(buf.read_bytes()[:300])
    with pytest.raises(ImageError, match="t.jpg: corrupt image"):
        load_image(buf)


def test_missing_file_and_directory_are_named(tmp_path):
    with pytest.raises(ImageError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
