"""A graph set run through the runtime's own backend objects, every intermediate tensor kept: what the FP16,
INT8 and BF16 gates compare. ONNX Runtime sessions come from the runtime's one factory (``OrtBackend``,
``ipiqa.runtime.backends.ort.ort_session``); the BF16 gate passes an ``OpenVinoBackend``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import numpy as np

from ipiqa.errors import IPIQAError
from ipiqa.runtime.backends.base import Backend
from ipiqa.runtime.backends.ort import OrtBackend, ort_session

from .fp16 import graph_precision

__all__ = ["graph_session", "graph_backend", "run_graphs", "batches"]

Graphs = Mapping[str, Union[Path, bytes]]


def _is_fp16(source: Union[Path, bytes]) -> bool:
    return not isinstance(source, bytes) and graph_precision(Path(source)) == "fp16"


def graph_session(source: Union[Path, bytes], threads: Optional[int] = None, optimize: bool = True):
    """A quiet CPU session for one FP32, FP16 or QDQ graph (a file, or a serialized model with its weights
    inline): the INT8 layer ranking reads arbitrary tensors of one graph, which no backend exposes."""
    return ort_session(source, threads, optimize=optimize, fp16=_is_fp16(source), quiet=True)


def graph_backend(graphs: Graphs, label: str = "fp32", optimize: bool = True) -> OrtBackend:
    """The runtime's ``OrtBackend`` on the CPU provider over a graph set no manifest lists yet."""
    return OrtBackend.from_graphs(graphs, label, optimize=optimize, fp16=any(_is_fp16(g) for g in graphs.values()))


def batches(n: int, batch: int) -> Iterable[slice]:
    return (slice(i, min(i + batch, n)) for i in range(0, n, batch))


def run_graphs(graphs: Union[Backend, Graphs], images: np.ndarray, tokens: Optional[np.ndarray] = None,
               batch: int = 16) -> dict[str, np.ndarray]:
    """Every intermediate tensor and fusion output of a graph set (a backend, or graph files for
    ``graph_backend``), composed through the backend's engine calls as ``score`` composes them."""
    backend = graphs if isinstance(graphs, Backend) else graph_backend(graphs)
    try:
        if backend.cfg.text and tokens is None:
            raise IPIQAError("this model's fusion graph reads a text embedding: pass tokens (one prompt per image)")
        out: dict[str, list] = {}
        for part in batches(len(images), batch):
            feeds = dict(backend.image_outputs(images[part]))
            text = backend.encode_text(tokens[part]) if backend.cfg.text else None
            if text is not None:
                feeds["text_embedding"] = text
            feeds.update(backend.fusion_outputs(feeds, text))  # scores, and the cross pool's gate-only ``pooled``
            for k, v in feeds.items():
                out.setdefault(k, []).append(np.asarray(v))
        return {k: np.concatenate(v) for k, v in out.items()}
    finally:
        if backend is not graphs:
            backend.close()
