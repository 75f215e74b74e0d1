"""The matmul form of Pillow's bicubic resize equals Pillow bit for bit (numpy and torch, CPU and GPU)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ipiqa import resample
from ipiqa.errors import ImageError
from ipiqa.preprocess import load_resized
from ipiqa.runtime.backends.torch_images import decode_jpegs, decode_resize, resize_decoded, resize_exact

# (width, height): 1 px, odd and non-square, one px either side of square, wide, tall (Pillow 13 runs
# the vertical pass first for those), 4:3, and a 4x downscale.
SIZES = [(1, 1), (3, 7), (63, 64), (64, 63), (100, 37), (37, 100), (511, 513), (1024, 768), (2048, 2048)]
RESOLUTIONS = [512, 224, 64]


def _random(size, seed=0):
    w, h = size
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pillow(pixels, resolution):
    return np.asarray(Image.fromarray(pixels).resize((resolution, resolution), Image.BICUBIC))


def _torch_resize(pixels, resolution, device="cpu"):
    chw = torch.from_numpy(pixels).permute(2, 0, 1).to(device)
    return resize_exact(chw, resolution).permute(1, 2, 0).cpu().numpy()


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("size", SIZES)
def test_torch_resize_equals_pillow_bit_for_bit(size, resolution):
    pixels = _random(size)
    assert np.array_equal(_torch_resize(pixels, resolution), _pillow(pixels, resolution))


@pytest.mark.parametrize("size", [(3, 7), (100, 37), (37, 100), (300, 200)])
def test_numpy_resize_equals_pillow_bit_for_bit(size):
    pixels = _random(size, seed=1)
    assert np.array_equal(resample.resize(pixels, (64, 48)), np.asarray(Image.fromarray(pixels).resize((64, 48), Image.BICUBIC)))


def test_every_fixed_point_sum_is_exact_in_float64():
    matrix = resample.pass_matrix(4096, 7)  # the widest kernels: a 585x downscale
    assert np.array_equal(matrix, np.round(matrix))
    assert 255 * np.abs(matrix).sum(axis=1).max() < 2**53


def test_a_batch_is_resized_image_by_image():
    batch = np.stack([_random((70, 50), seed=s) for s in range(3)])
    out = resize_exact(torch.from_numpy(batch).permute(0, 3, 1, 2), 32)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    for i in range(3):
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), _pillow(batch[i], 32))


def test_an_image_already_at_the_resolution_is_returned_unchanged():
    chw = torch.from_numpy(_random((16, 16))).permute(2, 0, 1)
    assert resize_exact(chw, 16) is chw


def test_non_uint8_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        resize_exact(torch.zeros(3, 8, 8), 4)


def test_cpu_decode_resize_equals_the_cpu_preprocessing_path(tmp_path):
    paths = []
    for i, (name, mode) in enumerate([("a.jpg", "RGB"), ("b.png", "P"), ("c.png", "L"), ("d.jpg", "L")]):
        img = Image.fromarray(_random((90 + i, 70), seed=i)).convert(mode)
        img.save(tmp_path / name)
        paths.append(tmp_path / name)
    out, errors = decode_resize(paths, 64, device="cpu")
    assert errors == [None] * len(paths)
    for i, p in enumerate(paths):
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), load_resized(p, 64))


def test_decoded_images_of_mixed_sizes_are_resized_in_place_as_the_cpu_path_does(tmp_path):
    """The GPU path's grouping by size (run here on CPU tensors)."""
    sizes = [(90, 70), (40, 30), (90, 70)]
    for i, size in enumerate(sizes):
        Image.fromarray(_random(size, seed=i)).save(tmp_path / f"{i}.png")
    sources = [tmp_path / "0.png", tmp_path / "missing.png", tmp_path / "1.png", tmp_path / "2.png"]
    out, errors = resize_decoded(decode_jpegs(sources, device="cpu"), 64, "cpu")
    assert [e is None for e in errors] == [True, False, True, True] and not out[1].any()
    for i in (0, 2, 3):
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), load_resized(sources[i], 64))


def test_bad_sources_become_errors_in_place_and_the_rest_decode(tmp_path):
    Image.fromarray(_random((20, 20))).save(tmp_path / "ok.jpg")
    sources = [tmp_path / "missing.jpg", b"not an image", tmp_path / "ok.jpg", tmp_path]
    out = decode_jpegs(sources, device="cpu")
    assert [type(o) for o in out] == [ImageError, ImageError, torch.Tensor, ImageError]
    assert "file not found" in str(out[0]) and "not a readable image" in str(out[1])
    assert "is a directory" in str(out[3]) and out[2].shape == (3, 20, 20)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("size", [(511, 513), (1024, 768), (37, 100), (2048, 2048)])
def test_gpu_resize_equals_pillow_bit_for_bit(size):
    pixels = _random(size, seed=2)
    assert np.array_equal(_torch_resize(pixels, 512, device="cuda"), _pillow(pixels, 512))


@pytest.mark.gpu
@cuda
def test_gpu_decode_gives_rgb_images_on_the_gpu_and_pngs_exactly(tmp_path):
    """nvJPEG's IDCT may differ from libjpeg's by a few levels (measured by benchmarks.host); PNGs may not."""
    Image.fromarray(_random((64, 48))).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(_random((64, 48), seed=3)).save(tmp_path / "b.png")
    jpeg, png = decode_jpegs([tmp_path / "a.jpg", tmp_path / "b.png"], device="cuda")
    assert jpeg.is_cuda and jpeg.dtype == torch.uint8 and jpeg.shape == (3, 48, 64)
    assert np.array_equal(png.permute(1, 2, 0).cpu().numpy(), _random((64, 48), seed=3))


def test_importing_the_resize_modules_does_not_import_torch():
    code = ("import sys, ipiqa.resample, ipiqa.preprocess, ipiqa.runtime.backends.torch_images; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
