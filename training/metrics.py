"""SRCC, PLCC (optionally after the field's 4-parameter logistic fit) and KRCC, as IQA papers report them."""
from __future__ import annotations

import numpy as np

__all__ = ["srcc", "plcc", "krcc", "logistic4", "all_metrics"]


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def plcc(pred, mos, fit: bool = False) -> float:
    pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
    if fit:
        pred = logistic4(pred, mos)
    p, m = pred - pred.mean(), mos - mos.mean()
    denom = np.sqrt((p * p).sum() * (m * m).sum())
    return float((p * m).sum() / denom) if denom else float("nan")


def srcc(pred, mos) -> float:
    return plcc(_rank(np.asarray(pred, np.float64)), _rank(np.asarray(mos, np.float64)))


def krcc(pred, mos) -> float:
    """Kendall's tau-b (tie-corrected), as scipy.stats.kendalltau computes it."""
    x, y = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    concordant = float((dx * dy).sum())
    denom = np.sqrt(float((dx != 0).sum()) * float((dy != 0).sum()))
    return concordant / denom if denom else float("nan")


def logistic4(pred: np.ndarray, mos: np.ndarray) -> np.ndarray:
    """Map predictions through the fitted 4-parameter logistic used before PLCC in IQA evaluations."""
    from scipy.optimize import curve_fit

    def f(x, b1, b2, b3, b4):
        return (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4))) + b2

    p0 = [mos.max(), mos.min(), float(np.mean(pred)), float(np.std(pred)) or 1.0]
    try:
        params, _ = curve_fit(f, pred, mos, p0=p0, maxfev=20000)
    except RuntimeError:
        return pred
    return f(pred, *params)


def all_metrics(pred, mos, fit: bool = False) -> dict[str, float]:
    return {"srcc": srcc(pred, mos), "plcc": plcc(pred, mos, fit), "krcc": krcc(pred, mos)}
