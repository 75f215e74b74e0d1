"""Image preprocessing of the authors' eval path, in PIL + numpy so the torch-free runtime shares it.

``Image.open(p).convert("RGB")`` -> ``resize((R, R), BICUBIC)`` (aspect not kept) -> [0, 1] -> CLIP
mean/std, CHW float32. The arithmetic is the same float32 sequence as torchvision's ``ToTensor`` +
``Normalize``, so results are bit-identical to the reference transform.

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

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import CLIP_MEAN, CLIP_STD
from .errors import ImageError

__all__ = ["load_image", "to_rgb", "preprocess", "preprocess_file", "RESIZE_FILTER"]

RESIZE_FILTER = "bicubic"
_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)
_STD = np.asarray(CLIP_STD, dtype=np.float32)
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}

PathLike = Union[str, "os.PathLike[str]"]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB as documented in the module docstring."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ImageError("32-bit float image (mode F) has no defined value range; save it as 8-bit")
    return img.convert("RGB")


def load_image(path: PathLike) -> Image.Image:
    """Open and fully decode ``path`` as RGB, turning every failure into an ImageError naming it."""
    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()  # decode now: truncated files must fail here, not later in a worker
            return to_rgb(img)
    except ImageError as exc:
        raise ImageError(f"{p}: {exc}") from None
    except FileNotFoundError:
        raise ImageError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{p}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{p}: permission denied") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{p}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        size = p.stat().st_size if p.exists() else 0
        what = "empty file" if size == 0 else "not a readable image"
        raise ImageError(f"{p}: {what}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated/corrupt data surfaces as these
        raise ImageError(f"{p}: corrupt image ({exc})") from None


def preprocess(img: Image.Image, resolution: int) -> np.ndarray:
    """RGB PIL image -> normalized (3, R, R) float32, exactly the authors' eval transform."""
    img = to_rgb(img).resize((resolution, resolution), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - _MEAN) / _STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_file(path: PathLike, resolution: int) -> np.ndarray:
    return preprocess(load_image(path), resolution)
