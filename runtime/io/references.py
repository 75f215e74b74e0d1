"""Manifest rows that name a shard sample (``SHARD::KEY``) or a Parquet row (``FILE::ROW``), scored from it.

What a shard or Parquet run writes as ``image``, and what ``ipiqa select`` keeps, is a label of that form; fed
back as a manifest (``ipiqa score --images selected.csv``), each such row is read from its member or row, so
every output is an input again. The row keeps the manifest's label and prompt (an empty prompt cell takes the
sample's own ``.txt``/``.json`` prompt or Parquet prompt column, then ``--prompt``); a reference to a missing
file, key or row, or into a file that is not a shard/Parquet file, is that row's error.

Streamed, in the manifest's order. The manifest is resolved ``WINDOW`` rows at a time: the referenced keys of
a window are collected per file, and each file's reader (a forward-only stream, kept open between windows,
at most ``OPEN_READERS`` at once) advances until it has them, holding only the members the window wants.
Memory: one window's referenced images (``WINDOW`` encoded images at most, ~25 MB for 100 kB JPEGs), plus one
buffered sample per open reader. When the manifest follows each file's order (what ``score`` and ``select``
write), every file is read once, front to back. When it does not, a key behind its reader's position (read
past in an earlier window, or a reader closed to stay within ``OPEN_READERS``) reopens that file and reads it
again from the start: slower, never wrong and never more memory. A key absent from its file costs one read to
the file's end. Sort a hand-made manifest by image to keep one read per file.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from ipiqa.errors import IPIQAError

from ..rows import Row
from .inputs import input_suffix, split_reference

__all__ = ["resolve_references", "is_reference", "WINDOW", "OPEN_READERS"]

WINDOW = 256  # manifest rows resolved together: at most this many referenced images held at once
OPEN_READERS = 8  # files streamed at once (an fd and one buffered sample each)
Found = Union[Row, str]  # the member's row, or why the reference cannot be read


def is_reference(image: str) -> bool:
    """A manifest image cell naming a shard sample or a Parquet row (``inputs.split_reference``)."""
    return split_reference(image) is not None


class _Reader:
    """One file's rows as (key, row), forward only; ``fresh`` until its first row is taken."""

    def __init__(self, path: Path, prompt: Optional[str], prompt_field: str, columns: tuple):
        self.path, self.fresh, self.end_error = path, True, None
        self._rows = _keyed_rows(path, prompt, prompt_field, columns)

    def take(self, keys: set[str]) -> dict[str, Row]:
        """Advance until every key in ``keys`` is found or the file ends; the members passed and not wanted are
        dropped as they are read."""
        found: dict[str, Row] = {}
        for key, row in self._rows:
            self.fresh = False
            if key is None:  # the file is cut or unreadable past this point: its last row says where
                self.end_error = row.error
                continue
            if key in keys and key not in found:
                found[key] = row
                if len(found) == len(keys):
                    break
        return found

    def close(self) -> None:
        close = getattr(self._rows, "close", None)
        if close is not None:
            close()


def _keyed_rows(path: Path, prompt: Optional[str], prompt_field: str, columns: tuple) -> Iterator[tuple[Optional[str], Row]]:
    """(key, row) for every sample or Parquet row of ``path``; key None for the row that ends a cut file."""
    if input_suffix(path) == "shards":
        from .shards import check_tar, shard_rows

        check_tar(path)
        prefix = f"{path}::"
        for row in shard_rows(str(path), prompt, prompt_field):
            key = row.image[len(prefix):] if row.image.startswith(prefix) else None
            yield (None if key is None or key.startswith("<truncated at byte") else key), row
        return
    from .parquet_source import parquet_columns, parquet_rows

    cols = parquet_columns(path, *columns)
    for n, row in enumerate(parquet_rows(path, cols, prompt)):
        yield (None if row.image.endswith(">") and "::<unreadable" in row.image else str(n)), row


