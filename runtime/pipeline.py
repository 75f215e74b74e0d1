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
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np

from ipiqa.errors import IPIQAError
from ipiqa.preprocess import load_resized

from .rows import Result, Row, finish, load_pixels, row_error, scoring_failed

__all__ = ["BatchScorer", "RunSummary", "score_rows", "load_input", "decode_row"]
log = logging.getLogger(__name__)

# What ``BatchScorer.score_arrays`` takes for one image file, the one place that decides it: uint8 (R, R, 3),
# decoded and exactly resized; the image graph normalizes on the device.
load_input: Callable[[str, int], np.ndarray] = load_resized


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


def decode_row(row: Row, resolution: int, needs_prompt: bool) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(pixels, None) or (None, error) for one row, by the row rules."""
    return load_pixels(row, resolution, needs_prompt, load_input)


def _chunks(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def _score_batch(scorer: BatchScorer, rows: list[Row], decoded: list) -> list[Result]:
    ok = [i for i, (pixels, _) in enumerate(decoded) if pixels is not None]
    scores: dict[int, np.ndarray] = {}
    batch_error = None
    if ok:
        try:
            out = np.asarray(scorer.score_arrays(np.stack([decoded[i][0] for i in ok]), [rows[i].prompt or "" for i in ok]))
            if out.ndim != 2 or out.shape[0] != len(ok):
                raise IPIQAError(f"backend returned shape {out.shape} for {len(ok)} images")
            scores = dict(zip(ok, out))
        except Exception as exc:  # noqa: BLE001 - recorded per row, counted, exit status says so
            log.error("batch failed: %s", exc)
            batch_error = scoring_failed(exc)
    return [finish(row, scores.get(i), err if err is not None else batch_error)
            for i, (row, (_, err)) in enumerate(zip(rows, decoded))]


def score_rows(
    rows: Iterable[Row],
    scorer: BatchScorer,
    batch_size: int = 8,
    workers: int = 4,
    on_results: Callable[[list[Result]], None] = lambda results: None,
    fail_fast: bool = False,
    depth: int = 2,
) -> RunSummary:
    """Score every row in order; ``on_results`` gets each batch's results (in input order) as they finish.

    ``workers`` threads decode up to ``depth`` batches ahead of inference (Pillow releases the GIL while
    decoding and resizing). ``fail_fast`` stops after the first batch with an error row.
    """
    if batch_size < 1:
        raise IPIQAError(f"batch size must be >= 1, got {batch_size}")
    n = errors = 0
    stopped = False
    resolution, needs_prompt = scorer.resolution, scorer.needs_prompt

    def decode(row: Row):
        return decode_row(row, resolution, needs_prompt)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque[tuple[list[Row], list]] = deque()

        def submit(chunk: list[Row]) -> None:  # rows already known to be errors cost no pool round trip
            jobs: list = []
            for row in chunk:
                err = row_error(row, needs_prompt)
                jobs.append((None, err) if err is not None else pool.submit(decode, row))
            pending.append((chunk, jobs))

        def drain() -> list[Result]:
            chunk, jobs = pending.popleft()
            return _score_batch(scorer, chunk, [j.result() if isinstance(j, Future) else j for j in jobs])

        chunks = _chunks(rows, batch_size)
        for chunk in chunks:
            submit(chunk)
            if len(pending) <= depth:
                continue
            results = drain()
            n, errors = n + len(results), errors + sum(r.error is not None for r in results)
            on_results(results)
            if fail_fast and errors:
                stopped = True
                break
        while pending and not stopped:
            results = drain()
            n, errors = n + len(results), errors + sum(r.error is not None for r in results)
            on_results(results)
            if fail_fast and errors:
                stopped = True
        for _, jobs in pending:  # fail-fast: decoded-ahead rows are dropped, not written
            for j in jobs:
                if isinstance(j, Future):
                    j.cancel()
    return RunSummary(rows=n, errors=errors, stopped=stopped)
