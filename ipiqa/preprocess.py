"""Image preprocessing of the authors' eval path, in PIL + numpy so the torch-free runtime shares it.

``Image.open(p).convert("RGB")`` -> ``resize((R, R), BICUBIC)`` (aspect not kept) -> [0, 1] -> CLIP
mean/std, CHW float32. The arithmetic is the same float32 sequence as torchvision's ``ToTensor`` +
``Normalize``, so results are bit-identical to the reference transform.

Two stages, so that a host feeding a GPU does only the first:
- ``load_resized`` / ``resized``: file or PIL image -> uint8 (R, R, 3), exactly Pillow's bicubic resize.
  An image graph that takes uint8 does the cast, /255 and mean/std itself; 4x fewer bytes cross to it.
- ``normalize``: uint8 (..., R, R, 3) -> float32 (..., 3, R, R) through a per-channel 256-entry lookup
  table computed with the reference's own float32 operations, so it is bit-identical to the broadcast
  formula and about twice as fast. ``preprocess`` / ``preprocess_file`` are the two stages chained.

Encoded images above ``MAX_IMAGE_BYTES`` (64 MiB) are refused before a byte is decoded or, for a file, read
(``check_encoded_size``): one oversized file or request never holds a decoder or a server's memory.

Only regular files are opened: a named pipe, socket or device node is refused after a ``stat`` (opening
a FIFO for reading blocks until a writer appears, which would hang a whole batch job).

``fast=True`` (off by default) lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling, the
``Image.draft`` mechanism) when the source is at least twice the target, and resizes with
``reducing_gap=FAST_REDUCING_GAP``. It is several times faster on large JPEGs but no longer equals the
authors' transform; ``benchmarks.host`` measures its pixel deviation.

What happens to other image modes (``to_rgb``):
- RGBA / LA / palette with transparency: alpha is dropped, not composited (as the authors did);
  transparent pixels take whatever colour they store.
- L / 1 / P: replicated / expanded to RGB by PIL.
- CMYK: PIL's naive CMYK->RGB conversion (no ICC profile), as ``convert("RGB")`` does.
- 16-bit grayscale (I;16*, I): rescaled to 8 bit (x / 257, rounded). PIL's own ``convert`` would clip
  everything above 255 to white, a silently wrong image; this is the one deviation from the authors.
  16-bit RGB PNGs are already reduced to 8 bit by PIL when opened.
- 32-bit float (F): refused, since its value range is undefined.
- Animated images: the first frame. EXIF orientation is ignored, as in the authors' code.
- Images above PIL's decompression-bomb limit are refused.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import CLIP_MEAN, CLIP_STD
from .errors import ImageError

__all__ = ["load_image", "to_rgb", "preprocess", "preprocess_file", "load_resized", "resized", "normalize",
           "read_regular_file", "FAST_REDUCING_GAP", "decode_bytes", "MAX_IMAGE_BYTES", "check_encoded_size"]

MAX_IMAGE_BYTES = 64 * 2**20  # an encoded image file (JPEG, PNG, WebP, ...) above this is an error row

FAST_REDUCING_GAP = 2.0  # fast path only: Pillow's reduce() by integer factors until within 2x of R
_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)
_STD = np.asarray(CLIP_STD, dtype=np.float32)
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# Per channel, the normalized float32 value of each uint8 level, by the reference's own float32 steps:
# v / 255 -> - mean -> / std. Each step is one correctly rounded IEEE operation, so a table lookup gives
# exactly what the broadcast formula gives pixel by pixel.
_LUT = ((np.arange(256, dtype=np.float32) / np.float32(255.0))[None, :] - _MEAN[:, None]) / _STD[:, None]
_LUT.setflags(write=False)

PathLike = Union[str, "os.PathLike[str]"]


def _not_regular(mode: int) -> Optional[str]:
    """What a non-regular file is, in words, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not an image"
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return f"is {what}, not a regular file"
    return "is not a regular file"


def check_encoded_size(size: int, name: object) -> None:
    """Refuse an encoded image above ``MAX_IMAGE_BYTES`` (checked before reading or decoding it)."""
    if size > MAX_IMAGE_BYTES:
        raise ImageError(f"{name}: {size / 2**20:.1f} MiB image file is above the {MAX_IMAGE_BYTES / 2**20:g} MiB "
                         "limit (ipiqa.preprocess.MAX_IMAGE_BYTES); re-encode it smaller")


def _open_regular(p: Path) -> BinaryIO:
    """Open ``p`` for reading only if it is a regular file of at most ``MAX_IMAGE_BYTES``; never blocks on a FIFO.

    ``stat`` first so that no device node is ever opened (opening one can have side effects), then open
    with O_NONBLOCK and ``fstat`` the descriptor, so a file swapped for a FIFO in between is caught too.
    """
    try:
        why = _not_regular(os.stat(p).st_mode)
        if why is None:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                st = os.fstat(fd)
                why = _not_regular(st.st_mode)
                if why is None:
                    check_encoded_size(st.st_size, p)
                    return os.fdopen(fd, "rb")
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
    except FileNotFoundError:
        raise ImageError(f"{p}: file not found") from None
    except NotADirectoryError:
        raise ImageError(f"{p}: file not found (a parent is not a directory)") from None
    except PermissionError:
        raise ImageError(f"{p}: permission denied") from None
    except OSError as exc:
        raise ImageError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    raise ImageError(f"{p}: {why}")


