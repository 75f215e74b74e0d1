"""Backends run the three graphs; each is imported only when chosen (tensorrt, onnxruntime-gpu and torch are optional).

Every backend subclasses ``Backend`` (``base.py``): it implements its engine calls, the base class owns
splitting, padding, trimming and the input checks.
"""
from __future__ import annotations

from .base import Backend, batch_spans

__all__ = ["Backend", "batch_spans"]
