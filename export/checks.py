"""What every gate holds an exported graph set to, one table per precision.

The ONNX parity gate, the FP16 and INT8 gates and the engine gate all read their bounds from ``BOUNDS``, so
a TensorRT INT8 engine is judged by the same numbers as the CPU INT8 graph, and BF16 gets one row here.
It also holds the one protocol every check follows (:class:`Check`), every record kind (FP32/FP16 parity,
cosine, rank) and their one decoder (:func:`check_from_dict`); ``parity`` keeps the tolerance rule and the
comparison that fill a ``ParityResult``.
Torch-free: the runtime and ``ipiqa info`` read it too.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

__all__ = ["Bounds", "BOUNDS", "bounds_for", "Check", "CosineResult", "RankResult", "ParityResult", "ToleranceOverride",
           "check_from_dict", "known_fields"]


@dataclass(frozen=True)
class Bounds:
    """One precision's bounds against the FP32 reference. ``None``: that criterion is reported, not gated.

    - ``rtol``: the fixed part of the FP32 rule, ``rtol x max(1, scale)``, raised to ``floor_multiple`` x the
      reference's own FP32 error (see ``export.parity.check_tolerance``);
    - ``atol``: an absolute bound on scores and tensors (FP16);
    - ``cosine_min``: per-row cosine of intermediate tensors (embeddings, feature maps);
    - ``spearman_min``: rank agreement of each score column, where the reference's scores spread.
    """

    precision: str
    rtol: Optional[float] = None
    floor_multiple: Optional[float] = None
    atol: Optional[float] = None
    cosine_min: Optional[float] = None
    spearman_min: Optional[float] = None


BOUNDS: dict[str, Bounds] = {
    "fp32": Bounds("fp32", rtol=1e-4, floor_multiple=4.0),
    "fp16": Bounds("fp16", atol=2e-2, cosine_min=0.999, spearman_min=0.999),
    # INT8 moves scores by more than FP16 does; what it must keep is the direction of the embedding and the
    # ranking of held-out images (max |d| is reported).
    # BF16 keeps FP32's exponent range (nothing saturates, unlike FP16); its risk is the 8-bit mantissa,
    # 2^-8 relative per rounding against FP16's 2^-11, with products accumulated in FP32 (AVX512-BF16, AMX).
    # So FP16's kind of bounds: intermediate tensors at the same cosine (measured on RN50-512, OpenVINO
    # 2026.4, AVX512-BF16: 1 - cosine <= 1.1e-5, 90x inside), scores at 2.5x FP16's absolute bound and a
    # Spearman between FP16's and INT8's, for the coarser rounding.
    "bf16": Bounds("bf16", atol=5e-2, cosine_min=0.999, spearman_min=0.995),
    "int8": Bounds("int8", cosine_min=0.995, spearman_min=0.99),
}


def bounds_for(precision: str) -> Bounds:
    """The table's row, or a ValueError naming the precisions it has."""
    try:
        return BOUNDS[precision]
    except KeyError:
        raise ValueError(f"no gate bounds for precision {precision!r}; known: {', '.join(BOUNDS)}") from None


class Check(ABC):
    """The one result protocol of every gate check (FP32 parity, FP16 cosine, INT8 rank, the engine gate).

    Each check has a ``name``, a ``measure`` (the number judged), a ``bound`` it is judged against, ``passed``
    (recomputed from the numbers), ``max_abs`` (always reported), ``note``, ``line()`` for the log and
    ``to_dict()`` for the manifest: one record shape with a ``kind``, read back by :func:`check_from_dict`.
    So the CLI and the manifest handle every check without knowing its type.
    """

    kind: ClassVar[str]
    measure_name: ClassVar[str]  # what ``measure`` is, in words ("max|d|", "min cosine", "spearman")
    name: str
    max_abs: float

    # Each kind provides ``measure``, ``bound``, ``passed`` and ``note`` (as fields or properties).
    measure: Optional[float]
    bound: Optional[float]
    passed: bool
    note: str

    def __bool__(self) -> bool:
        return self.passed

    @abstractmethod
    def line(self) -> str:
        """One log line: PASS/FAIL, the name, the measure against its bound."""

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The manifest record: the common keys, then the kind's own numbers."""
        return {"kind": self.kind, "name": self.name, "measure": self.measure, "bound": self.bound,
                "max_abs": self.max_abs, "passed": self.passed, "note": self.note, **self._fields()}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]):
        return cls(**known_fields(cls, record))


@dataclass(frozen=True)
class CosineResult(Check):
    """Per-row cosine of an embedding against the reference: the criterion that still means something
    when an untrained model's scores barely move (``min_cosine`` over rows, ``max_abs`` reported)."""

    kind: ClassVar[str] = "cosine"
    measure_name: ClassVar[str] = "min cosine"
    name: str
    min_cosine: float
    bound: float  # type: ignore[assignment]
    max_abs: float
    note: str = ""  # type: ignore[assignment]  # why the number may say little (embeddings that barely move)

    @property
    def measure(self) -> float:
        return self.min_cosine

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.min_cosine) and self.min_cosine >= self.bound)

    def line(self) -> str:
        return (f"{'PASS' if self.passed else 'FAIL'}  {self.name:<34} min cosine {self.min_cosine:.6f} "
                f"(min {self.bound})  max|d| {self.max_abs:.3e}" + (f"  [{self.note}]" if self.note else ""))


