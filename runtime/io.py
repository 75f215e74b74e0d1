"""Inputs and outputs of a scoring run, streamed: memory does not grow with the number of rows.

Inputs: a folder of images, one image, a CSV/TSV/JSONL manifest with ``image`` and ``prompt`` columns
(relative paths resolve against the manifest's folder), or explicit rows. Manifests are read one record at a
time (a folder's names are listed and sorted once: use a manifest for tens of millions of files). Outputs:
CSV or JSONL, one row per input row in input order, flushed per batch so an interrupted run keeps its rows;
``resume_point`` reads an existing output once, in linear time. ``OutputLock`` keeps two runs off one file.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional, Sequence, Union

from ipiqa.errors import IPIQAError

from .rows import Result, Row, check_prompt_source, resolve_prompt

__all__ = ["Row", "Result", "IMAGE_SUFFIXES", "RowSource", "read_rows", "writable_rows", "refuse_same_file", "output_columns", "output_format",
           "ResultWriter", "OutputError", "OutputLock", "resume_point"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
RESUME_HINT = "re-run the same command with --resume (Python: resume=True) to continue after the last complete row"


class OutputError(IPIQAError):
    """The output file cannot be written (full disk, locked by another run, not resumable)."""


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

    def _lines(self) -> Iterator[str]:
        """Decoded lines, one at a time: a bad byte is reported on its own line, not a buffer away."""
        with open(self.path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                # -sig: spreadsheets write a BOM first; surrogateescape keeps a bad byte to its own row
                yield line.decode("utf-8-sig" if n == 1 else "utf-8", errors="surrogateescape")

    def _csv_reader(self, lines: Iterator[str]):
        return csv.DictReader(lines, delimiter="\t" if self.path.suffix.lower() == ".tsv" else ",")

    def _csv_columns(self) -> set[str]:
        lines = self._lines()
        try:
            return {(c or "").strip() for c in (self._csv_reader(lines).fieldnames or [])}
        except (UnicodeDecodeError, csv.Error) as exc:
            raise IPIQAError(f"{self.path}: not a UTF-8 CSV/TSV manifest ({exc}); save it as UTF-8 text") from None
        finally:
            lines.close()

    def _csv_rows(self) -> Iterator[Row]:
        lines = self._lines()
        reader = self._csv_reader(lines)
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


def output_columns(outputs: Sequence[str]) -> list[str]:
    """The output schema: image, prompt, one column per score, error."""
    return ["image", "prompt", *outputs, "error"]


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return "jsonl" if suffix in (".jsonl", ".ndjson") else "parquet" if suffix == ".parquet" else "csv"


PARQUET_ROW_GROUP = 65536  # rows buffered per Parquet row group (a Parquet file is complete only once closed)


class ResultWriter:
    """Writes results as they come, flushed per call; CSV columns: image, prompt, <outputs...>, error.

    A failed write (full disk, I/O error) raises one ``OutputError`` naming the file, the rows already safe
    in it and how to resume; the file is then closed without a second error.
    """

    def __init__(self, target: Union[str, Path, IO[str]], outputs: Sequence[str], fmt: Optional[str] = None,
                 append: bool = False, rows_before: int = 0):
        self.outputs = tuple(outputs)
        self.rows_written = rows_before  # rows complete in the file (resumed ones included)
        self._failed = False
        self.name = str(target) if isinstance(target, (str, Path)) else getattr(target, "name", "<stream>")
        if isinstance(target, (str, Path)) and str(target) != "-":
            path = Path(target)
            self.fmt = fmt or output_format(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fh: IO[str] = open(path, "a" if append else "w", encoding="utf-8", newline="")
            except OSError as exc:
                raise OutputError(f"{path}: cannot open the output ({exc.strerror}); choose another --output") from None
            self._owned = True
        else:
            self.fmt = fmt or "csv"
            self._fh = sys.stdout if str(target) == "-" else target  # type: ignore[assignment]
            self._owned = False
        if self.fmt not in ("csv", "jsonl", "parquet"):
            raise IPIQAError(f"unknown output format {self.fmt!r}; use csv, jsonl or parquet")
        self._csv = csv.writer(self._fh) if self.fmt == "csv" else None
        self._parquet = _ParquetSink(self._fh, self.outputs, self.name, append) if self.fmt == "parquet" else None
        if self._csv and not append:
            self._guarded(lambda: self._csv.writerow(output_columns(self.outputs)), 0)

    def _guarded(self, write, rows: int) -> None:
        try:
            write()
            self._fh.flush()
        except OSError as exc:
            self._failed = True
            what = exc.strerror or type(exc).__name__
            raise OutputError(f"{self.name}: writing failed ({what}, errno {exc.errno}) after {self.rows_written} "
                              f"complete rows; they are safe in the file. "
                              f"{'Free disk space, then ' if exc.errno == errno.ENOSPC else 'Fix the cause, then '}"
                              f"{RESUME_HINT}.") from None
        self.rows_written += rows

    def write(self, results: Iterable[Result]) -> None:
        results = list(results)
        self._guarded(lambda: self._write(results), len(results))

    def _write(self, results: list[Result]) -> None:
        if self._parquet is not None:
            self._parquet.add(results)
            return
        for res in results:
            scores = res.scores or (None,) * len(self.outputs)
            if self._csv:
                cells = ["" if s is None else repr(float(s)) for s in scores]
                self._csv.writerow([res.row.image, res.row.prompt or "", *cells, res.error or ""])
            else:
                record = {"image": res.row.image, "prompt": res.row.prompt}
                record.update(dict(zip(self.outputs, scores)))
                record["error"] = res.error
                self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._parquet is not None and not self._failed:
            self._guarded(self._parquet.close, 0)
        if self._owned:
            try:
                self._fh.close()
            except OSError:
                if not self._failed:  # the failure was already reported once
                    raise

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ParquetSink:
    """Results -> one Parquet file, a row group per ``PARQUET_ROW_GROUP`` rows. Not resumable."""

    def __init__(self, fh: IO[str], outputs: Sequence[str], name: str, append: bool):
        from ipiqa._optional import require

        self.pa = require("pyarrow", extra="parquet")
        pq = require("pyarrow.parquet", extra="parquet")
        if append:
            raise OutputError(f"{name}: a Parquet output cannot be resumed (it is complete only once closed); "
                              "use a .csv or .jsonl output for --resume")
        if not hasattr(fh, "buffer") or fh is sys.stdout:
            raise OutputError("Parquet output needs a file (-o scores.parquet), not stdout")
        self.outputs = tuple(outputs)
        self.schema = self.pa.schema([("image", self.pa.string()), ("prompt", self.pa.string()),
                                      *[(o, self.pa.float64()) for o in self.outputs], ("error", self.pa.string())])
        self.writer = pq.ParquetWriter(fh.buffer, self.schema)
        self.pending: list[Result] = []

    def add(self, results: list[Result]) -> None:
        self.pending.extend(results)
        if len(self.pending) >= PARQUET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        rows = self.pending
        columns = {"image": [r.row.image for r in rows], "prompt": [r.row.prompt for r in rows]}
        for j, name in enumerate(self.outputs):
            columns[name] = [None if r.scores is None else r.scores[j] for r in rows]
        columns["error"] = [r.error for r in rows]
        self.writer.write_table(self.pa.table(columns, schema=self.schema))
        self.pending = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


def refuse_same_file(source: object, output: object) -> None:
    """Writing the output over the manifest being read would destroy it before any row is read."""
    if not isinstance(source, (str, Path)) or output is None or str(output) == "-":
        return
    src, out = Path(source), Path(str(output))
    if src.is_file() and out.exists() and os.path.samefile(src, out):
        raise OutputError(f"{out}: the output is the input manifest; choose another --output")


class OutputLock:
    """An advisory lock on ``<output>.lock`` for the length of a run: a second run on the same output refuses,
    naming the first (pid, host, start time). POSIX only (``fcntl``); elsewhere it does nothing."""

    def __init__(self, output: Union[str, Path, None]):
        special = output is not None and Path(output).exists() and not Path(output).is_file()  # /dev/null, a pipe
        self.path = None if output is None or str(output) == "-" or special else Path(str(output) + ".lock")
        self._fh: Optional[IO[str]] = None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        if self.path is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.path.parent}: cannot create the output's folder ({exc.strerror}); choose "
                              "another --output") from None
        while True:
            try:
                fh = open(self.path, "a+", encoding="utf-8")
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot create the output's lock file ({exc.strerror}); choose "
                                  "an --output in a writable folder") from None
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise OutputError(f"{str(self.path)[:-5]}: another ipiqa run is writing this output ({holder}); "
                                  f"wait for it to finish, or choose another --output. If no such run exists, delete "
                                  f"{self.path}.") from None
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file another run unlinked while we waited for it
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            try:
                os.unlink(self.path)  # type: ignore[arg-type]
            except OSError:
                pass
            self._fh.close()  # releases the lock
            self._fh = None


def _csv_records(fh: IO[bytes], header: list[str], path: Path) -> Iterator[tuple[int, Optional[str]]]:
    """(end offset, image) of each complete CSV record; the header first, as (end, None)."""
    state = {"offset": 0, "last": b""}

    def lines() -> Iterator[str]:
        for line in fh:
            state["offset"] += len(line)
            state["last"] = line
            yield line.decode("utf-8")

    reader = csv.reader(lines())
    try:
        first = next(reader, None)
        if first is None or not state["last"].endswith(b"\n"):
            return  # the header itself was cut off: nothing to keep
        if first != header:
            raise OutputError(f"{path}: cannot resume: its columns {first} are not {header}; use another --output")
        yield state["offset"], None
        for record in reader:
            if len(record) != len(header) or not state["last"].endswith(b"\n"):
                return
            yield state["offset"], record[0]
    except (csv.Error, UnicodeDecodeError):
        return  # a record cut inside a quoted field or a multi-byte character: the partial tail


def _jsonl_records(fh: IO[bytes]) -> Iterator[tuple[int, Optional[str]]]:
    offset = 0
    for line in fh:
        if not line.endswith(b"\n"):
            return
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(record, dict) or "image" not in record:
            return
        offset += len(line)
        yield offset, record["image"]


def resume_point(path: Path, rows: Iterator[Row], outputs: Sequence[str], fmt: Optional[str] = None) -> int:
    """How many leading rows the output already holds; consumes that many from ``rows``.

    Outputs are written in input order, one record per row, so a killed run left a prefix of the input
    (and maybe one partial record, which is cut off the file). One pass over the file, line by line: time
    linear in its size, memory constant. Each record's image must equal the input row's image.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    fmt = fmt or output_format(path)
    if fmt == "parquet":
        raise OutputError(f"{path}: a Parquet output cannot be resumed (it is complete only once closed); use a .csv "
                          "or .jsonl output for --resume")
    keep = done = 0
    with open(path, "rb") as fh:
        records = _jsonl_records(fh) if fmt == "jsonl" else _csv_records(fh, output_columns(outputs), path)
        for end, image in records:
            if image is not None:
                row = next(rows, None)
                if row is None:
                    raise OutputError(f"{path}: holds more rows than the input; it is not this input's output")
                if image != row.image:
                    raise OutputError(f"{path}: row {done + 1} is {image!r} but the input's row {done + 1} is "
                                      f"{row.image!r}; resume needs the same input in the same order")
                done += 1
            keep = end
    if keep < path.stat().st_size:
        os.truncate(path, keep)  # drop the record the kill cut in half
    return done
