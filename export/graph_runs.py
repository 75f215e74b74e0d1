"""A bundle's graph set composed on ONNX Runtime CPU, every intermediate tensor kept: what the FP16 and INT8
gates compare. Sessions come from the runtime's one factory (``ipiqa.runtime.backends.ort.ort_session``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import numpy as np

from ipiqa.errors import IPIQAError
from ipiqa.runtime.backends.ort import ort_session

from .fp16 import graph_precision

__all__ = ["graph_session", "run_graphs", "batches"]


def graph_session(source: Union[Path, bytes], threads: int = 0, optimize: bool = True):
    """A quiet CPU session for an FP32, FP16 or QDQ graph (a file, or a serialized model with its weights
    inline); whether it is FP16 (which the factory loads without the NCHWc pass) is read from the graph."""
    fp16 = not isinstance(source, bytes) and graph_precision(Path(source)) == "fp16"
    return ort_session(source, threads, optimize=optimize, fp16=fp16, quiet=True)


def batches(n: int, batch: int) -> Iterable[slice]:
    return (slice(i, min(i + batch, n)) for i in range(0, n, batch))


def run_graphs(paths: Mapping[str, Union[Path, bytes]], images: np.ndarray, tokens: Optional[np.ndarray] = None,
               batch: int = 16) -> dict[str, np.ndarray]:
    """The bundle's graphs composed on ONNX Runtime CPU: every intermediate tensor, every fusion output."""
    sessions = {name: graph_session(p) for name, p in paths.items()}
    if "text_embedding" in {i.name for i in sessions["fusion"].get_inputs()} and tokens is None:
        raise IPIQAError("this model's fusion graph reads a text embedding: pass tokens (one prompt per image)")
    out: dict[str, list] = {}
    for part in batches(len(images), batch):
        feeds = dict(zip(("feature_map", "image_embedding"), sessions["image_encoder"].run(None, {"image": images[part]})))
        if "text_encoder" in sessions and tokens is not None:
            (feeds["text_embedding"],) = sessions["text_encoder"].run(None, {"tokens": tokens[part]})
        fusion = sessions["fusion"]
        names = [o.name for o in fusion.get_outputs()]  # scores, and the cross pool's gate-only ``pooled``
        feeds.update(zip(names, fusion.run(names, {i.name: feeds[i.name] for i in fusion.get_inputs()})))
        for k, v in feeds.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