RANK_NOT_GATED = "held-out scores barely spread (untrained model?): rank not gated, the embedding criterion decides"


@dataclass(frozen=True)
class RankResult(Check):
    """One score column: Spearman gated only where the reference spreads; max |d| always reported."""

    kind: ClassVar[str] = "rank"
    measure_name: ClassVar[str] = "spearman"
    name: str
    max_abs: float
    spearman: Optional[float]
    spearman_min: float

    @property
    def measure(self) -> Optional[float]:
        return self.spearman

    @property
    def bound(self) -> float:
        return self.spearman_min

    @property
    def note(self) -> str:
        return "" if self.spearman is not None else RANK_NOT_GATED

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs) and (self.spearman is None or self.spearman >= self.spearman_min))

    def line(self) -> str:
        rank = ("spearman not gated: held-out scores barely spread (untrained model?); the embedding decides"
                if self.spearman is None else f"spearman {self.spearman:.4f} (min {self.spearman_min})")
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<34} max|d| {self.max_abs:.3e}  {rank}"


@dataclass(frozen=True)
class ToleranceOverride:
    """A user's explicit tolerance (``--atol``/``--rtol``): ``atol + rtol x scale`` replaces the rule."""

    atol: float = 0.0
    rtol: float = 0.0

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}")

    def describe(self) -> str:
        return f"--atol {self.atol:g} --rtol {self.rtol:g}"

    def to_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol}


@dataclass(frozen=True)
class ParityResult(Check):
    """One output against the FP32 reference: ``max |d|`` within the rule's tolerance (and, for FP16 scores,
    Spearman at least its minimum)."""

    kind: ClassVar[str] = "tolerance"
    measure_name: ClassVar[str] = "max|d|"
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    tolerance: float
    spearman: Optional[float] = None
    spearman_min: Optional[float] = None
    floor: Optional[float] = None  # max |ref_fp32 - ref_fp64|: what FP32 can promise for this model
    fixed_tolerance: Optional[float] = None  # the fixed part of the rule
    floor_multiple: Optional[float] = None  # k in max(fixed, k x floor)
    override: Optional[ToleranceOverride] = None  # set when --atol/--rtol replaced the rule

    @property
    def measure(self) -> float:
        return self.max_abs

    @property
    def bound(self) -> float:
        return self.tolerance

    @property
    def passed(self) -> bool:
        ok = np.isfinite(self.max_abs) and self.max_abs <= self.tolerance
        if self.spearman_min is not None:
            ok = ok and self.spearman is not None and self.spearman >= self.spearman_min
        return bool(ok)

    @property
    def source(self) -> str:
        """Where the tolerance came from: the fixed part, the floor, or an override."""
        if self.override is not None:
            return f"OVERRIDE {self.override.describe()}"
        if self.floor is not None and self.floor_multiple is not None:
            return f"max(fixed {self.fixed_tolerance:.1e}, {self.floor_multiple:g} x floor)"
        return "fixed"

    @property
    def note(self) -> str:
        floor = "" if self.floor is None else f", floor {self.floor:.2e}"
        rho = "" if self.spearman is None else f", spearman {self.spearman:.5f} (min {self.spearman_min})"
        return f"tol = {self.source}{floor}{rho}"

    def line(self) -> str:
        """One log line: the difference, the tolerance and where it came from (fixed part, floor, override)."""
        rho = "" if self.spearman is None else f"  spearman {self.spearman:.5f} (min {self.spearman_min})"
        floor = "" if self.floor is None else f"  floor {self.floor:.2e}"
        return (f"{'PASS' if self.passed else 'FAIL'}  {self.name:<34} max|d| {self.max_abs:.3e} "
                f"(tol {self.tolerance:.1e} = {self.source}){floor}  mean|d| {self.mean_abs:.2e}  "
                f"max rel {self.max_rel:.2e}{rho}")

    def _fields(self) -> dict[str, Any]:
        return {**super()._fields(), "override": self.override.to_dict() if self.override else None}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "ParityResult":
        """A stored manifest record; ``passed`` is recomputed, not trusted."""
        known = known_fields(cls, record)
        if known.get("override") is not None:
            known["override"] = ToleranceOverride(**known["override"])
        return cls(**known)


def known_fields(cls: type, record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's keys that are fields of the dataclass ``cls`` (the common keys and older extras dropped)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in record.items() if k in names}


def check_from_dict(record: Mapping[str, Any]) -> Check:
    """A stored gate record (the manifest's ``parity.onnx``/``parity.engines``, the FP16/INT8 gate lists) as
    the check object that wrote it; ``passed`` is recomputed from the numbers, never trusted. Records
    written before ``kind`` existed are told apart by their keys."""
    kind = record.get("kind") or ("cosine" if "min_cosine" in record else
                                  "tolerance" if "tolerance" in record else "rank")
    classes = {"tolerance": ParityResult, "cosine": CosineResult, "rank": RankResult}
    if kind not in classes:
        raise ValueError(f"unknown gate check kind {kind!r}; known: {', '.join(classes)}")
    return classes[kind].from_dict(record)