class _Readers:
    """The open readers, least recently used closed first, and the files that could not be opened."""

    def __init__(self, prompt: Optional[str], prompt_field: str, columns: tuple):
        self.prompt, self.prompt_field, self.columns = prompt, prompt_field, columns
        self.open: OrderedDict[Path, _Reader] = OrderedDict()
        self.refused: dict[Path, str] = {}  # one line per file that is missing or not a shard/Parquet file

    def _reader(self, path: Path, again: bool = False) -> _Reader:
        reader = self.open.pop(path, None)
        if reader is not None and again:
            reader.close()
            reader = None
        if reader is None:
            reader = _Reader(path, self.prompt, self.prompt_field, self.columns)
        self.open[path] = reader
        while len(self.open) > OPEN_READERS:
            self.open.popitem(last=False)[1].close()
        return reader

    def fetch(self, path: Path, keys: set[str]) -> dict[str, Found]:
        if path in self.refused:
            return dict.fromkeys(keys, self.refused[path])
        if not os.path.isfile(path):
            self.refused[path] = f"{path}: no such shard or Parquet file (named by the manifest)"
            return self.fetch(path, keys)
        try:
            reader = self._reader(path)
            found: dict[str, Found] = dict(reader.take(keys))
            if len(found) < len(keys) and not reader.fresh:  # behind the reader: read the file again from the start
                rest = keys - found.keys()
                reader = self._reader(path, again=True)
                found.update(reader.take(rest))
        except IPIQAError as exc:  # not a tar / not Parquet / no image column: every row naming it says so
            self.refused[path] = str(exc)
            self.open.pop(path, None)
            return self.fetch(path, keys)
        for key in keys - found.keys():
            why = f"; {reader.end_error}" if reader.end_error else ""
            found[key] = f"{path}::{key}: no such {_what(path)} in {path}{why}"
        return found

    def close(self) -> None:
        for reader in self.open.values():
            reader.close()
        self.open.clear()


def _what(path: Path) -> str:
    return "sample (key)" if input_suffix(path) == "shards" else "row"


def _key(path: Path, key: str) -> Optional[str]:
    """The key as the file's reader names it: a Parquet row number without padding (``007`` is row 7)."""
    if input_suffix(path) == "shards":
        return key
    return str(int(key)) if key.isdigit() else None


def _resolved(row: Row, found: Found) -> Row:
    if isinstance(found, str):
        return Row(row.image, row.prompt, error=found)
    source = found.source if found.source is not None else Path(found.image)  # a Parquet path cell: the file
    prompt = row.prompt if row.prompt is not None else found.prompt
    return Row(row.image, prompt, error=found.error, source=None if found.error else source)


def resolve_references(rows: Iterable[Row], prompt: Optional[str] = None, prompt_field: str = "prompt",
                       image_column: Optional[str] = None, prompt_column: Optional[str] = None) -> Iterator[Row]:
    """``rows`` in order, each referencing row carrying its member's image (bytes, or a Parquet path cell's file)
    or its error; other rows pass unchanged. ``prompt``: fills a referenced row whose manifest cell and member
    both lack a prompt. ``prompt_field``, ``image_column``, ``prompt_column``: how the referenced shards and
    Parquet files are read (their defaults as for ``--images``)."""
    readers = _Readers(prompt, prompt_field, (image_column, prompt_column))
    it = iter(rows)
    try:
        while window := list(islice(it, WINDOW)):
            refs: dict[int, tuple[Path, Optional[str], str]] = {}
            wanted: dict[Path, set[str]] = {}
            for i, row in enumerate(window):
                ref = split_reference(row.image) if row.error is None and row.source is None else None
                if ref is not None:
                    path, raw = ref
                    key = _key(path, raw)
                    refs[i] = (path, key, raw)
                    if key is not None:
                        wanted.setdefault(path, set()).add(key)
            found = {path: readers.fetch(path, keys) for path, keys in wanted.items()}
            for i, row in enumerate(window):
                if i not in refs:
                    yield row
                    continue
                path, key, raw = refs[i]
                yield _resolved(row, found[path][key] if key is not None else
                                f"{row.image}: {raw!r} is not a row number of Parquet file {path}")
    finally:
        readers.close()
