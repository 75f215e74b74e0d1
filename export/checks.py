"""What every gate holds an exported graph set to, one table per precision.

The ONNX parity gate, the FP16 and INT8 gates and the engine gate all read their bounds from ``BOUNDS``, so
a TensorRT INT8 engine is judged by the same numbers as the CPU INT8 graph, and BF16 gets one row here.
Torch-free: the runtime and ``ipiqa info`` read it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Bounds", "BOUNDS", "bounds_for", "check_from_dict"]


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
    "int8": Bounds("int8", cosine_min=0.995, spearman_min=0.99),
}


def bounds_for(precision: str) -> Bounds:
    """The table's row, or a ValueError naming the precisions it has."""
    try:
        return BOUNDS[precision]
    except KeyError:
        raise ValueError(f"no gate bounds for precision {precision!r}; known: {', '.join(BOUNDS)}") from None


def check_from_dict(record: dict):
    """A stored gate record (the manifest's ``parity.onnx``/``parity.engines``, the FP16/INT8 gate lists) as
    the check object that wrote it; ``passed`` is recomputed from the numbers, never trusted."""
    from .fp16 import CosineResult
    from .int8 import RankResult
    from .parity import ParityResult

    kind = record.get("kind") or ("cosine" if "min_cosine" in record else
                                  "tolerance" if "tolerance" in record else "rank")
    if kind == "tolerance":
        return ParityResult.from_dict(record)
    cls = CosineResult if kind == "cosine" else RankResult
    return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})
