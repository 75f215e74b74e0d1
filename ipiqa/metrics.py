"""Rank and linear correlations (SRCC, KRCC, Pearson) in numpy alone.

They live here, below both ``ipiqa.training`` (which reports them as IQA papers do) and ``ipiqa.export``
(whose parity gate needs Spearman), so that neither package imports the other and an export-only install
needs neither torch nor scipy. The values equal ``scipy.stats`` (``spearmanr``, ``kendalltau`` tau-b,
``pearsonr``), ties included; ``tests/test_training.py`` checks that against scipy itself.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["rank", "pearson", "srcc", "krcc"]


def rank(x: ArrayLike) -> np.ndarray:
    """Average ranks from 0 (ties share the mean of their positions), as Spearman's rho needs."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def pearson(pred: ArrayLike, mos: ArrayLike) -> float:
    """Pearson's r; NaN when either side is constant (no correlation is defined, and 0 would be a claim)."""
    pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
    p, m = pred - pred.mean(), mos - mos.mean()
    denom = np.sqrt((p * p).sum() * (m * m).sum())
    return float((p * m).sum() / denom) if denom else float("nan")


def srcc(pred: ArrayLike, mos: ArrayLike) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(rank(pred), rank(mos))


def krcc(pred: ArrayLike, mos: ArrayLike) -> float:
    """Kendall's tau-b (tie-corrected), as scipy.stats.kendalltau computes it; O(n^2) memory, fine for IQA sets."""
    x, y = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    concordant = float((dx * dy).sum())
    denom = np.sqrt(float((dx != 0).sum()) * float((dy != 0).sum()))
    return concordant / denom if denom else float("nan")
