"""Parquet files whose image column holds the images (Hugging Face's ``Image`` feature and the like) as rows.

The image column is encoded bytes (``binary``), the ``Image`` feature's ``{bytes, path}`` struct (bytes
first; a row without bytes falls back to its path), or a path string resolved like a manifest's (against
the file's folder). Bytes ride in the row's ``source``, so the pipeline decodes them with the file path's
rules and errors. Rows are labelled ``FILE::ROW`` (0-based row number in the file) unless the image is a
path, which is then the label, as in a manifest.

Streamed: ``iter_batches`` over the image and prompt columns only, a few rows at a time with buffered column
reads, so memory follows the batch and the row group, not the file. A file that is not Parquet, or whose
image column is missing or of another type, is refused before the run; a row group that cannot be read
mid-file ends that file with one error row naming the first row lost.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ipiqa.errors import IPIQAError

from ..rows import Row, resolve_prompt

__all__ = ["ParquetColumns", "parquet_columns", "parquet_rows", "parquet_row_count", "PARQUET_READ_ROWS"]

PARQUET_READ_ROWS = 32  # rows per read batch (a few of the pipeline's): memory is this or a row group, the larger
_READ_BUFFER = 1 << 20  # buffered column-chunk reads: pages are read as needed, not a whole chunk at once


@dataclass(frozen=True)
class ParquetColumns:
    """What a Parquet input's columns are, checked once per file."""

    image: str
    image_kind: str  # "bytes" | "struct" | "path"
    prompt: Optional[str]  # None: the file has no prompt column (--prompt fills every row)


def _pq():
    from ipiqa._optional import require

    return require("pyarrow", extra="parquet"), require("pyarrow.parquet", extra="parquet")


def _open(path: Path):
    pa, pq = _pq()
    try:
        return pq.ParquetFile(path, buffer_size=_READ_BUFFER, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise IPIQAError(f"{path}: not a Parquet file ({exc}); --images takes .parquet files with an image column "
                         "(check the file: a partial download?)") from None


def parquet_columns(path: Path, image_column: Optional[str] = None,
                    prompt_column: Optional[str] = None) -> ParquetColumns:
    """Check a file's schema against the options; ``None`` means the default (``image``, and ``prompt`` if
    present). A named column that is absent, or an image column of another type, is refused."""
    pa, _ = _pq()
    schema = _open(path).schema_arrow
    names = schema.names
    image = image_column or "image"
    if image not in names:
        raise IPIQAError(f"{path}: no image column {image!r}; found {names}. Name it with --image-column")
    kind_of = schema.field(image).type
    if pa.types.is_binary(kind_of) or pa.types.is_large_binary(kind_of):
        kind = "bytes"
    elif pa.types.is_struct(kind_of) and kind_of.get_field_index("bytes") >= 0:
        kind = "struct"
    elif pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of):
        kind = "path"
    else:
        raise IPIQAError(f"{path}: column {image!r} is {kind_of}; --image-column takes encoded image bytes (binary), "
                         "a {bytes, path} struct (Hugging Face Image) or a path string")
    if prompt_column is not None and prompt_column not in names:
        raise IPIQAError(f"{path}: no prompt column {prompt_column!r}; found {names}. Name it with --prompt-column")
    prompt = prompt_column or ("prompt" if "prompt" in names else None)
    return ParquetColumns(image, kind, prompt)


def parquet_row_count(path: Path) -> int:
    """The file's rows from its footer (no column is read): the progress bar's total."""
    return int(_open(path).metadata.num_rows)


def _image_row(path: Path, n: int, cell: object, prompt: Optional[str], kind: str) -> Row:
    label = f"{path}::{n}"
    data, name = (cell, None) if kind == "bytes" else (None, cell) if kind == "path" else (
        (cell or {}).get("bytes"), (cell or {}).get("path"))
    if data is not None:
        return Row(label, prompt, source=bytes(data))
    if name is not None and str(name).strip():
        text = str(name).strip()
        resolved = text if Path(text).is_absolute() else str(path.parent / text)
        return Row(resolved, prompt) if kind == "path" else Row(label, prompt, source=Path(resolved))
    return Row(label, prompt, error=f"{label}: no image (the {'path' if kind == 'path' else 'image'} cell is empty)")


def parquet_rows(path: Path, columns: ParquetColumns, prompt: Optional[str] = None) -> Iterator[Row]:
    """The rows of one file, in order, read ``PARQUET_READ_ROWS`` at a time."""
    pa, _ = _pq()
    wanted = [columns.image] + ([columns.prompt] if columns.prompt and columns.prompt != columns.image else [])
    n = 0
    try:
        for batch in _open(path).iter_batches(batch_size=PARQUET_READ_ROWS, columns=wanted, use_threads=False):
            images = batch.column(columns.image).to_pylist()
            prompts = batch.column(columns.prompt).to_pylist() if columns.prompt else [None] * len(images)
            for cell, own in zip(images, prompts):
                yield _image_row(path, n, cell, resolve_prompt(own, prompt), columns.image_kind)
                n += 1
    except (pa.ArrowException, OSError) as exc:
        yield Row(f"{path}::<unreadable from row {n}>", None,
                  error=f"{path}: unreadable from row {n} ({type(exc).__name__}: {exc}); the rows before it are "
                        "scored, the rest of this file is not: rewrite the file")
