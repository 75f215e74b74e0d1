"""Row sources of a scoring run, streamed: memory does not grow with the number of rows.

A folder of images, one image, a CSV/TSV/JSONL manifest with ``image`` and ``prompt`` columns (relative
paths resolve against the manifest's folder), WebDataset tar shards (``shards``) or Parquet files with an
image column (``parquet_source``), or explicit rows; what names which is ``inputs``'s rule. Shards and Parquet
files are *partitions*: the rows of each can be read on their own (``partition_rows``), so a run can write one
output per input file. Manifests are read one record at a time (a folder's names are listed and sorted once:
use a manifest for tens of millions of files); a manifest row naming ``SHARD::KEY`` or ``FILE::ROW`` (what shard
and Parquet runs write, what ``select`` keeps) is read from that sample or row (``references``). Calibration and
training read their image lists here too, so every entry point takes the same inputs the same way.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from ipiqa.errors import IPIQAError

from ..rows import Row, check_prompt_source, clean_prompt, resolve_prompt
from .formats import RESUME_HINT, OutputError, refuse_same_file
from .inputs import IMAGE_SUFFIXES, discover
from .references import is_reference, resolve_references
from .parquet_source import ParquetColumns, parquet_columns, parquet_row_count, parquet_rows
from .shards import check_tar, shard_rows

__all__ = ["IMAGE_SUFFIXES", "RowSource", "manifest_lines", "csv_manifest", "writable_rows", "read_rows"]


class RowSource:
    """The rows of a folder, an image, a manifest, tar shards or Parquet files; checked on construction, read
    lazily on iteration.

    ``has_prompt_column`` says whether rows can carry their own prompt (a manifest with a prompt column, a
    shard sample's ``.txt``/``.json``). ``prompt_field``: the ``.json`` field shards take the prompt from
    (default ``prompt``). ``image_column``/``prompt_column``: Parquet's columns (default ``image``, and
    ``prompt`` when present). A manifest takes the three options for the shards and Parquet files its rows name.
    ``partitions``: the input files whose rows ``partition_rows`` reads one by one (every shard or Parquet file;
    the source itself for the other kinds). ``count()``: the rows, where that is cheap (the progress bar's total).
    """

    def __init__(self, source: Union[str, Path], prompt: Optional[str] = None, *, prompt_field: Optional[str] = None,
                 image_column: Optional[str] = None, prompt_column: Optional[str] = None):
        self.path = Path(source)
        self.prompt = prompt
        self.prompt_field = prompt_field or "prompt"
        self._column_options = (image_column, prompt_column)  # for Parquet files (a manifest's references too)
        self._columns: list[ParquetColumns] = []
        found = discover(str(source))
        self.kind = found.kind
        self._images = found.images
        self._refuse_options(prompt_field, image_column, prompt_column)
        self.partitions: tuple[Path, ...] = found.files or (self.path,)
        self.has_prompt_column = False
        if self.kind == "csv":
            self._check_columns(self._csv_columns())
        elif self.kind in ("jsonl", "shards"):
            self.has_prompt_column = True  # any record/sample may carry a prompt; an absent one is a missing prompt
        if self.kind == "shards":
            for shard in self.partitions:  # one header each: a non-tar is refused before any row is scored
                check_tar(shard)
        elif self.kind == "parquet":
            self._columns = [parquet_columns(p, image_column, prompt_column) for p in self.partitions]
            self.has_prompt_column = all(c.prompt is not None for c in self._columns)

    def _refuse_options(self, prompt_field: Optional[str], image_column: Optional[str],
                        prompt_column: Optional[str]) -> None:
        """An option for another kind of input would be silently ignored: refuse it instead."""
        if prompt_field is not None and self.kind not in ("shards", "csv", "jsonl"):
            raise IPIQAError(f"{self.path}: --prompt-field reads the .json member of tar shards; this input is a "
                             f"{self.kind} (a manifest's prompt is its 'prompt' column)")
        if (image_column or prompt_column) and self.kind not in ("parquet", "csv", "jsonl"):
            raise IPIQAError(f"{self.path}: --image-column/--prompt-column name Parquet columns; this input is a "
                             f"{self.kind} (a manifest's columns are 'image' and 'prompt')")

    @property
    def in_memory(self) -> bool:
        """Rows carry encoded bytes in ``source`` (shard members, Parquet bytes), not paths to decode."""
        return self.kind == "shards" or (self.kind == "parquet" and any(c.image_kind != "path" for c in self._columns))

    def __iter__(self) -> Iterator[Row]:
        if self.kind in ("shards", "parquet"):
            return (row for i in range(len(self.partitions)) for row in self.partition_rows(i))
        if self.kind == "folder":
            rows: Iterator[Row] = (Row(str(p), resolve_prompt(None, self.prompt)) for p in sorted(self._folder_files()))
        elif self.kind == "image":
            rows = iter([Row(str(self.path), resolve_prompt(None, self.prompt))])
        else:  # a manifest: rows naming SHARD::KEY or FILE::ROW are read from that sample or row
            rows = resolve_references(self._jsonl_rows() if self.kind == "jsonl" else self._csv_rows(), self.prompt,
                                      self.prompt_field, *self._column_options)
        return writable_rows(rows)

    def count(self) -> Optional[int]:
        """How many rows iterating yields, where that is cheap to know (a progress bar's total), else None.

        A folder's images were counted when it was listed; Parquet row counts come from each file's footer; a
        manifest's rows are its lines, counted by a byte scan (a quoted cell holding a line break or a blank line
        makes it a slight overestimate). Shards say how many samples they hold only when read: None."""
        if self.kind in ("folder", "image"):
            return self._images
        if self.kind == "parquet":
            return sum(parquet_row_count(p) for p in self.partitions)
        if self.kind in ("csv", "jsonl"):
            return manifest_line_count(self.path) - (1 if self.kind == "csv" else 0)
        return None

    def describe(self) -> str:
        """What the input is, in the words of a summary line: ``3 tar shards``, ``manifest data.csv``."""
        n = len(self.partitions)
        return {"shards": f"{n} tar shard{'s' * (n != 1)}", "parquet": f"{n} Parquet file{'s' * (n != 1)}",
                "folder": f"folder {self.path}", "image": f"image {self.path}"}.get(self.kind, f"manifest {self.path}")

    def partition_rows(self, index: int) -> Iterator[Row]:
        """The rows of ``partitions[index]`` alone, in order (all rows for a folder, image or manifest)."""
        if self.kind == "shards":
            return writable_rows(shard_rows(str(self.partitions[index]), self.prompt, self.prompt_field))
        if self.kind == "parquet":
            return writable_rows(parquet_rows(self.partitions[index], self._columns[index], self.prompt))
        return iter(self)

    def refuse_run(self, needs_prompt: bool, output: object, device_decode: bool = False) -> None:
        """Refuse a run that cannot score any row (no prompt source for a text model), one that would write
        over one of its own input files, or device decoding of rows that are not files."""
        check_prompt_source(needs_prompt, self.has_prompt_column, self.prompt, self.path)
        if self.kind in ("csv", "jsonl", "image"):
            refuse_same_file(self.path, output)
        elif self.kind in ("shards", "parquet") and output is not None and Path(str(output)).is_file():
            out = os.stat(str(output))
            for p in self.partitions:
                st = os.stat(p)
                if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
                    raise OutputError(f"{output}: the output is an input file ({p}); choose another --output")
        if device_decode and self.in_memory:
            raise IPIQAError(f"{self.path}: --decode device reads image files; these rows are encoded bytes "
                             f"({self.kind}): use --decode host")

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
        """A manifest record as a row; a reference's prompt stays its own cell's (``references`` fills an empty
        one from the sample, then ``--prompt``)."""
        text = "" if image is None else str(image).strip()
        resolved = str(self.path.parent / text) if text and not Path(text).is_absolute() else text
        if is_reference(resolved):
            return Row(resolved, clean_prompt(prompt))
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


def manifest_line_count(path: Path, chunk: int = 1 << 20) -> int:
    """Lines of a text file by a byte scan (a last line without a line break counts): constant memory, ~1 GB/s."""
    lines, last = 0, b"\n"
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


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
