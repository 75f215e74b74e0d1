"""``ipiqa serve``'s inference callable: a batch of Triton requests in, one answer per request out, in order.

Every row goes through the runtime's own rules (``contract.request_rows`` reads the request, ``pipeline.decode_row``
decodes the encoded bytes, ``pipeline.score_batch`` scores the batch), so a served row equals the local CLI's and
one bad row is only its own request's ERROR.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from ..pipeline import decode_row, score_batch
from ..rows import Result
from .contract import ERROR, IMAGE, PROMPT, SCORES, request_rows

__all__ = ["RequestHandler"]


class RequestHandler:
    """PyTriton's inference callable for model ``ipiqa``; ``workers`` threads decode the images."""

    def __init__(self, scorer: Any, workers: int = 4):
        self.scorer = scorer
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ipiqa-decode")

    def results(self, requests: Sequence[Any]) -> list[list[Result]]:
        """Each request's rows' results: decoded in the pool, the batch's good rows scored in one backend call."""
        per_request = [request_rows(r[IMAGE], r[PROMPT]) for r in requests]
        rows = [row for group in per_request for row in group]
        res, needs_prompt = self.scorer.resolution, self.scorer.needs_prompt
        decoded = list(self.pool.map(lambda row: decode_row(row, res, needs_prompt), rows))
        flat = score_batch(self.scorer, rows, decoded) if rows else []
        out, start = [], 0
        for group in per_request:
            out.append(flat[start:start + len(group)])
            start += len(group)
        return out

    def __call__(self, requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        n = len(self.scorer.outputs)
        answers = []
        for results in self.results(requests):
            scores = np.full((len(results), n), np.nan, dtype=np.float32)
            errors = np.empty((len(results), 1), dtype=object)
            for i, r in enumerate(results):
                if r.scores is not None:
                    scores[i] = r.scores
                errors[i, 0] = (r.error or "").encode("utf-8", "backslashreplace")
            answers.append({SCORES: scores, ERROR: errors})
        return answers

    def close(self) -> None:
        self.pool.shutdown(wait=True)
