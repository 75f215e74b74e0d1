"""Thumbnails as small JPEG data URIs, so the page carries its images and opens offline, anywhere.

Images are read and decoded by the scorer's own public rules (``rows.image_bytes``: regular files only, or a
row's in-memory bytes; ``preprocess.decode_bytes``: the same modes and errors). Each file is read once per
report. A row inside a shard (``SHARD::KEY``) has its preview only with ``prefetch_shards`` (``ipiqa report
--shard-previews``): each shard holding a shown row is streamed once by the scorer's own reader
(``io.shards.shard_rows``), up to its last shown key; a Parquet row (``FILE::ROW``) gets a placeholder.
"""
from __future__ import annotations

import base64
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ipiqa.errors import IPIQAError
from ipiqa.preprocess import decode_bytes, to_rgb

from ..io.inputs import split_reference
from ..io.shards import shard_rows
from ..rows import Row, image_bytes
from .read import resolve_image, shard_of

__all__ = ["Thumbnail", "Thumbnails"]

SHARD_HINT = "an image inside a shard; pass --shard-previews to read it from the shard (each shard holding a shown " \
             "row is streamed once)"
PARQUET_HINT = "an image inside a Parquet file; the report shows no preview of those yet"


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
        self._inside: dict[str, Thumbnail] = {}  # SHARD::KEY label -> its thumbnail (prefetch_shards)

    def __call__(self, path: Path) -> Thumbnail:
        if path not in self._cache:
            self._cache[path] = self._make(Row(str(path), None), path)
        return self._cache[path]

    def for_row(self, image: str, root: Optional[Path]) -> Thumbnail:
        """A row's thumbnail by its ``image`` cell: a file (relative to ``root``), or a reference into a shard or
        Parquet file (prefetched, or a placeholder saying why not)."""
        path = resolve_image(image, root)
        if image in self._inside:
            return self._inside[image]
        if not path.is_file() and split_reference(image) is not None:
            return Thumbnail(None, f"{image}: {SHARD_HINT if shard_of(image, root) else PARQUET_HINT}")
        return self(path)

    def prefetch_shards(self, images: Iterable[str], root: Optional[Path]) -> None:
        """Thumbnails of the ``SHARD::KEY`` rows among ``images``: each shard streamed once, stopping after the
        last of its wanted keys; memory: the thumbnails, never a shard's other members."""
        wanted: dict[Path, dict[str, str]] = defaultdict(dict)  # shard -> key -> label
        for image in images:
            found = shard_of(image, root)
            if found is not None and image not in self._inside:
                wanted[found[0]][found[1]] = image
        for shard, keys in wanted.items():
            if not shard.is_file():
                for image in keys.values():
                    self._inside[image] = Thumbnail(None, f"{shard}: no such shard (moved? pass --images-root)")
                continue
            prefix = f"{shard}::"
            rows = shard_rows(str(shard))
            try:
                for row in rows:
                    image = keys.pop(row.image[len(prefix):], None) if row.image.startswith(prefix) else None
                    if image is not None:
                        self._inside[image] = Thumbnail(None, row.error) if row.error else self._make(row, image)
                    if not keys:
                        break
            finally:
                rows.close()  # closes the shard
            for key, image in keys.items():
                self._inside[image] = Thumbnail(None, f"{image}: not in the shard (it changed since it was scored)")

    def _make(self, row: Row, name: object) -> Thumbnail:
        try:
            img = to_rgb(decode_bytes(image_bytes(row), name, draft=self.size))
            img.thumbnail((self.size, self.size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=self.quality, optimize=True)
        except IPIQAError as exc:
            return Thumbnail(None, str(exc))
        except Exception as exc:  # noqa: BLE001 - one image must never stop the report
            return Thumbnail(None, f"{name}: {type(exc).__name__}: {exc}")
        return Thumbnail("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))

    @property
    def made(self) -> int:
        return sum(1 for t in (*self._cache.values(), *self._inside.values()) if t.uri is not None)
