"""Output formats: one codec per format owns both how it writes results and how ``--resume`` reads them back.

Writer and resume used to agree only by convention; here each codec's ``write`` and ``scan`` sit side by side,
so the layout a run writes is the layout a resumed run parses (tests/test_io_formats.py checks the round trip).
Outputs hold one record per input row, in input order, flushed per batch: a killed run leaves a prefix.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Iterable, Iterator, Mapping, Optional, Sequence, Union

from ipiqa.errors import IPIQAError

from ..rows import Result, Row

RESUME_HINT = "re-run the same command with --resume (Python: resume=True) to continue after the last complete row"
PARQUET_ROW_GROUP = 65536  # rows buffered per Parquet row group (a Parquet file is complete only once closed)

Scanned = Iterator[tuple[int, Optional[dict]]]  # (end offset, record) of each complete record; None = header


class OutputError(IPIQAError):
    """The output file cannot be written (full disk, locked by another run, not resumable)."""


def refuse_same_file(source: object, output: object) -> None:
    """Writing the output over the manifest being read would destroy it before any row is read."""
    if not isinstance(source, (str, Path)) or output is None or str(output) == "-":
        return
    src, out = Path(source), Path(str(output))
    if src.is_file() and out.exists() and os.path.samefile(src, out):
        raise OutputError(f"{out}: the output is the input manifest; choose another --output")


def output_columns(outputs: Sequence[str]) -> list[str]:
    """The output schema: image, prompt, one column per score, error."""
    return ["image", "prompt", *outputs, "error"]


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return "jsonl" if suffix in (".jsonl", ".ndjson") else "parquet" if suffix == ".parquet" else "csv"


class Codec(ABC):
    """One format on an open text stream. ``refusal``: why the format cannot resume (None: it can).
    ``metadata``: key-value pairs a format with file metadata stores (Parquet: the run's provenance)."""

    refusal: Optional[str] = None

    def __init__(self, fh: IO[str], outputs: Sequence[str], name: str, append: bool,
                 metadata: Optional[Mapping[str, str]] = None):
        self.fh, self.outputs = fh, tuple(outputs)

    @classmethod
    def check_resumable(cls, name: object) -> None:
        """The one refusal of a format that cannot resume (asked by ``resume_point`` and an appending writer)."""
        if cls.refusal is not None:
            raise OutputError(f"{name}: {cls.refusal}; use a .csv or .jsonl output for --resume")

    def begin(self) -> None:
        """Whatever a new (not appended-to) file starts with."""

    @abstractmethod
    def write(self, results: list[Result]) -> None:
        """One batch's rows, flushed."""

    def close(self) -> None:
        """Whatever the file still needs once the last row is written."""

    @staticmethod
    @abstractmethod
    def scan(fh: IO[bytes], outputs: Sequence[str], path: Path) -> Scanned:
        """The complete records of a written file, read in one pass; stops at the first partial one."""


class CsvCodec(Codec):
    """image, prompt, <outputs...>, error; an empty cell is a missing value, scores as ``repr(float)``."""

    def __init__(self, fh: IO[str], outputs: Sequence[str], name: str, append: bool,
                 metadata: Optional[Mapping[str, str]] = None):
        super().__init__(fh, outputs, name, append)
        self._csv = csv.writer(fh)

    def begin(self) -> None:
        self._csv.writerow(output_columns(self.outputs))

    def write(self, results: list[Result]) -> None:
        for res in results:
            scores = res.scores or (None,) * len(self.outputs)
            cells = ["" if s is None else repr(float(s)) for s in scores]
            self._csv.writerow([res.row.image, res.row.prompt or "", *cells, res.error or ""])

    @staticmethod
    def scan(fh: IO[bytes], outputs: Sequence[str], path: Path) -> Scanned:
        header = output_columns(outputs)
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
                yield state["offset"], dict(zip(header, record))
        except (csv.Error, UnicodeDecodeError):
            return  # a record cut inside a quoted field or a multi-byte character: the partial tail


class JsonlCodec(Codec):
    """One JSON object a line: image, prompt, <outputs...>, error; a missing value is null."""

    def write(self, results: list[Result]) -> None:
        for res in results:
            record = {"image": res.row.image, "prompt": res.row.prompt}
            record.update(dict(zip(self.outputs, res.scores or (None,) * len(self.outputs))))
            record["error"] = res.error
            self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    @staticmethod
    def scan(fh: IO[bytes], outputs: Sequence[str], path: Path) -> Scanned:
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
            yield offset, record


class ParquetCodec(Codec):
    """One Parquet file, a row group per ``PARQUET_ROW_GROUP`` rows (needs the [parquet] extra)."""

    refusal = "a Parquet output cannot be resumed (it is complete only once closed)"

    def __init__(self, fh: IO[str], outputs: Sequence[str], name: str, append: bool,
                 metadata: Optional[Mapping[str, str]] = None):
        from ipiqa._optional import require

        super().__init__(fh, outputs, name, append)
        self.pa = require("pyarrow", extra="parquet")
        pq = require("pyarrow.parquet", extra="parquet")
        if append:
            self.check_resumable(name)
        if not hasattr(fh, "buffer") or fh is sys.stdout:
            raise OutputError("Parquet output needs a file (-o scores.parquet), not stdout")
        self.schema = self.pa.schema([("image", self.pa.string()), ("prompt", self.pa.string()),
                                      *[(o, self.pa.float64()) for o in self.outputs], ("error", self.pa.string())],
                                     metadata=dict(metadata) if metadata else None)
        self.writer = pq.ParquetWriter(fh.buffer, self.schema)
        self.pending: list[Result] = []

    @staticmethod
    def scan(fh: IO[bytes], outputs: Sequence[str], path: Path) -> Scanned:
        """Never scanned: a Parquet file is complete only once closed (``check_resumable`` refuses first)."""
        ParquetCodec.check_resumable(path)  # raises: this format has a refusal
        return iter(())

    def write(self, results: list[Result]) -> None:
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


CODECS: dict[str, type[Codec]] = {"csv": CsvCodec, "jsonl": JsonlCodec, "parquet": ParquetCodec}


class ResultWriter:
    """Writes results as they come, flushed per call; CSV columns: image, prompt, <outputs...>, error.

    A failed write (full disk, I/O error) raises one ``OutputError`` naming the file, the rows already safe
    in it and how to resume; the file is then closed without a second error.
    """

    def __init__(self, target: Union[str, Path, IO[str]], outputs: Sequence[str], fmt: Optional[str] = None,
                 append: bool = False, rows_before: int = 0, metadata: Optional[Mapping[str, str]] = None):
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
        if self.fmt not in CODECS:
            raise IPIQAError(f"unknown output format {self.fmt!r}; use csv, jsonl or parquet")
        self._codec = CODECS[self.fmt](self._fh, self.outputs, self.name, append, metadata)
        if not append:
            self._guarded(self._codec.begin, 0)

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
        self._guarded(lambda: self._codec.write(results), len(results))

    def close(self) -> None:
        if not self._failed:
            self._guarded(self._codec.close, 0)
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


def scan_output(path: Path, outputs: Sequence[str], fmt: Optional[str] = None) -> Scanned:
    """(end offset, record) of each complete record of a CSV/JSONL output, in one pass (None: the CSV header): the
    scan ``--resume`` trusts, for the readers of score files (``ipiqa report`` / ``select``)."""
    codec = CODECS[fmt or output_format(path)]
    with open(path, "rb") as fh:
        yield from codec.scan(fh, outputs, path)


def resume_point(path: Path, rows: Iterator[Row], outputs: Sequence[str], fmt: Optional[str] = None) -> int:
    """How many leading rows the output already holds; consumes that many from ``rows``.

    A killed run left a prefix of the input (and maybe one partial record, which is cut off the file). One
    pass over the file, line by line: time linear in its size, memory constant. Each record's image must
    equal the input row's image.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    codec = CODECS.get(fmt or output_format(path), CsvCodec)
    codec.check_resumable(path)
    keep = done = 0
    with open(path, "rb") as fh:
        for end, record in codec.scan(fh, outputs, path):
            if record is not None:
                image, row = record["image"], next(rows, None)
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
