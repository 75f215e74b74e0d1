"""Batch scoring loop shared by every backend: decode in a pool, score in batches, never drop a row.

Rows stream through: at most ``depth`` batches are decoded ahead of inference, so memory is bounded by
the batch size and the pool, never by the job. Per-row decisions (missing prompt, bad image, non-finite
score) are ``runtime.rows``'s; this module only moves rows.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np
from PIL import Image

from ipiqa.errors import IPIQAError
from ipiqa.preprocess import decode_bytes, load_resized, resized

from .rows import Result, Row, finish, image_bytes, image_file, load_pixels, row_error, scoring_failed

__all__ = ["BatchScorer", "DeviceDecode", "score_batch", "RunSummary", "score_rows", "iter_results", "load_input",
           "decode_row", "input_pixels"]
log = logging.getLogger(__name__)

# What ``BatchScorer.score_arrays`` takes for one image file, the one place that decides it: uint8 (R, R, 3),
# decoded and exactly resized; the image graph normalizes on the device.
load_input: Callable[[str, int], np.ndarray] = load_resized


# Paths -> (uint8 (k, R, R, 3) pixels on the device, one error text or None per path): a backend that decodes
# on its device (the torch backend on CUDA: nvJPEG + exact resize) instead of the host's decode threads.
DeviceDecode = Callable[[list[str]], tuple[Any, list[Optional[str]]]]


class BatchScorer(Protocol):
    """What the pipeline needs of a backend."""

    resolution: int
    needs_prompt: bool

    def score_arrays(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """uint8 (B, R, R, 3) images (``load_input``'s) + B prompts -> (B, N) float scores."""


@dataclass(frozen=True)
class RunSummary:
    rows: int = 0  # rows written by this run
    errors: int = 0  # of which error rows
    skipped: int = 0  # rows already in the output (resume)
    seconds: float = 0.0
    stopped: bool = False  # fail-fast ended the run early


def _fast_input(path: str, resolution: int) -> np.ndarray:
    return load_resized(path, resolution, fast=True)


def input_pixels(image: Any, resolution: int) -> np.ndarray:
    """A Python API image (PIL image, decoded uint8 array, or path) as ``score_arrays`` takes it."""
    if isinstance(image, np.ndarray):
        expected = (resolution, resolution, 3)
        if image.shape != expected or image.dtype != np.uint8:
            raise IPIQAError(f"array of shape {image.shape} {image.dtype}, expected uint8 {expected} (decoded and "
                             "resized, as ipiqa.preprocess.load_resized returns)")
        return image
    if isinstance(image, Image.Image):
        return resized(image, resolution)
    return load_input(str(image), resolution)


def decode_row(row: Row, resolution: int, needs_prompt: bool,
               fast: bool = False) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(pixels, None) or (None, error) for one row, by the row rules; ``fast``: the opt-in inexact decode.
    The image is the row's file or its encoded bytes as ``rows.image_file`` / ``rows.image_bytes`` say (a shard
    member, a Parquet cell, a manifest row naming either); bytes decode with a file's rules and errors, named by
    the row's label (``fast`` applies to files). A Python API image (PIL, decoded array) is taken as it is."""
    if isinstance(row.source, (np.ndarray, Image.Image)):
        return load_pixels(row, resolution, needs_prompt, lambda _label, r: input_pixels(row.source, r))
    path = image_file(row)
    if path is None:
        return load_pixels(row, resolution, needs_prompt,
                           lambda label, r: resized(decode_bytes(image_bytes(row), label), r))
    loader = _fast_input if fast else load_input
    return load_pixels(row, resolution, needs_prompt, lambda _label, r: loader(path, r))


