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

__all__ = ["Row", "Result", "IMAGE_SUFFIXES", "read_rows", "ResultWriter"]

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


class ResultWriter:
    """Writes results as they come (flushed per row); CSV columns: image, prompt, <outputs...>, error."""

    def __init__(self, target: Union[str, Path, IO[str]], outputs: Sequence[str], fmt: Optional[str] = None):
        self.outputs = tuple(outputs)
        if isinstance(target, (str, Path)) and str(target) != "-":
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fmt = fmt or ("jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv")
            self._fh: IO[str] = open(path, "w", encoding="utf-8", newline="")
            self._owned = True
        else:
            self.fmt = fmt or "csv"
            self._fh = sys.stdout if str(target) == "-" else target  # type: ignore[assignment]
            self._owned = False
        if self.fmt not in ("csv", "jsonl"):
            raise IPIQAError(f"unknown output format {self.fmt!r}; use csv or jsonl")
        self._csv = csv.writer(self._fh) if self.fmt == "csv" else None
        if self._csv:
            self._csv.writerow(["image", "prompt", *self.outputs, "error"])
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
