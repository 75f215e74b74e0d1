"""What every gate holds an exported graph set to, one table per precision.

The ONNX parity gate, the FP16 and INT8 gates and the engine gate all read their bounds from ``BOUNDS``, so
a TensorRT INT8 engine is judged by the same numbers as the CPU INT8 graph, and BF16 gets one row here.
It also holds the one protocol every check follows (:class:`Check`) and reads their records back.
Torch-free: the runtime and ``ipiqa info`` read it too.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

__all__ = ["Bounds", "BOUNDS", "bounds_for", "Check", "CosineResult", "RankResult", "check_from_dict"]


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


def known_fields(cls: type, record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's keys that are fields of the dataclass ``cls`` (the common keys and older extras dropped)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in record.items() if k in names}


def check_from_dict(record: Mapping[str, Any]) -> Check:
    """A stored gate record (the manifest's ``parity.onnx``/``parity.engines``, the FP16/INT8 gate lists) as
    the check object that wrote it; ``passed`` is recomputed from the numbers, never trusted. Records
    written before ``kind`` existed are told apart by their keys."""
    from .parity import ParityResult

    kind = record.get("kind") or ("cosine" if "min_cosine" in record else
                                  "tolerance" if "tolerance" in record else "rank")
    classes = {"tolerance": ParityResult, "cosine": CosineResult, "rank": RankResult}
    if kind not in classes:
        raise ValueError(f"unknown gate check kind {kind!r}; known: {', '.join(classes)}")
    return classes[kind].from_dict(record)
