"""Label files of AGIQA-1k, AGIQA-3k, AIGCQA-20k (and a generic CSV) as samples, plus the torch Dataset.

Prompts and targets are read the way the authors read them (see official-ipiqa-checkpoint.md): AGIQA-3k
uses the ``prompt`` column as is with ``mos_quality`` and ``mos_align``; AGIQA-1k takes ``Image``,
``Prompt``, ``MOS`` from ``AIGC_MOS_Zscore.xlsx``; AIGCQA-20k has ``name``, ``prompt``, ``mos``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ipiqa.errors import IPIQAError
from ipiqa.runtime.io.sources import csv_manifest, manifest_lines

__all__ = ["Sample", "DATASETS", "load_samples", "check_images", "ImageScoreDataset"]

DATASETS = {
    "agiqa-1k": ("AIGC_MOS_Zscore.xlsx", ("quality",)),
    "agiqa-3k": ("data.csv", ("quality", "alignment")),
    "aigcqa-20k": ("info_train.csv", ("quality",)),
}


@dataclass(frozen=True)
class Sample:
    image: str  # file name relative to the image folder (or absolute)
    prompt: str
    targets: tuple[float, ...]


def _regular(path: Path) -> None:
    """Label files are read whole: a FIFO would block, a device must not be opened."""
    import stat

    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise IPIQAError(f"{path}: not a regular file; --labels takes the dataset's label file (or its folder)")


def _csv_rows(path: Path) -> list[dict]:
    """Read by the runtime's manifest rules (BOM, CSV or TSV by suffix, stripped headers), strictly UTF-8."""
    _regular(path)
    lines = manifest_lines(path, errors="strict")
    try:
        return [{(k or "").strip(): v for k, v in row.items()} for row in csv_manifest(path, lines)]
    except UnicodeDecodeError:
        raise IPIQAError(f"{path}: not UTF-8 text; label CSVs are UTF-8 (re-save the file as UTF-8 CSV)") from None
    except csv.Error as exc:
        raise IPIQAError(f"{path}: not a readable CSV ({exc})") from None
    finally:
        lines.close()


def _xlsx_rows(path: Path) -> list[dict]:
    from ipiqa._optional import require

    openpyxl = require("openpyxl", extra="train")
    _regular(path)
    import zipfile

    from openpyxl.utils.exceptions import InvalidFileException

    try:
        sheet = openpyxl.load_workbook(path, read_only=True, data_only=True).worksheets[0]
        rows = list(sheet.iter_rows(values_only=True))
    except (InvalidFileException, zipfile.BadZipFile, OSError, KeyError, ValueError, IndexError) as exc:
        raise IPIQAError(f"{path}: not a readable .xlsx workbook ({exc}); agiqa-1k's labels are "
                         "AIGC_MOS_Zscore.xlsx as published") from None
    if not rows:
        return []
    header = [str(h).strip() for h in rows[0]]
    return [dict(zip(header, r)) for r in rows[1:] if any(v is not None for v in r)]


def _score(row: dict, column: str, path: Path, line: int) -> float:
    """A label cell as a number; a blank or non-number is an error naming the file, row and column."""
    import math

    value = row.get(column)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise IPIQAError(f"{path}: row {line}: {column}={value!r} is not a number; every label row needs its score")
    return number


def _need(rows: list[dict], columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing or not rows:
        raise IPIQAError(f"{path}: missing column(s) {missing or list(columns)}; found {sorted(rows[0]) if rows else []}")


def load_samples(dataset: str, labels: Path) -> tuple[list[Sample], tuple[str, ...]]:
    """Samples of a named dataset (``labels`` = its folder) or of a generic CSV ``image,prompt,score[,score2]``."""
    labels = Path(labels)
    if dataset == "csv":
        rows = _csv_rows(labels)
        _need(rows, ("image", "prompt", "score"), labels)
        two = "score2" in rows[0]
        return [Sample(r["image"], r["prompt"] or "", (_score(r, "score", labels, i),) + ((_score(r, "score2", labels, i),)
                       if two else ())) for i, r in enumerate(rows, 2)], ("quality", "alignment") if two else ("quality",)
    if dataset not in DATASETS:
        raise IPIQAError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)} or 'csv'")
    file, outputs = DATASETS[dataset]
    path = labels / file if labels.is_dir() else labels
    if not path.is_file():
        raise IPIQAError(f"{path}: label file not found (expected {file} of {dataset})")
    if dataset == "agiqa-1k":
        rows = _xlsx_rows(path)
        _need(rows, ("Image", "Prompt", "MOS"), path)
        samples = [Sample(str(r["Image"]), str(r["Prompt"] or ""), (_score(r, "MOS", path, i),))
                   for i, r in enumerate(rows, 2)]
    elif dataset == "agiqa-3k":
        rows = _csv_rows(path)
        _need(rows, ("name", "prompt", "mos_quality", "mos_align"), path)
        samples = [Sample(r["name"], r["prompt"], (_score(r, "mos_quality", path, i), _score(r, "mos_align", path, i)))
                   for i, r in enumerate(rows, 2)]
    else:
        rows = _csv_rows(path)
        _need(rows, ("name", "prompt", "mos"), path)
        samples = [Sample(r["name"], r["prompt"], (_score(r, "mos", path, i),)) for i, r in enumerate(rows, 2)]
    return samples, outputs


def check_images(samples: Sequence[Sample], images: Path, skip_missing: bool = False) -> list[Sample]:
    """Samples whose image exists under ``images``; missing ones are an error listing the first few."""
    missing = [s for s in samples if not (Path(images) / s.image).is_file()]
    if missing and not skip_missing:
        first = ", ".join(s.image for s in missing[:5])
        raise IPIQAError(f"{images}: {len(missing)} of {len(samples)} images missing (first: {first}); point --images "
                         "at the dataset's image folder, or pass --skip-missing to train without them")
    gone = {id(s) for s in missing}
    return [s for s in samples if id(s) not in gone]


class ImageScoreDataset:
    """(image tensor, token ids, targets) with the authors' training augmentation: random horizontal flip."""

    def __init__(self, samples: Sequence[Sample], images: Path, resolution: int, train: bool,
                 context_length: int = 77, seed: int = 0, targets: Optional[int] = None):
        import torch

        from ipiqa.model import tokenize

        self.samples, self.images, self.resolution, self.train = list(samples), Path(images), resolution, train
        self.tokens = tokenize([s.prompt for s in self.samples], context_length) if self.samples else None
        self.rng = np.random.default_rng(seed)
        self.torch = torch
        self.n_targets = targets

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from ipiqa.preprocess import load_image, preprocess

        img = load_image(self.images / self.samples[i].image)
        if self.train and self.rng.random() < 0.5:
            img = img.transpose(0)  # Image.FLIP_LEFT_RIGHT
        x = self.torch.from_numpy(preprocess(img, self.resolution))
        y = self.torch.tensor(self.samples[i].targets[: self.n_targets], dtype=self.torch.float32)
        return x, self.tokens[i], y
