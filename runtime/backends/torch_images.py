"""Decode and resize images with torch, on the GPU when there is one, equal to the Pillow path.

For a GPU engine at thousands of images per second the host cannot keep up with Pillow's resize (~13 ms per
1024 px image per core). Here JPEGs are decoded on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``,
batched) and resized with ``resize_exact``: Pillow's own 8-bit bicubic arithmetic as two float64 matmuls
(``ipiqa.resample``), bit-identical to ``Image.resize((R, R), BICUBIC)`` for the same decoded pixels.

Decoding is where the GPU path may differ from the CPU path: nvJPEG's IDCT and chroma upsampling are not
libjpeg-turbo's, so pixels can differ by a few levels; the benchmark measures it. JPEGs the GPU path does
not take (CMYK, 12-bit, no end-of-image marker — possibly truncated) and every other format go through
Pillow with the CPU path's mode rules and errors. torch and torchvision are imported lazily.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Optional, Sequence, Union

import numpy as np

from ipiqa._optional import require
from ipiqa.device import parse_device
from ipiqa.errors import ImageError, IPIQAError
from ipiqa.preprocess import decode_bytes, read_regular_file, resized, to_rgb
from ipiqa.resample import PRECISION_BITS, pass_matrix, vertical_first

__all__ = ["resize_exact", "decode_jpegs", "decode_resize", "resize_decoded", "FLOAT64_BUDGET_BYTES"]

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]
FLOAT64_BUDGET_BYTES = 256 * 2**20  # float64 working set per resize chunk: a 2048 px batch of 64 would need 6 GB
_HALF = float(1 << (PRECISION_BITS - 1))
_INV_SCALE = 1.0 / float(1 << PRECISION_BITS)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _torch() -> Any:
    return require("torch", extra="torch")


@lru_cache(maxsize=32)
def _matrix(in_size: int, out_size: int, device: str) -> Any:
    """``ipiqa.resample.pass_matrix`` as a float64 tensor on ``device`` (cached per size pair and device)."""
    return _torch().tensor(pass_matrix(in_size, out_size), dtype=_torch().float64, device=device)


def _round(sums: Any) -> Any:
    """Pillow's clip8: + 2**21, floor-divide by 2**22 (exact: a power of two), clip to 0..255."""
    return sums.add_(_HALF).mul_(_INV_SCALE).floor_().clamp_(0.0, 255.0)


