"""Batch scoring loop shared by every backend: decode in a thread pool, score in batches, never drop a row.

A row whose image cannot be read, or whose prompt is missing, becomes an error row; the batch goes on
without it. A backend failure on one batch marks that batch's rows with the error and the run goes on.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, Sequence

import numpy as np

from ipiqa.errors import IPIQAError
from ipiqa.preprocess import preprocess_file

from .io import Result, Row

__all__ = ["BatchScorer", "RunSummary", "score_rows"]
log = logging.getLogger(__name__)


class BatchScorer(Protocol):
    """What the pipeline needs of a backend."""

    resolution: int
    needs_prompt: bool

    def score_arrays(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """(B, 3, R, R) float32 normalized images + B prompts -> (B, N) float scores."""


@dataclass
class RunSummary:
    rows: int = 0
    errors: int = 0
    skipped: int = 0  # rows already in the output (resume)
    seconds: float = 0.0
    stopped: bool = False  # fail-fast ended the run early


def _prepare(row: Row, resolution: int, needs_prompt: bool) -> tuple[Row, Optional[np.ndarray], Optional[str]]:
    if needs_prompt and row.prompt is None:
        return row, None, "missing prompt: IP-IQA scores an image against its prompt; fill the prompt cell"
    if not row.image:
        return row, None, "missing image path"
    try:
        return row, preprocess_file(row.image, resolution), None
    except IPIQAError as exc:
        return row, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the run
        return row, None, f"{row.image}: {type(exc).__name__}: {exc}"


def _prefetched(pool: ThreadPoolExecutor, rows: Sequence[Row], work: Callable, depth: int) -> Iterator:
    """Results of ``work(row)`` in order, with at most ``depth`` rows decoded ahead (bounded memory)."""
    pending: deque = deque()
    for row in rows:
        pending.append(pool.submit(work, row))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(prepared: Iterator, batch_size: int) -> Iterator[list]:
    batch: list = []
    for item in prepared:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_rows(
    rows: Sequence[Row],
    scorer: BatchScorer,
    batch_size: int = 8,
    workers: int = 4,
    on_results: Callable[[list[Result]], None] = lambda results: None,
    fail_fast: bool = False,
) -> RunSummary:
    """Score every row in order; ``on_results`` gets each batch's results (in input order) as they finish.

    Decoding runs ``workers`` threads ahead of inference (PIL releases the GIL while decoding and
    resizing), at most two batches deep. ``fail_fast`` stops after the first batch with an error row.
    """
    if batch_size < 1:
        raise IPIQAError(f"batch size must be >= 1, got {batch_size}")
    summary = RunSummary()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        work = lambda r: _prepare(r, scorer.resolution, scorer.needs_prompt)  # noqa: E731
        for batch in _batches(_prefetched(pool, rows, work, 2 * batch_size + workers), batch_size):
            ok = [i for i, (_, _, err) in enumerate(batch) if err is None]
            scores: dict[int, tuple[float, ...]] = {}
            batch_error = None
            if ok:
                try:
                    out = np.asarray(scorer.score_arrays(np.stack([batch[i][1] for i in ok]), [batch[i][0].prompt or "" for i in ok]))
                    if out.ndim != 2 or out.shape[0] != len(ok):
                        raise IPIQAError(f"backend returned shape {out.shape} for {len(ok)} images")
                    scores = {i: tuple(float(v) for v in s) for i, s in zip(ok, out)}
                except Exception as exc:  # noqa: BLE001 - recorded per row, counted, exit status says so
                    log.error("batch failed: %s", exc)
                    batch_error = f"scoring failed: {type(exc).__name__}: {exc}"
            results = []
            for i, (row, _, err) in enumerate(batch):
                s = scores.get(i)
                if err is None and s is None:
                    err = batch_error
                elif s is not None and not all(np.isfinite(s)):
                    s, err = None, f"non-finite score {s}: the model produced NaN/inf for this input"
                results.append(Result(row, scores=s, error=err))
            summary.rows += len(results)
            summary.errors += sum(r.error is not None for r in results)
            on_results(results)
            if fail_fast and summary.errors:
                summary.stopped = True
                break
    return summary
