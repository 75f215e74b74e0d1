"""The measures gates share beyond ``max |d|``: per-row cosine of intermediate tensors, and whether a
reference spreads enough (scores, embeddings) for a rank or cosine criterion to mean anything.

The FP16 gate, the INT8 gates (CPU graph and engines) and the engine gate all judge through these, so a
criterion is computed one way whichever graph set is judged. Torch-free.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .checks import CosineResult
from .parity import FP16_ATOL

__all__ = ["SPREAD_MIN", "EMBEDDING_SPREAD_MIN", "cosine_result", "embedding_spread", "with_spread_note",
           "scores_spread"]

# Scores spread when a column's range over the gate inputs is this many times the FP16 bound: only then
# does the rank order carry information that rounding noise cannot reshuffle (an untrained model's
# scores sit within a few 1e-2 of each other).
SPREAD_MIN = 25 * FP16_ATOL
# Embeddings whose mean cosine to their own mean over the gate inputs is above 1 - this barely depend on
# the input (the untrained demo model: 1 - 7.8e-6 on RN50-512). Any output near that mean then has a
# cosine near 1, a broken graph's included, and the result says so.
EMBEDDING_SPREAD_MIN = 1e-3

def cosine_result(name: str, ref: np.ndarray, out: np.ndarray, bound: float) -> CosineResult:
    """Row-wise cosine (each row flattened); NaN or inf anywhere fails."""
    a = np.asarray(ref, np.float64).reshape(len(ref), -1)
    b = np.asarray(out, np.float64).reshape(len(out), -1)
    if a.shape != b.shape or not np.all(np.isfinite(b)):
        return CosineResult(name, float("nan"), bound, float("inf"))
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return CosineResult(name, float(((a * b).sum(1) / norms).min()), bound, float(np.abs(a - b).max()))


def embedding_spread(embeddings: np.ndarray) -> float:
    """Mean of 1 - cosine(embedding, mean embedding): 0 when every image gets the same embedding."""
    e = np.asarray(embeddings, np.float64).reshape(len(embeddings), -1)
    mean = e.mean(0)
    cos = e @ mean / np.maximum(np.linalg.norm(e, axis=1) * np.linalg.norm(mean), 1e-30)
    return float(np.mean(1.0 - cos))


def with_spread_note(result: CosineResult, ref: np.ndarray) -> CosineResult:
    """``result`` with a note when the reference embeddings barely depend on the input."""
    spread = embedding_spread(ref)
    if spread >= EMBEDDING_SPREAD_MIN:
        return result
    return replace(result, note=f"embeddings barely depend on the input (spread {spread:.1e}; untrained model?): "
                                "this cosine cannot tell a good graph from a bad one")


def scores_spread(ref: np.ndarray) -> np.ndarray:
    """Per score column: does the reference spread enough (``SPREAD_MIN``) for its rank order to mean anything?"""
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    return np.ptp(ref, axis=0) >= SPREAD_MIN
