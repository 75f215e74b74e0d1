"""Preprocessing equals the authors' torchvision eval transform, bit for bit, for every image mode;
only regular files are opened; the uint8 stage, the lookup-table normalize and the opt-in fast path."""
from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from ipiqa.config import CLIP_MEAN, CLIP_STD
from ipiqa.errors import ImageError
from ipiqa.preprocess import load_image, load_resized, normalize, preprocess, preprocess_file, resized, to_rgb

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


# --- Only regular files are opened: a FIFO or a device must be an error row, never a hang ---

def _returns_promptly(fn, seconds=10.0):
    """Run ``fn`` in a thread; fail (rather than hang the suite) if it has not returned in ``seconds``."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return outcome.get("error")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
@pytest.mark.parametrize("loader", [load_image, lambda p: load_resized(p, 32), lambda p: preprocess_file(p, 32)])
def test_a_named_pipe_is_refused_without_blocking(tmp_path, loader):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    try:
        error = _returns_promptly(lambda: loader(fifo))
    finally:  # a regressed open() waits for a writer: give it one so the thread ends
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert isinstance(error, ImageError)
    assert str(error) == f"{fifo}: is a named pipe (FIFO), not a regular file"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero on this system")
def test_a_character_device_is_refused():
    error = _returns_promptly(lambda: load_image("/dev/zero"))
    assert isinstance(error, ImageError) and str(error) == "/dev/zero: is a character device, not a regular file"


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix domain sockets")
def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(ImageError, match="is a socket, not a regular file"):
            load_image(path)


def test_a_symlink_to_an_image_is_followed(tmp_path):
    _random((16, 16), "RGB").save(tmp_path / "real.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert np.array_equal(load_resized(tmp_path / "link.png", 8), load_resized(tmp_path / "real.png", 8))


# --- uint8 output: exactly Pillow's resize, before any float work ---

MODES = ["RGB", "RGBA", "L", "P", "CMYK", "LA", "1"]


def _pillow_reference(img, resolution):
    return np.asarray(to_rgb(img).resize((resolution, resolution), Image.BICUBIC))


@pytest.mark.parametrize("size", [(1, 1), (37, 91), (64, 64), (300, 200)])
@pytest.mark.parametrize("mode", MODES)
def test_resized_equals_pillow_resize_of_the_rgb_image(size, mode):
    img = _random(size, mode)
    out = resized(img, 64)
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3) and out.flags.c_contiguous
    assert np.array_equal(out, _pillow_reference(img, 64))


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("name,mode", [("a.jpg", "RGB"), ("b.jpg", "L"), ("c.png", "P"), ("d.png", "RGBA"),
                                       ("e.png", "LA"), ("f.tif", "CMYK"), ("g.png", "RGB")])
@pytest.mark.parametrize("resolution", [64, 100])
def test_load_resized_equals_pillow_resize_of_the_loaded_image(tmp_path, name, mode, resolution):
    _random((100, 80), mode, seed=4).save(tmp_path / name)
    out = load_resized(tmp_path / name, resolution)
    assert out.dtype == np.uint8 and out.shape == (resolution, resolution, 3) and out.flags.c_contiguous
    assert np.array_equal(out, np.asarray(load_image(tmp_path / name).resize((resolution, resolution), Image.BICUBIC)))


def test_sixteen_bit_grayscale_file_is_rescaled_in_load_resized(tmp_path):
    wide = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(wide).save(tmp_path / "w.png")
    eight = Image.fromarray(np.rint(wide / 257).astype(np.uint8), "L")
    assert np.array_equal(load_resized(tmp_path / "w.png", 16), _pillow_reference(eight, 16))


def test_load_resized_names_the_file_in_its_errors(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="x.jpg: empty file"):
        load_resized(tmp_path / "x.jpg", 32)


# --- normalize: a lookup table with the reference's own float32 arithmetic ---

def _broadcast_normalize(pixels):
    """The pre-LUT code: float32 /255, - mean, / std broadcast over the last axis, then CHW."""
    x = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.moveaxis(x, -1, -3)


def test_normalize_is_bit_identical_to_the_float32_formula_for_every_level():
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 1, 3)).reshape(16, 16, 3)
    out = normalize(np.ascontiguousarray(levels))
    assert out.dtype == np.float32 and out.shape == (3, 16, 16)
    assert np.array_equal(out.view(np.uint32), _broadcast_normalize(levels).view(np.uint32))  # bits, not values


def test_normalize_takes_a_batch_nhwc_and_returns_nchw():
    batch = np.random.default_rng(5).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    out = normalize(batch)
    assert out.shape == (4, 3, 24, 24) and out.flags.c_contiguous
    assert np.array_equal(out, _broadcast_normalize(batch))


def test_normalize_writes_into_a_given_batch_slot():
    pixels = np.random.default_rng(7).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    batch = np.zeros((2, 3, 24, 24), np.float32)
    slot = batch[1]
    assert normalize(pixels, out=slot) is slot
    assert np.array_equal(batch[1], normalize(pixels)) and not batch[0].any()


def test_normalize_refuses_float_input():
    with pytest.raises(ValueError, match="uint8"):
        normalize(np.zeros((8, 8, 3), np.float32))


@pytest.mark.parametrize("mode", MODES)
def test_preprocess_is_bit_identical_to_the_broadcast_formula(mode):
    img = _random((90, 70), mode, seed=6)
    assert np.array_equal(preprocess(img, 64), _broadcast_normalize(_pillow_reference(img, 64)))


# --- fast=True: opt-in, approximate ---

def _jpeg(path, side, seed=0):
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8))
    base.resize((side, side), Image.BICUBIC).save(path, quality=90)
    return path


def test_fast_is_off_by_default(tmp_path):
    p = _jpeg(tmp_path / "a.jpg", 256)
    assert np.array_equal(load_resized(p, 64), np.asarray(load_image(p).resize((64, 64), Image.BICUBIC)))


def test_fast_decodes_a_large_jpeg_at_reduced_scale_close_to_exact(tmp_path, monkeypatch):
    p = _jpeg(tmp_path / "a.jpg", 256)
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or original(self, mode, size))
    fast, exact = load_resized(p, 64, fast=True), load_resized(p, 64)
    assert drafts == [(64, 64)] and fast.shape == exact.shape == (64, 64, 3)
    diff = np.abs(fast.astype(int) - exact)
    assert diff.max() > 0  # a different computation ...
    assert diff.mean() < 4  # ... of nearly the same image (benchmarks.host reports the measured deviation)


def test_fast_equals_exact_below_twice_the_target_size(tmp_path):
    p = _jpeg(tmp_path / "a.jpg", 96)  # libjpeg scales by 1/2 at best: nothing to gain under 2x
    assert np.array_equal(load_resized(p, 64, fast=True), load_resized(p, 64))
