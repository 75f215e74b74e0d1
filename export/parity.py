"""Parity of exported graphs against the PyTorch reference, as objects that say whether they passed.

FP32 graphs: max abs diff <= 1e-4, relative to the reference's scale (``max(1, score range)`` for
scores, ``max(1, max |ref|)`` for intermediate tensors). FP16 engines: <= 2e-2 absolute on MOS-scale
scores and Spearman >= 0.999 over 64 generated inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ipiqa.training.metrics import srcc as spearman  # one rank implementation, checked against scipy

__all__ = ["ParityResult", "compare", "spearman", "FP32_TOL", "FP16_ATOL", "FP16_SPEARMAN"]

FP32_TOL = 1e-4
FP16_ATOL = 2e-2
FP16_SPEARMAN = 0.999


@dataclass(frozen=True)
class ParityResult:
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    tolerance: float
    spearman: Optional[float] = None
    spearman_min: Optional[float] = None

    @property
    def passed(self) -> bool:
        ok = np.isfinite(self.max_abs) and self.max_abs <= self.tolerance
        if self.spearman_min is not None:
            ok = ok and self.spearman is not None and self.spearman >= self.spearman_min
        return bool(ok)

    def __bool__(self) -> bool:
        return self.passed

    def line(self) -> str:
        rho = "" if self.spearman is None else f"  spearman {self.spearman:.5f} (min {self.spearman_min})"
        return (f"{'PASS' if self.passed else 'FAIL'}  {self.name:<34} max|d| {self.max_abs:.3e} "
                f"(tol {self.tolerance:.1e})  mean|d| {self.mean_abs:.2e}  max rel {self.max_rel:.2e}{rho}")

    def to_dict(self) -> dict:
        return {"name": self.name, "max_abs": self.max_abs, "mean_abs": self.mean_abs, "max_rel": self.max_rel,
                "tolerance": self.tolerance, "spearman": self.spearman, "passed": self.passed}


def compare(name: str, ref: np.ndarray, out: np.ndarray, scores: bool = False, fp16: bool = False) -> ParityResult:
    """Compare one output. ``scores`` scales the FP32 tolerance by the score range; ``fp16`` uses the FP16 gate."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref.shape != out.shape:
        return ParityResult(f"{name} shape {out.shape} != {ref.shape}", float("inf"), float("inf"), float("inf"), 0.0)
    diff = np.abs(ref - out)
    max_abs = float(diff.max()) if diff.size else 0.0
    if not np.all(np.isfinite(out)):
        max_abs = float("inf")
    max_rel = float((diff / np.maximum(np.abs(ref), 1e-6)).max()) if diff.size else 0.0
    if fp16:
        rho = None
        if scores and ref.ndim == 2 and len(ref) > 2:  # the worst score column decides
            rho = min(spearman(ref[:, j], out[:, j]) for j in range(ref.shape[1]))
        return ParityResult(name, max_abs, float(diff.mean()), max_rel, FP16_ATOL, rho,
                            FP16_SPEARMAN if rho is not None else None)
    scale = float(np.ptp(ref)) if scores else float(np.abs(ref).max(initial=0.0))
    return ParityResult(name, max_abs, float(diff.mean()) if diff.size else 0.0, max_rel, FP32_TOL * max(1.0, scale))
