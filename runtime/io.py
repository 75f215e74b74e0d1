"""Inputs and outputs of a scoring run, torch-free.

Inputs: a folder of images, a CSV/TSV/JSONL manifest with ``image`` and ``prompt`` columns (relative
paths resolve against the manifest's folder), or explicit rows. Outputs: CSV or JSONL, one row per
input row in input order, written and flushed as rows complete so an interrupted run keeps its rows.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Optional, Sequence, Union

from ipiqa.errors import IPIQAError

__all__ = ["Row", "Result", "IMAGE_SUFFIXES", "read_rows", "output_columns", "ResultWriter", "resume_point"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Row:
    image: str  # path as given (resolved for manifests)
    prompt: Optional[str]  # None when the manifest cell is empty/NaN


@dataclass(frozen=True)
class Result:
    row: Row
    scores: Optional[tuple[float, ...]] = None
    error: Optional[str] = None


def _clean_prompt(value: object) -> Optional[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return None if text.strip() == "" or text.strip().lower() == "nan" else text


def _folder_rows(folder: Path, prompt: Optional[str]) -> list[Row]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise IPIQAError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return [Row(str(p), prompt) for p in files]


def _manifest_rows(path: Path, prompt: Optional[str]) -> list[Row]:
    text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a BOM before the header
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise IPIQAError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
        columns = set().union(*(r.keys() for r in records)) if records else set()
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        records = list(reader)
        columns = {c.strip() for c in (reader.fieldnames or [])}
        records = [{(k or "").strip(): v for k, v in r.items()} for r in records]
    needed = {"image"} | (set() if prompt is not None else {"prompt"})
    missing = sorted(needed - columns)
    if missing:
        raise IPIQAError(
            f"{path}: missing column(s) {missing}; found {sorted(columns)}. A manifest needs 'image' and "
            "'prompt' columns (or pass --prompt to use one prompt for every image)"
        )
    base = path.parent
    rows = []
    for r in records:
        image = str(r.get("image") or "").strip()
        resolved = str(base / image) if image and not Path(image).is_absolute() else image
        row_prompt = _clean_prompt(r.get("prompt")) if "prompt" in columns else None
        rows.append(Row(resolved, row_prompt if row_prompt is not None else prompt))
    return rows


def read_rows(source: Union[str, Path], prompt: Optional[str] = None) -> list[Row]:
    """Rows of a folder or manifest; ``prompt`` fills rows without one."""
    path = Path(source)
    if path.is_dir():
        return _folder_rows(path, prompt)
    if not path.is_file():
        raise IPIQAError(f"{path}: no such folder or manifest")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [Row(str(path), prompt)]
    return _manifest_rows(path, prompt)


def output_columns(outputs: Sequence[str]) -> list[str]:
    """The output schema: image, prompt, one column per score, error."""
    return ["image", "prompt", *outputs, "error"]


class ResultWriter:
    """Writes results as they come (flushed per row); CSV columns: image, prompt, <outputs...>, error."""

    def __init__(self, target: Union[str, Path, IO[str]], outputs: Sequence[str], fmt: Optional[str] = None,
                 append: bool = False):
        self.outputs = tuple(outputs)
        if isinstance(target, (str, Path)) and str(target) != "-":
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fmt = fmt or output_format(path)
            self._fh: IO[str] = open(path, "a" if append else "w", encoding="utf-8", newline="")
            self._owned = True
        else:
            self.fmt = fmt or "csv"
            self._fh = sys.stdout if str(target) == "-" else target  # type: ignore[assignment]
            self._owned = False
        if self.fmt not in ("csv", "jsonl"):
            raise IPIQAError(f"unknown output format {self.fmt!r}; use csv or jsonl")
        self._csv = csv.writer(self._fh) if self.fmt == "csv" else None
        if self._csv and not append:
            self._csv.writerow(output_columns(self.outputs))
            self._fh.flush()

    def write(self, results: Iterable[Result]) -> None:
        for res in results:
            scores = res.scores or (None,) * len(self.outputs)
            if self._csv:
                fmt = ["" if s is None else repr(float(s)) for s in scores]
                self._csv.writerow([res.row.image, res.row.prompt or "", *fmt, res.error or ""])
            else:
                record = {"image": res.row.image, "prompt": res.row.prompt}
                record.update(dict(zip(self.outputs, scores)))
                record["error"] = res.error
                self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._owned:
            self._fh.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def output_format(path: Path) -> str:
    return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"


def resume_point(path: Path, rows: Sequence[Row], outputs: Sequence[str], fmt: Optional[str] = None) -> int:
    """How many leading ``rows`` the output already holds; cuts a half-written last record off the file.

    Outputs are written in input order, one record per row, so a killed run left a prefix of the
    input (and maybe one partial record). The prefix is checked row by row against the input.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    fmt = fmt or output_format(path)
    text = path.read_bytes().decode("utf-8", errors="strict")
    header = output_columns(outputs)
    complete: list[tuple[int, str]] = []  # (end offset in chars, image) of each complete record
    keep_min = 0  # what is kept even when no record is complete (the CSV header)
    if fmt == "jsonl":
        offset = 0
        for line in text.splitlines(keepends=True):
            offset += len(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith("\n") or not isinstance(record, dict) or "image" not in record:
                break
            complete.append((offset, record["image"]))
    else:
        lines = text.splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line))
        reader = csv.reader(iter(lines))
        first = next(reader, [])
        if first != header:
            raise IPIQAError(f"{path}: cannot resume: its columns {first} are not {header}; use another --output")
        keep_min = offsets[reader.line_num]
        try:
            for record in reader:
                end = offsets[reader.line_num]
                if len(record) != len(header) or not text[:end].endswith(("\n", "\r")):
                    break
                complete.append((end, record[0]))
        except csv.Error:
            pass
    done = len(complete)
    if done > len(rows):
        raise IPIQAError(f"{path}: holds {done} rows but the input has {len(rows)}; it is not this input's output")
    for i, (_, image) in enumerate(complete):
        if image != rows[i].image:
            raise IPIQAError(f"{path}: row {i + 1} is {image!r} but the input's row {i + 1} is {rows[i].image!r}; "
                             "resume needs the same input in the same order")
    keep = complete[-1][0] if complete else keep_min
    if keep < len(text):
        path.write_bytes(text[:keep].encode("utf-8"))  # drop the record the kill cut in half
    return done
