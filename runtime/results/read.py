"""The scores file ``ipiqa score`` wrote, read back as rows, streamed: memory does not grow with the file.

No new parser: CSV and JSONL are read by their codecs' own ``scan`` (``runtime/io/formats.py``, the code
``--resume`` trusts), so the report reads exactly the layout the run wrote, and stops where a killed run's
partial last record starts. Parquet, which has no scan, is read a row group at a time with pyarrow.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Optional, Union

from ipiqa.errors import IPIQAError

from ..io.formats import output_columns, output_format, scan_output
from ..io.inputs import SHARD_SUFFIXES, split_reference

__all__ = ["ScoreRow", "ScoresFile", "SCORE_SUFFIXES", "resolve_image", "shard_of"]

PARQUET_BATCH = 65536  # rows per pyarrow batch (memory of a Parquet read)
SCORE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")  # what ipiqa score writes (io.formats.output_format)


@dataclass(frozen=True)
class ScoreRow:
    """One row of a scores file: its 0-based position, image path as the run wrote it, prompt, and either
    its scores (in the file's output order) or its error."""

    index: int
    image: str
    prompt: Optional[str]
    scores: Optional[tuple[float, ...]]
    error: Optional[str]


class ScoresFile:
    """A scores file whose layout was checked on construction; each iteration streams its rows anew.

    ``outputs``: the score columns between ``prompt`` and ``error``. ``complete`` (after an iteration): False
    when the file ends in a partial record, as a killed run leaves it (the rows before it were read). One file
    of a scores set (``sets.ScoresSet``), which is what the commands read.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_file():
            raise IPIQAError(f"{self.path}: no such scores file; give the file 'ipiqa score -o ...' wrote")
        self.fmt = output_format(self.path)
        self.outputs: tuple[str, ...] = self._outputs()
        self.complete = True
        self.count = 0  # rows read by the last complete iteration

    # -- layout
    def _refuse(self, why: str) -> IPIQAError:
        return IPIQAError(f"{self.path}: not a scores file of 'ipiqa score' ({why}); its columns are image, prompt, "
                          "one per score, error")

    def _check(self, columns: list[str]) -> tuple[str, ...]:
        if len(columns) < 4 or columns[:2] != ["image", "prompt"] or columns[-1] != "error":
            raise self._refuse(f"found columns {columns}")
        return tuple(columns[2:-1])

    def _outputs(self) -> tuple[str, ...]:
        if self.fmt == "parquet":
            from ipiqa._optional import require

            pq = require("pyarrow.parquet", extra="parquet")
            try:
                return self._check(list(pq.ParquetFile(self.path).schema_arrow.names))
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise self._refuse(f"unreadable Parquet: {exc}") from None
        with open(self.path, "rb") as fh:
            first = fh.readline()
        if not first.strip():
            raise self._refuse("the file is empty")
        try:
            text = first.decode("utf-8")
            if self.fmt == "csv":
                return self._check(next(csv.reader(io.StringIO(text))))
            record = json.loads(text)
        except (UnicodeDecodeError, ValueError, csv.Error, StopIteration) as exc:
            raise self._refuse(f"first line unreadable: {exc}") from None
        if not isinstance(record, dict):
            raise self._refuse("the first line is not a JSON object")
        return self._check(list(record))

    # -- rows
    def __iter__(self) -> Iterator[ScoreRow]:
        return self.rows()

    def rows(self, prompts: Optional[Collection[Optional[str]]] = None, start: int = 0) -> Iterator[ScoreRow]:
        """Every row in file order; with ``prompts``, only the rows of those prompts (the others are skipped
        before their scores are parsed: the report's second pass wants a few prompts of a large file).
        ``start``: the first row's index (a scores set numbers its files' rows on from the previous file's)."""
        records = self._parquet_records() if self.fmt == "parquet" else self._scanned_records()
        index = start
        for record in records:
            if prompts is None or _prompt(record.get("prompt")) in prompts:
                yield self._row(index, record, start)
            index += 1
        self.count = index - start

    def _scanned_records(self) -> Iterator[dict]:
        size, end = self.path.stat().st_size, 0
        self.complete = True
        for end, record in scan_output(self.path, self.outputs, self.fmt):
            if record is not None:  # None: the CSV header
                yield record
        self.complete = end >= size

    def _parquet_records(self) -> Iterator[dict]:
        from ipiqa._optional import require

        pq = require("pyarrow.parquet", extra="parquet")
        names = output_columns(self.outputs)
        self.complete = True
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=PARQUET_BATCH, columns=names):
            columns = [batch.column(i).to_pylist() for i in range(len(names))]
            for values in zip(*columns):
                yield dict(zip(names, values))

    def _row(self, index: int, record: dict, start: int = 0) -> ScoreRow:
        """A record by the codecs' rules: an empty CSV cell or JSON null is a missing value."""
        error = record.get("error") or None
        prompt = _prompt(record.get("prompt"))
        scores: Optional[tuple[float, ...]] = None
        if error is None:
            cells = [record.get(o) for o in self.outputs]
            try:
                values = tuple(map(float, cells))  # None/"" fail here: a row with neither scores nor error
            except (TypeError, ValueError):
                raise IPIQAError(f"{self.path}: row {index - start + 1} ({record.get('image')!r}) has no error and "
                                 f"unreadable scores {cells}; the file was not written by 'ipiqa score' or was "
                                 "edited") from None
            if not all(map(math.isfinite, values)):
                error = f"non-finite score {values}"
            else:
                scores = values
        return ScoreRow(index, str(record.get("image") or ""), prompt, scores, None if error is None else str(error))


def _prompt(value: object) -> Optional[str]:
    """A prompt cell: an empty CSV cell or JSON null is no prompt (as the writer wrote a missing one)."""
    return None if value is None or value == "" else str(value)


def resolve_image(image: str, root: Optional[Path]) -> Path:
    """Where a row's image is: the path as the scoring run resolved it (a manifest's relative paths already
    joined to its folder), relative to the current folder as the run's was, or to ``root`` (``--images-root``)."""
    path = Path(image)
    return path if root is None or path.is_absolute() else Path(root) / path


def shard_of(image: str, root: Optional[Path] = None) -> Optional[tuple[Path, str]]:
    """(shard file, key) of a ``SHARD::KEY`` row (``io.inputs.split_reference``, the one reading of such a cell),
    or None for any other row (a file path, a Parquet file's ``FILE::ROW``)."""
    found = split_reference(image)
    if found is None or not found[0].name.lower().endswith(SHARD_SUFFIXES):
        return None
    return resolve_image(str(found[0]), root), found[1]