def read_regular_file(path: PathLike) -> bytes:
    """The bytes of ``path``, refusing anything that is not a regular file (for GPU decoders)."""
    p = Path(path)
    with _open_regular(p) as f:
        try:
            return f.read()
        except OSError as exc:
            raise ImageError(f"{p}: cannot be read ({exc.strerror or exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB as documented in the module docstring."""
    if img.mode == "RGB":
        return img
    img = _eight_bit(img)
    return img.convert("RGB")


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale -> L by x / 257 (not PIL's clipping); F refused; other modes unchanged."""
    if img.mode in _SIXTEEN_BIT:
        wide = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        raise ImageError("32-bit float image (mode F) has no defined value range; save it as 8-bit")
    return img


def _decode(fp: BinaryIO, name: object, draft: Optional[int] = None) -> tuple[Image.Image, Optional[tuple]]:
    """Fully decode ``fp`` (not yet converted to RGB), with every failure an ImageError naming ``name``.

    ``draft``: the fast path's target side; a JPEG is then decoded at the smallest DCT scale that keeps
    both sides >= it. Returns the image and, when drafted, the source box for ``resize``.
    """
    try:
        with Image.open(fp) as img:
            box = None
            if draft is not None and min(img.size) >= 2 * draft:  # below 2x libjpeg cannot scale anyway
                drafted = img.draft("RGB", (draft, draft))
                if drafted and drafted[1] != (0, 0, *img.size):  # a scaled decode: keep its exact geometry
                    box = drafted[1]
            img.load()  # decode now: truncated files must fail here, not later in a worker
            return _eight_bit(img), box
    except ImageError as exc:
        raise ImageError(f"{name}: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        fp.seek(0, io.SEEK_END)
        what = "empty file" if fp.tell() == 0 else "not a readable image"
        raise ImageError(f"{name}: {what}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated/corrupt data surfaces as these
        raise ImageError(f"{name}: corrupt image ({exc})") from None


def decode_bytes(data: bytes, name: object, draft: Optional[int] = None) -> Image.Image:
    """Encoded image bytes (a request body, a file read elsewhere) -> the decoded image, not yet RGB, with the
    file path's mode rules, size limit and errors; ``name`` is what an error calls it. ``draft``: a JPEG may be
    decoded at a reduced DCT scale keeping both sides >= it (thumbnails; never for scoring, which is exact)."""
    check_encoded_size(len(data), name)
    return _decode(io.BytesIO(data), name, draft)[0]


def _load(path: PathLike, draft: Optional[int] = None) -> tuple[Image.Image, Optional[tuple]]:
    p = Path(path)
    with _open_regular(p) as f:
        return _decode(f, p, draft)


def load_image(path: PathLike) -> Image.Image:
    """Open and fully decode ``path`` as RGB, turning every failure into an ImageError naming it."""
    return to_rgb(_load(path)[0])


def _resized(img: Image.Image, resolution: int, box: Optional[tuple] = None, fast: bool = False) -> np.ndarray:
    size = (resolution, resolution)
    gap = FAST_REDUCING_GAP if fast else None
    if img.mode == "L":
        # Channels resample independently and L -> RGB replicates, so resizing first is the same
        # result with a third of the work.
        img = img.resize(size, Image.BICUBIC, box, gap) if img.size != size or box else img
        return np.asarray(img.convert("RGB"))
    img = to_rgb(img)
    if img.size != size or box:  # Pillow's resize to the same size is only a copy: skip it
        img = img.resize(size, Image.BICUBIC, box, gap)
    # One copy, Pillow's packed RGB bytes; numpy wraps them without another (read-only array).
    return np.asarray(img)


def resized(img: Image.Image, resolution: int, fast: bool = False) -> np.ndarray:
    """PIL image (any mode) -> uint8 (R, R, 3) HWC, read-only: ``to_rgb`` + bicubic resize.

    Exactly ``np.asarray(to_rgb(img).resize((R, R), BICUBIC))``; ``fast`` adds ``reducing_gap``.
    """
    return _resized(_eight_bit(img), resolution, fast=fast)


def load_resized(path: PathLike, resolution: int, fast: bool = False) -> np.ndarray:
    """Image file -> uint8 (R, R, 3) HWC, read-only; what a uint8 image graph takes (stack to NHWC).

    Exact (the default): ``np.asarray(load_image(path).resize((R, R), BICUBIC))`` bit for bit, with the
    same mode handling and errors as ``preprocess_file``. ``fast``: JPEG DCT-scaled decoding and
    ``reducing_gap`` (see the module docstring); not equal to the authors' transform.
    """
    img, box = _load(path, draft=resolution if fast else None)
    return _resized(img, resolution, box, fast)


def normalize(pixels: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 (..., R, R, 3) HWC -> float32 (..., 3, R, R): /255, CLIP mean/std, channels first.

    A per-channel table lookup, bit-identical to ``(x / 255 - mean) / std`` in float32. ``out``: write
    into this float32 array (e.g. one slot of a reused batch buffer) instead of a new one; a new 3 MB
    array per 512 px image costs more in page faults than the lookup itself (measured 2.2 vs 0.9 ms).
    """
    if pixels.dtype != np.uint8 or pixels.ndim < 3 or pixels.shape[-1] != 3:
        raise ValueError(f"normalize takes uint8 (..., H, W, 3) pixels, got {pixels.dtype} {pixels.shape}")
    shape = pixels.shape[:-3] + (3,) + pixels.shape[-3:-1]
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != shape:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
    for c in range(3):
        out[..., c, :, :] = _LUT[c][pixels[..., c]]  # fancy indexing beat np.take(out=) 4x here
    return out


def preprocess(img: Image.Image, resolution: int) -> np.ndarray:
    """RGB PIL image -> normalized (3, R, R) float32, exactly the authors' eval transform."""
    return normalize(resized(img, resolution))


def preprocess_file(path: PathLike, resolution: int) -> np.ndarray:
    """Image file -> normalized (3, R, R) float32, exactly the authors' eval transform."""
    return normalize(load_resized(path, resolution))