def _chunks(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def score_batch(scorer: BatchScorer, rows: list[Row], decoded: list,
                device_decode: Optional[DeviceDecode] = None) -> list[Result]:
    """One batch's results, in row order: rows whose ``decoded`` (pixels, error) pair has pixels are scored
    together; a backend failure becomes every such row's error. Shared by file runs and ``Scorer.score``."""
    if device_decode is not None:  # rows still open are decoded together on the device
        for i, (_, err) in enumerate(decoded):
            if err is None and image_file(rows[i]) is None:
                decoded[i] = (None, f"{rows[i].image}: --decode device reads image files; this row's image is "
                                    "encoded bytes (a shard member or Parquet cell): use --decode host")
        todo = [i for i, (_, err) in enumerate(decoded) if err is None]
        try:
            pixels, errors = device_decode([image_file(rows[i]) for i in todo]) if todo else (None, [])
        except Exception as exc:  # noqa: BLE001 - a device failure marks this batch's rows, the run goes on
            log.error("device decode failed: %s", exc)
            for i in todo:
                decoded[i] = (None, scoring_failed(exc))
            todo = []
        if todo:
            keep = [k for k, e in enumerate(errors) if e is None]
            for k, e in enumerate(errors):
                if e is not None:
                    decoded[todo[k]] = (None, e)
            ok, batch = [todo[k] for k in keep], pixels[keep] if len(keep) < len(todo) else pixels
        else:
            ok, batch = [], None
    else:
        ok = [i for i, (pixels, _) in enumerate(decoded) if pixels is not None]
        batch = np.stack([decoded[i][0] for i in ok]) if ok else None
    scores: dict[int, np.ndarray] = {}
    batch_error = None
    if ok:
        try:
            out = np.asarray(scorer.score_arrays(batch, [rows[i].prompt or "" for i in ok]))
            if out.ndim != 2 or out.shape[0] != len(ok):
                raise IPIQAError(f"backend returned shape {out.shape} for {len(ok)} images")
            scores = dict(zip(ok, out))
        except Exception as exc:  # noqa: BLE001 - recorded per row, counted, exit status says so
            log.error("batch failed: %s", exc)
            batch_error = scoring_failed(exc)
    return [finish(row, scores.get(i), err if err is not None else batch_error)
            for i, (row, (_, err)) in enumerate(zip(rows, decoded))]


def iter_results(
    rows: Iterable[Row],
    scorer: BatchScorer,
    batch_size: int = 8,
    workers: int = 4,
    depth: int = 2,
    device_decode: Optional[DeviceDecode] = None,
    fast: bool = False,
) -> Iterator[list[Result]]:
    """Each batch's results, in input order, as they finish: the loop every run (files, ``Scorer.score``) uses.

    ``workers`` threads decode up to ``depth`` batches ahead of inference (Pillow releases the GIL while
    decoding and resizing), so memory is bounded by ``batch_size x depth`` rows whatever the input's length.
    ``device_decode``: the host only applies the row rules and the device decodes each batch. Closing the
    iterator early (fail-fast, a consumer that stops) drops the decoded-ahead rows.
    """
    if batch_size < 1:
        raise IPIQAError(f"batch size must be >= 1, got {batch_size}")
    resolution, needs_prompt = scorer.resolution, scorer.needs_prompt

    def decode(row: Row):
        return decode_row(row, resolution, needs_prompt, fast)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque[tuple[list[Row], list]] = deque()

        def submit(chunk: list[Row]) -> None:  # rows already known to be errors cost no pool round trip
            jobs: list = []
            for row in chunk:
                err = row_error(row, needs_prompt)
                if err is not None or device_decode is not None:
                    jobs.append((None, err))
                else:
                    jobs.append(pool.submit(decode, row))
            pending.append((chunk, jobs))

        def drain() -> list[Result]:
            chunk, jobs = pending.popleft()
            return score_batch(scorer, chunk, [j.result() if isinstance(j, Future) else j for j in jobs], device_decode)

        try:
            for chunk in _chunks(rows, batch_size):
                submit(chunk)
                if len(pending) > depth:
                    yield drain()
            while pending:
                yield drain()
        finally:
            for _, jobs in pending:  # stopped early: decoded-ahead rows are dropped, not written
                for j in jobs:
                    if isinstance(j, Future):
                        j.cancel()


def score_rows(
    rows: Iterable[Row],
    scorer: BatchScorer,
    batch_size: int = 8,
    workers: int = 4,
    on_results: Callable[[list[Result]], None] = lambda results: None,
    fail_fast: bool = False,
    depth: int = 2,
    device_decode: Optional[DeviceDecode] = None,
    fast: bool = False,
) -> RunSummary:
    """Score every row in order (``iter_results``); ``on_results`` gets each batch's results as they finish.

    ``fail_fast`` stops after the first batch with an error row.
    """
    n = errors = 0
    stopped = False
    batches = iter_results(rows, scorer, batch_size, workers, depth, device_decode, fast)
    try:
        for results in batches:
            n, errors = n + len(results), errors + sum(r.error is not None for r in results)
            on_results(results)
            if fail_fast and errors:
                stopped = True
                break
    finally:
        batches.close()
    return RunSummary(rows=n, errors=errors, stopped=stopped)
