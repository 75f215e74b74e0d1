"""The user's calibration images: split once into calibration and held-out images (the INT8 gates judge the
held-out ones, never calibrated on), decoded and resized exactly as scoring will (the runtime's ``load_input``).

``--calibration`` takes whatever ``--images`` takes, through the same ``RowSource``: a folder, a manifest (its
rows may name shard samples or Parquet rows), tar shards, Parquet files, list files and patterns. The split holds
one name per distinct image, never its bytes: a file's path, or for an image inside a shard or Parquet file its
label (``SHARD::KEY``, ``FILE::ROW``), which ``io.references`` reads back in one streamed pass when the picked
images are decoded (so shards are read twice: once to list, once for the picks).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ipiqa.errors import IPIQAError
from ipiqa.runtime.io import IMAGE_SUFFIXES, Row, RowSource
from ipiqa.runtime.io.inputs import split_reference
from ipiqa.runtime.io.references import resolve_references
from ipiqa.runtime.pipeline import decode_row, load_input
from ipiqa.runtime.rows import image_file

__all__ = ["image_input", "image_rows", "CalibrationSplit", "split_calibration", "held_out_images",
           "calibration_batches", "calibration_fingerprint"]
log = logging.getLogger(__name__)

def image_input(path: Union[str, Path], resolution: int) -> np.ndarray:
    """One file as the image graph takes it: uint8 (R, R, 3), decoded and exactly resized (the runtime's own
    ``load_input``), so calibration sees what scoring will."""
    return load_input(str(path), resolution)


def image_rows(source: Union[str, Path]) -> list[tuple[Path, Optional[str]]]:
    """(image, prompt) pairs read as scoring reads them (``RowSource``): a manifest's ``image`` column (relative
    to its folder) with its ``prompt`` column where it has one (else None), a folder's images, sorted, without
    prompts, or the samples of shards and rows of Parquet files (named by their labels, with their own prompts).
    Rows without an image, or unreadable lines, are skipped with a warning."""
    rows = RowSource(source)
    out = []
    for row in rows:
        if row.error is not None or not row.image.strip():
            log.warning("calibration: row skipped: %s", row.error or "no image")
            continue
        name = image_file(row) or row.image  # a file, else the label a shard member / Parquet cell is read back by
        out.append((Path(name), (row.prompt or "") if rows.has_prompt_column else None))
    if not out:
        raise IPIQAError(f"{source}: no calibration images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return out


@dataclass(frozen=True)
class CalibrationSplit:
    """The user's images split once: calibration, and held-out images the gate judges (never calibrated on)."""

    calibration: tuple[Path, ...]
    held_out: tuple[Path, ...]
    prompts: Optional[tuple[str, ...]]  # the held-out images' prompts from a CSV's prompt column; None: none given


HELD_OUT_MIN, HELD_OUT_MAX, HELD_OUT_SHARE = 4, 32, 5  # held out: 1 in 5 of the images, at least 4, at most 32


def split_calibration(source: Union[str, Path], held_out: Optional[int] = None) -> CalibrationSplit:
    """Hold out ``held_out`` images (default: 1 in 5, 4 to 32), evenly spread over the list; calibrate on the rest.

    A file listed twice (one image, several prompts) is held out or calibrated on as a whole, so no held-out
    image is ever in the calibration set.
    """
    rows = image_rows(source)
    first: dict[Path, Optional[str]] = {}
    for path, prompt in rows:
        first.setdefault(path, prompt)
    files = list(first)
    n = held_out if held_out is not None else min(HELD_OUT_MAX, max(HELD_OUT_MIN, len(files) // HELD_OUT_SHARE))
    if n < 1 or len(files) < n + 1:
        raise IPIQAError(f"{source}: {len(files)} distinct images; the INT8 gate holds out {n} and calibrates on the "
                         f"rest: give at least {n + 1} (a few hundred like those you will score is better)")
    picks = set(np.linspace(0, len(files) - 1, n).round().astype(int).tolist())
    held = tuple(files[i] for i in sorted(picks))
    prompts = tuple(first[p] or "" for p in held) if any(pr is not None for pr in first.values()) else None
    return CalibrationSplit(tuple(f for i, f in enumerate(files) if i not in picks), held, prompts)


def _decoded(names: Sequence[Path], resolution: int) -> Iterator[tuple[int, Optional[np.ndarray], Optional[str]]]:
    """(position, pixels or None, error) for each name, in order: files decoded as scoring decodes them, labels of
    shard members and Parquet rows read back through ``io.references`` (each file streamed once per call)."""
    rows = resolve_references(Row(str(p), None) for p in names)
    for k, row in enumerate(rows):
        pixels, error = decode_row(row, resolution, needs_prompt=False)
        yield k, pixels, error


def calibration_fingerprint(split: CalibrationSplit) -> list[tuple[str, str]]:
    """(name, SHA-256) of every file the split reads: the image files, and once each the shards and Parquet files
    its labels point into, so a re-export reuses an INT8 graph only when none of them changed."""
    from ipiqa.bundle import sha256_file

    files: dict[str, Path] = {}
    for p in split.calibration + split.held_out:
        ref = split_reference(str(p))
        f = ref[0] if ref is not None else p
        files.setdefault(str(f), f)
    return [(name, sha256_file(f)) for name, f in files.items() if f.is_file()]


def held_out_images(split: CalibrationSplit, resolution: int) -> tuple[np.ndarray, Optional[list[str]]]:
    """The held-out images as the image graph takes them (unreadable ones skipped with a warning), with
    their prompts when the split has them."""
    images, prompts = [], []
    for k, pixels, error in _decoded(split.held_out, resolution):
        if pixels is None:
            log.warning("INT8 gate: held-out image skipped: %s (%s)", split.held_out[k], error)
            continue
        images.append(pixels)
        prompts.append(split.prompts[k] if split.prompts is not None else "")
    if len(images) < 2:
        raise IPIQAError(f"only {len(images)} of {len(split.held_out)} held-out images could be read; the INT8 gate "
                         "needs at least 2: check the calibration files")
    return np.stack(images), (prompts if split.prompts is not None else None)


def calibration_batches(files: Sequence[Path], resolution: int, size: int, batch: int = 8) -> Iterator[np.ndarray]:
    """Up to ``size`` files, evenly spread over the list, preprocessed exactly as at scoring time.

    Unreadable files are skipped with a warning: one bad file should not stop an export.
    """
    picks = [files[int(i)] for i in np.linspace(0, len(files) - 1, min(size, len(files)))] if files else []
    picks = list(dict.fromkeys(picks))
    chunk: list[np.ndarray] = []
    for k, pixels, error in _decoded(picks, resolution):
        if pixels is None:
            log.warning("calibration: skipped %s (%s)", picks[k], error)
            continue
        chunk.append(pixels)
        if len(chunk) == batch:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)
