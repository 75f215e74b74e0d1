"""SRCC, PLCC (optionally after the field's 4-parameter logistic fit) and KRCC, as IQA papers report them.

The correlations themselves are ``ipiqa.metrics`` (numpy only, shared with the export parity gate); this
module adds what only evaluation needs: the logistic fit, which takes scipy (the ``train`` extra).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ipiqa._optional import require
from ipiqa.metrics import krcc, pearson, srcc

__all__ = ["srcc", "plcc", "krcc", "logistic4", "all_metrics"]


def plcc(pred: ArrayLike, mos: ArrayLike, fit: bool = False) -> float:
    """Pearson's r, after ``logistic4`` when ``fit`` (the usual IQA protocol for a non-linear scorer)."""
    pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
    return pearson(logistic4(pred, mos) if fit else pred, mos)


def logistic4(pred: np.ndarray, mos: np.ndarray) -> np.ndarray:
    """Map predictions through the fitted 4-parameter logistic used before PLCC in IQA evaluations.

    A fit that does not converge returns ``pred`` unchanged, so PLCC falls back to the plain value.
    """
    curve_fit = require("scipy.optimize", extra="train").curve_fit

    def f(x, b1, b2, b3, b4):
        return (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4))) + b2

    p0 = [mos.max(), mos.min(), float(np.mean(pred)), float(np.std(pred)) or 1.0]
    try:
        params, _ = curve_fit(f, pred, mos, p0=p0, maxfev=20000)
    except RuntimeError:
        return pred
    return f(pred, *params)


def all_metrics(pred: ArrayLike, mos: ArrayLike, fit: bool = False) -> dict[str, float]:
    """The three numbers a results table reports for one output."""
    return {"srcc": srcc(pred, mos), "plcc": plcc(pred, mos, fit), "krcc": krcc(pred, mos)}
