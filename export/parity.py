"""Parity of exported graphs against the PyTorch reference, as objects that say whether they passed.

The tolerance of every check comes from one rule (:func:`check_tolerance`):

* a fixed part, as before: FP32 ``1e-4 x max(1, scale)`` (``scale`` = score range for scores, ``max |ref|``
  for intermediate tensors); FP16 ``2e-2`` absolute, plus Spearman >= 0.999 on scores over 64 inputs;
* a measured part: the reference's own FP32 error on the gate inputs (the *floor*: ``max |ref_fp32 -
  ref_fp64|``, the same PyTorch model run in float64), times :data:`FLOOR_MULTIPLE`.

The tolerance is the larger of the two. A model whose head is steep loses digits in FP32 whatever runs
it; the floor says how many, so the gate never asks the export for more than the reference can deliver,
while a wrong graph (another activation, a shifted position table) still misses by orders of magnitude.
An explicit override (``ipiqa-export --atol/--rtol``) replaces the rule and is recorded with each check.
The records (``ParityResult``, ``ToleranceOverride``) live with every other check kind in ``checks``.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ipiqa.metrics import srcc as spearman  # one rank implementation (below export and training), checked against scipy

from .checks import BOUNDS, ParityResult, ToleranceOverride, bounds_for

__all__ = ["check_tolerance", "compare", "spearman", "worst_spearman", "FP32_TOL", "FP16_ATOL", "FP16_SPEARMAN",
           "FLOOR_MULTIPLE", "rule_record"]

FP32_TOL = BOUNDS["fp32"].rtol
FP16_ATOL = BOUNDS["fp16"].atol
FP16_SPEARMAN = BOUNDS["fp16"].spearman_min
FLOOR_MULTIPLE = BOUNDS["fp32"].floor_multiple
"""k in ``tolerance = max(fixed, k x floor)``.

Two FP32 implementations that are each within ``floor`` of the float64 result differ from each other by
up to ``2 x floor`` (triangle inequality): that is the least k can be. The other factor 2 is headroom for
what makes the exported graph's own error larger than the reference's: graph optimizers fuse and
reassociate reductions (MatMul+Add, LayerNorm, attention, implicit-GEMM or Winograd convolutions) with
other error constants than PyTorch's kernels, and the floor is a maximum over a handful of inputs, not a
bound. Measured through the ORT CPU backend: max |d| / floor up to 2.7 where the floor is a few ulps
(there the fixed part governs by three orders of magnitude), 0.6-0.8 on the steep-head test model where
the floor governs. The floor is measured per check, so a steep head raises the score checks only: the
intermediate tensors (feature map, embeddings) keep their own, small floors, and a wrong graph upstream
of the head (another activation, a shifted position table) still fails there.
"""


def check_tolerance(scale: float, floor: Optional[float], precision: str = "fp32",
                    override: Optional[ToleranceOverride] = None) -> tuple[float, float]:
    """The gate's one tolerance rule: ``(tolerance, fixed part)`` of one check.

    ``scale`` is the score range (scores) or ``max |ref|`` (tensors); ``floor`` the reference's own FP32
    error on the same inputs (None: not measured, the fixed part alone). An override replaces the rule.
    """
    if precision in ("fp16", "bf16"):
        fixed = float(bounds_for(precision).atol)  # absolute, on MOS-scale scores and on embeddings alike
    elif precision == "fp32":
        fixed = FP32_TOL * max(1.0, scale)
    else:
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    if override is not None:
        return override.atol + override.rtol * scale, fixed
    if floor is None or not np.isfinite(floor):  # a non-finite reference must not loosen anything
        return fixed, fixed
    return max(fixed, FLOOR_MULTIPLE * floor), fixed


def rule_record(override: Optional[ToleranceOverride] = None) -> dict[str, Any]:
    """The rule's constants (and any override) as the manifest records them beside the checks."""
    return {"fp32_tol": FP32_TOL, "fp16_atol": FP16_ATOL, "fp16_spearman": FP16_SPEARMAN,
            "floor_multiple": FLOOR_MULTIPLE, "tolerance": "max(fixed, floor_multiple x floor)",
            "override": override.to_dict() if override else None}


def worst_spearman(ref: np.ndarray, out: np.ndarray) -> Optional[float]:
    """The least Spearman over the score columns the reference can rank, whatever their order.

    A column whose reference is constant has no rank order (Spearman is NaN there) and is left out, explicitly:
    ``min`` over a NaN depends on where it stands. A column the output cannot rank where the reference can
    (constant, or non-finite) is NaN, which fails. None: no column can be ranked (max |d| alone judges).
    """
    rhos = [spearman(ref[:, j], out[:, j]) for j in range(ref.shape[1]) if np.ptp(ref[:, j]) > 0]
    if not rhos:
        return None
    return float("nan") if any(np.isnan(r) for r in rhos) else float(min(rhos))


def compare(name: str, ref: np.ndarray, out: np.ndarray, scores: bool = False, fp16: bool = False,
            ref64: Optional[np.ndarray] = None, override: Optional[ToleranceOverride] = None,
            precision: str = "fp32") -> ParityResult:
    """Compare one output with the FP32 reference ``ref``.

    ``ref64``: the same reference in float64 on the same inputs; ``max |ref - ref64|`` is the floor the
    rule raises the tolerance to. ``scores`` measures scale by the score range; ``fp16`` uses the FP16
    gate (and, for scores, the Spearman minimum); ``precision="bf16"`` the BF16 row of ``BOUNDS``.
    """
    precision = "fp16" if fp16 else precision
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    floor = None
    if ref64 is not None:
        ref64 = np.asarray(ref64, np.float64)
        floor = float(np.abs(ref - ref64).max(initial=0.0)) if ref64.shape == ref.shape else float("inf")
    if ref.shape != out.shape:
        return ParityResult(f"{name} shape {out.shape} != {ref.shape}", float("inf"), float("inf"), float("inf"), 0.0,
                            floor=floor)
    diff = np.abs(ref - out)
    max_abs = float(diff.max()) if diff.size else 0.0
    if not np.all(np.isfinite(out)):
        max_abs = float("inf")
    max_rel = float((diff / np.maximum(np.abs(ref), 1e-6)).max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    scale = float(np.ptp(ref)) if scores and ref.size else float(np.abs(ref).max(initial=0.0))
    tolerance, fixed = check_tolerance(scale, floor, precision, override)
    rho = rho_min = None
    if precision != "fp32" and scores and ref.ndim == 2 and len(ref) > 2:  # the worst score column decides
        rho = worst_spearman(ref, out)
        rho_min = None if rho is None else bounds_for(precision).spearman_min
    return ParityResult(name, max_abs, mean_abs, max_rel, tolerance, rho, rho_min, floor, fixed,
                        FLOOR_MULTIPLE if floor is not None else None, override)
