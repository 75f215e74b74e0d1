"""Row sources of a scoring run, streamed: memory does not grow with the number of rows.

A folder of images, one image, a CSV/TSV/JSONL manifest with ``image`` and ``prompt`` columns (relative
paths resolve against the manifest's folder), or explicit rows. Manifests are read one record at a time (a
folder's names are listed and sorted once: use a manifest for tens of millions of files). Calibration and
training read their image lists here too, so every entry point takes the same inputs the same way.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from ipiqa.errors import IPIQAError

from ..rows import Row, check_prompt_source, resolve_prompt
from .formats import RESUME_HINT

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


class RowSource:
    """The rows of a folder, an image or a manifest; checked on construction, read lazily on iteration.

    ``has_prompt_column`` says whether rows can carry their own prompt (a manifest with a prompt column).
    """

    def __init__(self, source: Union[str, Path], prompt: Optional[str] = None):
        self.path = Path(source)
        self.prompt = prompt
        if self.path.is_dir():
            self.kind = "folder"
        elif not self.path.is_file():
            raise IPIQAError(f"{self.path}: no such folder or manifest")
        elif self.path.suffix.lower() in IMAGE_SUFFIXES:
            self.kind = "image"
        elif self.path.suffix.lower() in (".jsonl", ".ndjson"):
            self.kind = "jsonl"
        else:
            self.kind = "csv"
        self.has_prompt_column = False
        if self.kind == "csv":
            self._check_columns(self._csv_columns())
        elif self.kind == "jsonl":
            self.has_prompt_column = True  # any record may carry a prompt key; an absent one is a missing prompt
        elif self.kind == "folder" and not any(True for _ in self._folder_files()):
            raise IPIQAError(f"{self.path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")

    def __iter__(self) -> Iterator[Row]:
        if self.kind == "folder":
            rows: Iterator[Row] = (Row(str(p), resolve_prompt(None, self.prompt)) for p in sorted(self._folder_files()))
        elif self.kind == "image":
            rows = iter([Row(str(self.path), resolve_prompt(None, self.prompt))])
        else:
            rows = self._jsonl_rows() if self.kind == "jsonl" else self._csv_rows()
        return writable_rows(rows)

    # -- folders
    def _folder_files(self) -> Iterator[Path]:
        with os.scandir(self.path) as entries:
            for entry in entries:
                if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                    yield Path(entry.path)

    # -- manifests
    def _check_columns(self, columns: set[str]) -> None:
        """Only ``image`` is required here: whether rows need a prompt column is the model's to say
        (``rows.check_prompt_source``, called by every entry point once it knows the model)."""
        self.has_prompt_column = "prompt" in columns
        if "image" not in columns:
            raise IPIQAError(f"{self.path}: missing column(s) ['image']; found {sorted(columns)}. A manifest names each image "
                             "file in an 'image' column (and, for a model with a text branch, its prompt in 'prompt')")

    def _row(self, image: object, prompt: object) -> Row:
        text = "" if image is None else str(image).strip()
        resolved = str(self.path.parent / text) if text and not Path(text).is_absolute() else text
        return Row(resolved, resolve_prompt(prompt, self.prompt))

    def _csv_columns(self) -> set[str]:
        lines = manifest_lines(self.path)
        try:
            return {(c or "").strip() for c in (csv_manifest(self.path, lines).fieldnames or [])}
        except (UnicodeDecodeError, csv.Error) as exc:
            raise IPIQAError(f"{self.path}: not a UTF-8 CSV/TSV manifest ({exc}); save it as UTF-8 text") from None
        finally:
            lines.close()

    def _csv_rows(self) -> Iterator[Row]:
        lines = manifest_lines(self.path)
        reader = csv_manifest(self.path, lines)
        try:
            for record in reader:
                record = {(k or "").strip(): v for k, v in record.items()}
                row = self._row(record.get("image"), record.get("prompt"))
                if not _utf8(row.image) or not _utf8(row.prompt or ""):
                    at = f"{self.path}:{reader.line_num}"
                    row = Row(at, None, error=f"{at}: unreadable manifest line (not UTF-8 text)")
                yield row  # (writable_rows re-checks; this names the line)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise IPIQAError(f"{self.path}:{reader.line_num + 1}: unreadable manifest line ({exc}); fix it, then "
                             f"{RESUME_HINT}") from None
        finally:
            lines.close()

    def _jsonl_lines(self) -> Iterator[tuple[int, object]]:
        with open(self.path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    yield n, exc

    def _jsonl_rows(self) -> Iterator[Row]:
        for n, record in self._jsonl_lines():
            if isinstance(record, dict):
                yield self._row(record.get("image"), record.get("prompt"))
            else:  # the row is kept (as an error row) so one bad line never loses the others
                why = record.msg if isinstance(record, json.JSONDecodeError) else "not a JSON object"
                yield Row(f"{self.path}:{n}", None, error=f"{self.path}:{n}: unreadable manifest line ({why})")


def manifest_lines(path: Path, errors: str = "surrogateescape") -> Iterator[str]:
    """Decoded lines, one at a time: a bad byte is reported on its own line, not a buffer away.

    ``errors="strict"`` (training's label files) raises on it instead of keeping it to its own row."""
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            yield line.decode("utf-8-sig" if n == 1 else "utf-8", errors=errors)  # -sig: spreadsheets write a BOM


def csv_manifest(path: Path, lines: Iterator[str]) -> csv.DictReader:
    """The records of a CSV manifest, or of a TSV one by its suffix."""
    return csv.DictReader(lines, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def writable_rows(rows: Iterable[Row]) -> Iterator[Row]:
    """Rows whose text cannot be written as UTF-8 (a file name with undecodable bytes, a lone surrogate in a
    JSON string) become error rows with an escaped name, so the output stays UTF-8 and resumable."""
    for row in rows:
        if _utf8(row.image) and _utf8(row.prompt or "") and _utf8(row.error or ""):
            yield row
        else:
            name = row.image.encode("utf-8", "backslashreplace").decode("utf-8")
            yield Row(name, None, error=f"{name}: path or prompt is not valid UTF-8 text; rename the file or fix "
                                        "the manifest")


def read_rows(source: Union[str, Path], prompt: Optional[str] = None, needs_prompt: bool = True) -> list[Row]:
    """All rows of a folder or manifest in a list (small inputs; runs stream ``RowSource`` instead).

    ``needs_prompt``: the rows are for a model with a text branch (refused without any prompt source)."""
    rows = RowSource(source, prompt)
    check_prompt_source(needs_prompt, rows.has_prompt_column, prompt, source)
    return list(rows)
