"""What decides an INT8 graph: ``QuantSettings``, each target's measured defaults (``TARGETS``) and the
``--int8-setting [TARGET.]KEY=VALUE`` parser. Torch-free: ``ipiqa-export`` checks the option before an
export imports torch. Why each target's defaults are what they are: ``export.int8``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

__all__ = ["QuantSettings", "TARGETS", "settings_for", "parse_setting", "SETTINGS_KEY"]

SETTINGS_KEY = "ipiqa.int8"  # graph metadata: the QuantSettings as JSON


@dataclass(frozen=True)
class QuantSettings:
    """Everything that decides the INT8 graph; written into the manifest so a bundle says how it was made."""

    target: str  # "cpu" | "tensorrt"
    activation_type: str  # "uint8" | "int8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: no u8 x s8 saturation on CPUs without VNNI
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    calibrate_method: str = "minmax"  # "minmax" | "entropy" | "percentile"
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    calibration_size: int = 64  # images used for calibration (at most)
    nodes_to_exclude: tuple[str, ...] = ()  # kept in FP32 (found by the gate, or given)
    quant_format: str = "QDQ"

    def __post_init__(self) -> None:
        problems = []
        if self.target not in ("cpu", "tensorrt"):
            problems.append(f"target must be cpu or tensorrt, got {self.target!r}")
        if self.activation_type not in ("uint8", "int8") or self.weight_type not in ("uint8", "int8"):
            problems.append(f"types must be uint8 or int8, got {self.activation_type}/{self.weight_type}")
        if self.calibrate_method not in ("minmax", "entropy", "percentile"):
            problems.append(f"calibrate_method must be minmax, entropy or percentile, got {self.calibrate_method!r}")
        if self.calibration_size < 1:
            problems.append(f"calibration_size must be >= 1, got {self.calibration_size}")
        if self.target == "tensorrt" and not (self.activation_type == self.weight_type == "int8"
                                              and self.activation_symmetric and self.weight_symmetric):
            problems.append("TensorRT takes symmetric int8 Q/DQ only (activation_type=weight_type=int8, symmetric)")
        if self.quant_format != "QDQ":
            problems.append("only the QDQ format is produced (TensorRT and ONNX Runtime both take it)")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))

    def to_dict(self) -> dict:
        """JSON-ready (lists, not tuples): what the manifest and the graph metadata store."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSettings":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown INT8 settings {sorted(unknown)} (written by a newer ipiqa?)")
        return cls(**data)


TARGETS = {
    "cpu": QuantSettings("cpu", activation_type="uint8", reduce_range=True),
    "tensorrt": QuantSettings("tensorrt", activation_type="int8", activation_symmetric=True),
}


def settings_for(target: str, **overrides) -> QuantSettings:
    """The target's measured defaults with the caller's overrides (unknown keys are an error)."""
    if target not in TARGETS:
        raise ValueError(f"INT8 target must be one of {', '.join(TARGETS)}, got {target!r}")
    unknown = set(overrides) - (set(QuantSettings.__dataclass_fields__) - {"target"})
    if unknown:
        raise ValueError(f"unknown INT8 settings {sorted(unknown)}; known: {sorted(QuantSettings.__dataclass_fields__)}")
    return replace(TARGETS[target], **overrides)


def parse_setting(text: str) -> tuple[Optional[str], str, object]:
    """``KEY=VALUE`` (every target) or ``TARGET.KEY=VALUE`` -> (target or None, key, value typed like the default).

    Booleans take true/false/1/0/yes/no; tuples (``op_types``, ``nodes_to_exclude``) a comma-separated list.
    """
    key, sep, raw = text.partition("=")
    target, _, key = key.strip().rpartition(".")
    target = target or None
    fields = set(QuantSettings.__dataclass_fields__) - {"target"}
    if not sep or key not in fields:
        raise ValueError(f"--int8-setting takes [TARGET.]KEY=VALUE with KEY one of {', '.join(sorted(fields))}, got {text!r}")
    if target is not None and target not in TARGETS:
        raise ValueError(f"--int8-setting {text!r}: target must be one of {', '.join(TARGETS)}")
    default, raw = getattr(TARGETS[target or "cpu"], key), raw.strip()
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"--int8-setting {text!r}: {key} is true or false")
        return target, key, raw.lower() in ("true", "1", "yes")
    if isinstance(default, int):
        try:
            return target, key, int(raw)
        except ValueError:
            raise ValueError(f"--int8-setting {text!r}: {key} is an integer") from None
    if isinstance(default, tuple):
        return target, key, tuple(v.strip() for v in raw.split(",") if v.strip())
    return target, key, raw