def resize_exact(images: Any, resolution: int) -> Any:
    """uint8 (B, C, H, W) or (C, H, W) tensor -> uint8 (B, C, R, R) or (C, R, R), on the input's device.

    Bit-identical to Pillow's ``Image.resize((R, R), BICUBIC)`` of the same pixels: the same fixed-point
    weights, each pass's integer sums exact in float64, the intermediate rounded to uint8, and the pass
    order Pillow picks. An input already R x R is returned as is (Pillow would copy it).
    """
    torch = _torch()
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(f"resize_exact takes uint8 (B, C, H, W) or (C, H, W), got {images.dtype} {tuple(images.shape)}")
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    h, w = images.shape[-2:]
    if (h, w) == (resolution, resolution):
        return images
    device = str(images.device)
    planes = images.reshape(-1, h, w)
    out = torch.empty((planes.shape[0], resolution, resolution), dtype=torch.uint8, device=images.device)
    cols = _matrix(w, resolution, device).T if w != resolution else None
    rows = _matrix(h, resolution, device) if h != resolution else None
    rows_first = vertical_first((w, h), (resolution, resolution))
    per_plane = 8 * (h * w + max(h, resolution) * max(w, resolution))
    step = max(1, FLOAT64_BUDGET_BYTES // per_plane)
    for start in range(0, planes.shape[0], step):
        x = planes[start:start + step].to(torch.float64)
        for which in (("rows", "cols") if rows_first else ("cols", "rows")):
            if which == "cols" and cols is not None:
                x = _round(x @ cols)
            elif which == "rows" and rows is not None:
                x = _round(rows @ x)
        out[start:start + step] = x.to(torch.uint8)
    return out.reshape(*images.shape[:-2], resolution, resolution)


def _jpeg_for_gpu(data: bytes) -> bool:
    """A complete 8-bit JPEG with 1 or 3 components (what nvJPEG decodes as Pillow would interpret it)."""
    if data[:3] != b"\xff\xd8\xff" or not data.rstrip(b"\x00\r\n").endswith(b"\xff\xd9"):
        return False  # not a JPEG, or no end-of-image marker (truncated?): Pillow decides
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            return i + 10 <= len(data) and data[i + 4] == 8 and data[i + 9] in (1, 3)
        i += 2 + length
    return False


def _read(source: Source) -> bytes:
    """Encoded bytes as given, or a regular file's contents (FIFOs and devices refused, see preprocess)."""
    return bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else read_regular_file(source)


def _name(source: Source, index: int) -> str:
    return f"<image bytes #{index}>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def _pillow(data: bytes, name: str, resolution: Optional[int] = None) -> Any:
    """CPU decode (and, given ``resolution``, Pillow's resize) with the CPU path's mode rules and errors
    -> uint8 (3, H, W) tensor."""
    img = decode_bytes(data, name)
    arr = np.array(to_rgb(img) if resolution is None else resized(img, resolution))  # writable for torch
    return _torch().from_numpy(arr).permute(2, 0, 1).contiguous()


def _device(device: Any) -> Any:
    """``ipiqa.device``'s rule (None: auto, CUDA when torch sees a GPU, else CPU; a torch.device as its text);
    asking for CUDA without one is an error, not a fallback."""
    return _torch().device(parse_device("auto" if device is None else str(device)).resolve_torch())


def decode_jpegs(sources: Sequence[Source], device: Any = None) -> list:
    """Files or encoded bytes -> one uint8 (3, H, W) tensor on ``device`` per source, or its ImageError.

    ``device`` None: CUDA when available, else CPU.
    On CUDA, JPEGs are decoded in one batched nvJPEG call; if that call fails, each is tried alone, and
    one the GPU refuses is decoded by Pillow. Other formats, and every image on a CPU device, go through
    Pillow exactly as the CPU path does. Errors are returned in place, not raised, so that one bad file
    never loses the batch.
    """
    torch = _torch()
    device = _device(device)
    results: list = [None] * len(sources)
    blobs: dict[int, bytes] = {}
    for i, src in enumerate(sources):
        try:
            blobs[i] = _read(src)
        except ImageError as exc:
            results[i] = exc
        except (OSError, ValueError) as exc:  # e.g. a NUL byte in the path: this row's error, not the batch's
            results[i] = ImageError(f"{_name(src, i)}: {type(exc).__name__}: {exc}")
    gpu = [i for i, data in blobs.items() if device.type == "cuda" and _jpeg_for_gpu(data)]
    if gpu:
        tvio = require("torchvision.io", extra="torch")
        encoded = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in gpu]
        try:
            decoded = tvio.decode_jpeg(encoded, mode=tvio.ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = []
            for data in encoded:
                try:
                    decoded.append(tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, tensor in zip(gpu, decoded):
            results[i] = tensor
    for i, data in blobs.items():
        if results[i] is None:
            try:
                results[i] = _pillow(data, _name(sources[i], i)).to(device)
            except ImageError as exc:
                results[i] = exc
    return results


def decode_resize(sources: Sequence[Source], resolution: int,
                  device: Any = None) -> tuple[Any, list[Optional[ImageError]]]:
    """Files or bytes -> (uint8 (N, 3, R, R) tensor on ``device``, per-source error or None).

    What a uint8 image graph takes. On CUDA, images of one size are resized together on the GPU; on a
    CPU device Pillow resizes each (the same pixels, and far faster than dense float64 matmuls on a CPU).
    A failed source leaves a zero image in its slot and its ImageError in the list.
    """
    device = _device(device)
    if device.type != "cuda":
        return _decode_resize_cpu(sources, resolution, device)
    return resize_decoded(decode_jpegs(sources, device), resolution, device)


def resize_decoded(decoded: Sequence[Any], resolution: int, device: Any) -> tuple[Any, list[Optional[ImageError]]]:
    """``decode_jpegs`` output -> (uint8 (N, 3, R, R), errors): ``resize_exact`` once per distinct size."""
    torch = _torch()
    out = torch.zeros((len(decoded), 3, resolution, resolution), dtype=torch.uint8, device=device)
    errors: list[Optional[ImageError]] = [d if isinstance(d, ImageError) else None for d in decoded]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, d in enumerate(decoded):
        if errors[i] is None:
            by_size.setdefault(tuple(d.shape[-2:]), []).append(i)
    for index in by_size.values():
        out[index] = resize_exact(torch.stack([decoded[i] for i in index]), resolution)
    return out, errors


def _decode_resize_cpu(sources: Sequence[Source], resolution: int, device: Any) -> tuple[Any, list[Optional[ImageError]]]:
    torch = _torch()
    out = torch.zeros((len(sources), 3, resolution, resolution), dtype=torch.uint8)
    errors: list[Optional[ImageError]] = [None] * len(sources)
    for i, src in enumerate(sources):
        try:
            out[i] = _pillow(_read(src), _name(src, i), resolution)
        except ImageError as exc:
            errors[i] = exc
        except (OSError, ValueError) as exc:  # e.g. a NUL byte in the path: this row's error, not the batch's
            errors[i] = ImageError(f"{_name(src, i)}: {type(exc).__name__}: {exc}")
    return out.to(device), errors
