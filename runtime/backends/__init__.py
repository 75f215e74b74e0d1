"""Backends run the three graphs; each is imported only when chosen (tensorrt, onnxruntime-gpu and torch are optional)."""
from __future__ import annotations

from typing import Any, Optional, Protocol

import numpy as np

__all__ = ["Backend"]


class Backend(Protocol):
    """A model behind three calls. ``encode_image`` returns an opaque handle (device tensors on GPU)
    that only ``fuse`` reads, so image-side tensors never need a host round trip."""

    name: str
    max_batch: Optional[int]

    def encode_image(self, images: np.ndarray) -> Any: ...

    def encode_text(self, tokens: np.ndarray) -> np.ndarray: ...

    def fuse(self, image_side: Any, text_embedding: Optional[np.ndarray]) -> np.ndarray: ...

    def close(self) -> None: ...
