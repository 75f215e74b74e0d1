"""The one object that says what shape an IP-IQA model has.

It travels in the safetensors metadata, in every export manifest and into the runtime, which refuses
to run a graph whose config differs from the one it was told to expect.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["IPIQAConfig", "DEFAULT_OUTPUTS", "CLIP_MEAN", "CLIP_STD"]

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
        # Coerce JSON lists back to tuples so that configs compare equal after a round trip.
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "vision_layers", tuple(int(n) for n in self.vision_layers))
        problems = []
        if self.resolution < 32 or self.resolution % 32:
            problems.append(f"resolution must be a positive multiple of 32, got {self.resolution}")
        if len(self.outputs) not in (1, 2):
            problems.append(f"outputs must name 1 or 2 scores, got {list(self.outputs)}")
        if len(set(self.outputs)) != len(self.outputs) or not all(
            isinstance(o, str) and o.isidentifier() for o in self.outputs
        ):
            problems.append(f"output names must be distinct identifiers, got {list(self.outputs)}")
        if self.head not in ("mlp", "linear"):
            problems.append(f"head must be 'mlp' or 'linear', got {self.head!r}")
        if self.context_length < 2:
            problems.append(f"context_length must be >= 2, got {self.context_length}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if len(self.vision_layers) != 4:
            problems.append(f"vision_layers must have 4 stages, got {self.vision_layers}")
        if self.feature_dim % self.vision_heads or self.text_width % self.text_heads:
            problems.append("widths must be divisible by their head counts")
        if problems:
            raise ValueError("invalid IPIQAConfig: " + "; ".join(problems))

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown IPIQAConfig keys {unknown}: the file was written by another ipiqa version; "
                "upgrade ipiqa or re-export the model"
            )
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "IPIQAConfig":
        return cls.from_dict(json.loads(text))


