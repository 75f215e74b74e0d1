"""The one object that says what shape an IP-IQA model has.

It travels in the safetensors metadata, in every export manifest and into the runtime, which refuses
to run a graph whose config differs from the one it was told to expect.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .errors import ConfigError

__all__ = ["IPIQAConfig", "ConfigError", "DEFAULT_OUTPUTS", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_OUTPUTS = {1: ("quality",), 2: ("quality", "alignment")}


@dataclass(frozen=True)
class IPIQAConfig:
    """Model shape. Defaults are the authors' AGIQA-3k model: CLIP RN50 at 512 px, 2 outputs, MLP head."""

    resolution: int = 512  # square input side; multiple of 32 (the trunk's stride)
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS[2]  # one name per score column, in head order
    head: str = "mlp"  # "mlp" (dropout-dense-tanh-dropout-out) or "linear"
    text: bool = True  # the [QA] text branch and cross-modality pool; False = image-only model
    context_length: int = 77  # CLIP tokenizer context, end-of-text kept last on truncation
    dropout: float = 0.5  # head dropout (training only; inference is unaffected)
    # Architecture of the CLIP backbone. Defaults are OpenAI RN50; smaller values exist for fast tests.
    vision_layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # bottlenecks per ResNet stage
    vision_width: int = 64  # stem width; the feature map has 32x this many channels
    embed_dim: int = 1024  # CLIP joint embedding width (attnpool output, text projection)
    vision_heads: int = 32  # heads of both pooling attentions
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    vocab_size: int = 49408

    def __post_init__(self) -> None:
        # Coerce JSON lists back to tuples (and numpy integers to int) so that configs compare equal after a
        # round trip; a value of the wrong type is reported with the others, never as a TypeError.
        problems = []
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if _is_int(value):
                object.__setattr__(self, name, int(value))
            else:
                problems.append(f"{name}={value!r}: must be an integer")
        if isinstance(self.dropout, numbers.Real) and not isinstance(self.dropout, bool):
            object.__setattr__(self, "dropout", float(self.dropout))
        else:
            problems.append(f"dropout={self.dropout!r}: must be a number in [0, 1)")
        outputs_problem = _outputs_problem(self.outputs)
        if outputs_problem is None:
            object.__setattr__(self, "outputs", tuple(self.outputs))
        else:
            problems.append(outputs_problem)
        layers = self.vision_layers
        if isinstance(layers, (list, tuple)) and len(layers) == 4 and all(_is_int(n) and n >= 1 for n in layers):
            object.__setattr__(self, "vision_layers", tuple(int(n) for n in layers))
        else:
            problems.append(f"vision_layers={layers!r}: must be 4 positive integers (bottlenecks per ResNet stage)")
        if not isinstance(self.head, str) or self.head not in ("mlp", "linear"):
            problems.append(f"head={self.head!r}: must be 'mlp' or 'linear'")
        if not isinstance(self.text, bool):
            problems.append(f"text={self.text!r}: must be true or false")
        if type(self.resolution) is int and (self.resolution < 32 or self.resolution % 32):
            problems.append(f"resolution={self.resolution}: must be a positive multiple of 32 (e.g. 224 or 512)")
        if type(self.context_length) is int and self.context_length < 2:
            problems.append(f"context_length={self.context_length}: must be >= 2")
        if isinstance(self.dropout, float) and not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout}: must be in [0, 1)")
        sizes = [n for n in _INT_FIELDS if n not in ("resolution", "context_length")]
        small = [n for n in sizes if type(getattr(self, n)) is int and getattr(self, n) < 1]
        problems += [f"{n}={getattr(self, n)}: must be >= 1" for n in small]
        if not small and all(type(getattr(self, n)) is int for n in sizes) and (
                self.feature_dim % self.vision_heads or self.text_width % self.text_heads):
            problems.append(f"widths must be divisible by their head counts: vision_width*32={self.feature_dim} by "
                            f"vision_heads={self.vision_heads}, text_width={self.text_width} by text_heads={self.text_heads}")
        if problems:
            raise ConfigError("invalid IPIQAConfig: " + "; ".join(problems))

    @staticmethod
    def check_outputs(names: Sequence[str]) -> tuple[str, ...]:
        """``names`` as a config's ``outputs`` (1 or 2 distinct identifiers), or a ConfigError saying why not."""
        problem = _outputs_problem(names)
        if problem is not None:
            raise ConfigError(problem)
        return tuple(names)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    @property
    def feature_dim(self) -> int:
        """Channels of the trunk's last feature map (2048 for RN50)."""
        return self.vision_width * 32

    @property
    def grid(self) -> int:
        """Side of the feature map: 16 at 512 px, 7 at 224 px."""
        return self.resolution // 32

    @property
    def head_in_dim(self) -> int:
        return self.embed_dim * (2 if self.text else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "IPIQAConfig":
        """Strict: an unknown key means the file came from a different (newer?) version; say so."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"an IPIQAConfig is a JSON object of its fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ConfigError(
                f"unknown IPIQAConfig keys {unknown}: the file was written by another ipiqa version; "
                "upgrade ipiqa or re-export the model"
            )
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "IPIQAConfig":
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
            raise ConfigError(f"an IPIQAConfig is JSON text; this is not JSON ({exc})") from None
        return cls.from_dict(data)


_INT_FIELDS = ("resolution", "context_length", "vision_width", "embed_dim", "vision_heads", "text_width",
               "text_layers", "text_heads", "vocab_size")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _outputs_problem(outputs: Any) -> Optional[str]:
    """Why ``outputs`` cannot be a config's score names, naming the value and what is allowed; None if it can."""
    if isinstance(outputs, str) or not isinstance(outputs, (list, tuple)):
        return f"outputs={outputs!r}: must be a list of 1 or 2 score names, e.g. ['quality', 'alignment']"
    names = list(outputs)
    if len(names) not in (1, 2):
        return f"outputs={names}: must name 1 or 2 scores (the model's head has 1 or 2 outputs), got {len(names)}"
    if len(set(names)) != len(names) or not all(isinstance(o, str) and o.isidentifier() for o in names):
        return (f"outputs={names}: score names must be distinct identifiers (letters, digits and _, not starting "
                "with a digit; no spaces), e.g. quality,alignment")
    return None


