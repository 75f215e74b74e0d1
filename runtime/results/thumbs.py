"""Thumbnails as small JPEG data URIs, so the page carries its images and opens offline, anywhere.

Images are read and decoded by the scorer's own public rules (``rows.image_bytes``: regular files only;
``preprocess.decode_bytes``: the same modes and errors). Each file is read once per report.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ipiqa.errors import IPIQAError
from ipiqa.preprocess import decode_bytes, to_rgb

from ..rows import Row, image_bytes

__all__ = ["Thumbnail", "Thumbnails"]


@dataclass(frozen=True)
class Thumbnail:
    """A data URI, or why there is none (the image moved, or cannot be decoded)."""

    uri: Optional[str]
    why: Optional[str] = None


class Thumbnails:
    """``size``: the longest side in pixels; ``quality``: JPEG quality (about 3-6 KB a thumbnail at 160/70)."""

    def __init__(self, size: int = 160, quality: int = 70):
        self.size, self.quality = size, quality
        self._cache: dict[Path, Thumbnail] = {}

    def __call__(self, path: Path) -> Thumbnail:
        if path not in self._cache:
            self._cache[path] = self._make(path)
        return self._cache[path]

    def _make(self, path: Path) -> Thumbnail:
        try:
            img = to_rgb(decode_bytes(image_bytes(Row(str(path), None)), path))
            img.thumbnail((self.size, self.size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=self.quality, optimize=True)
        except IPIQAError as exc:
            return Thumbnail(None, str(exc))
        except Exception as exc:  # noqa: BLE001 - one image must never stop the report
            return Thumbnail(None, f"{path}: {type(exc).__name__}: {exc}")
        return Thumbnail("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))

    @property
    def made(self) -> int:
        return sum(1 for t in self._cache.values() if t.uri is not None)
