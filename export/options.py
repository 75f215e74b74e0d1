"""What ``ipiqa-export`` can ask of an export, and the errors a failed gate raises: torch-free, so the CLI
imports them at module level and checks every option before an export (``export.bundle_export``, which
imports torch) is imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ipiqa.errors import IPIQAError

from .checks import ToleranceOverride
from .trt import EngineSpec

__all__ = ["ExportOptions", "Int8Options", "ParityGateError", "Fp16GateError", "Bf16GateError", "DEFAULT_OPSET",
           "DEFAULT_CALIBRATION_SIZE", "check_bf16_gating"]

# The ONNX opset the graphs are exported at (export.to_onnx). 18: LayerNormalization as one op (>= 17) keeps it
# fusable and FP32-pinnable in TensorRT.
DEFAULT_OPSET = 18
DEFAULT_CALIBRATION_SIZE = 64  # ORT's MinMax ranges settle by a few dozen images; more costs minutes at 512 px


class ParityGateError(IPIQAError):
    def __init__(self, results: Sequence[Any], what: str = "parity gate"):
        self.results = list(results)
        failed = "\n".join(r.line() for r in self.results if not r)
        super().__init__(f"{what} failed; the bundle was not written:\n{failed}")


class Fp16GateError(ParityGateError):
    """The FP16 graphs missed the FP16 bounds (results: ParityResult and CosineResult checks)."""

    def __init__(self, results: Sequence[Any]):
        super().__init__(results, "FP16 gate")


class Bf16GateError(ParityGateError):
    """The FP32 graphs at BF16 on OpenVINO missed the BF16 bounds."""

    def __init__(self, results: Sequence[Any]):
        super().__init__(results, "BF16 gate")


def check_bf16_gating() -> None:
    """``--bf16`` needs OpenVINO and a CPU with BF16: elsewhere OpenVINO runs the hint in FP32 and a gate
    would pass without judging BF16. Checked by the CLI before any work and by the export stage."""
    from ipiqa._optional import require
    from ipiqa.runtime.cpu import bf16_refusal

    require("openvino", extra="openvino")
    reason = bf16_refusal()
    if reason:
        raise IPIQAError(f"--bf16: {reason}; gate BF16 on the machine class that will serve it")


@dataclass(frozen=True)
class Int8Options:
    """``--int8 --calibration SOURCE [--calibration-size N] [--int8-setting [TARGET.]KEY=VALUE ...]``."""

    calibration: Path  # a folder of images, or a CSV with an ``image`` (and optionally ``prompt``) column
    size: int = DEFAULT_CALIBRATION_SIZE
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per target: settings_for overrides

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"--calibration-size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class ExportOptions:
    onnx_only: bool = False
    engine: EngineSpec = field(default_factory=lambda: EngineSpec("fp16", (1, 32, 128)))
    opset: int = DEFAULT_OPSET
    parity_images: int = 4  # FP32 gate inputs; the engine gate uses 64
    single_query_pooling: bool = True  # the exact rewrite of both pools (issue 9); False exports the plain form
    tolerance_override: Optional[ToleranceOverride] = None  # --atol/--rtol: replaces the gate's rule; recorded
    fp16_onnx: bool = False  # FP16 graphs without FP16/INT8 engines (ONNX Runtime GPU, Triton)
    fp16_images: int = 16  # FP16 gate inputs (ONNX Runtime CPU, FP16 rounding emulated)
    int8: Optional[Int8Options] = None
    bf16: bool = False  # gate the FP32 graphs at BF16 on OpenVINO (this CPU must have AMX or AVX512-BF16)
    int8_text: bool = False  # --int8-text: an INT8 text graph too, gated per prompt (export.text_int8)
    bf16_text: bool = False  # --bf16-text: the text graph gated per prompt at BF16 on OpenVINO (export.text_bf16)

    def __post_init__(self) -> None:
        if self.int8_text and self.int8 is None:
            raise ValueError("--int8-text goes with --int8 (the INT8 text graph is served in the int8 set)")
        if self.bf16_text and not self.bf16:
            raise ValueError("--bf16-text goes with --bf16 (the text graph's BF16 gate runs where BF16 is gated)")
        if self.int8 is not None and not self.onnx_only and self.engine.precision != "int8":
            raise ValueError("--int8 with engines builds an INT8 image engine: the engine precision must be int8")
        if self.int8 is None and not self.onnx_only and self.engine.precision == "int8":
            raise ValueError("INT8 engines need calibration images (--int8 --calibration IMAGES.csv|DIR)")

    @property
    def writes_fp16(self) -> bool:
        """FP16 graphs: always for FP16 and INT8 engines (built from them), else on request."""
        return self.fp16_onnx or (not self.onnx_only and self.engine.precision in ("fp16", "int8"))

    @property
    def int8_targets(self) -> tuple[str, ...]:
        """``cpu`` always (ONNX Runtime CPU serves it); ``tensorrt`` when INT8 engines are built."""
        if self.int8 is None:
            return ()
        return ("cpu",) if self.onnx_only else ("cpu", "tensorrt")
