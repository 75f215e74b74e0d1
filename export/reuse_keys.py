"""The reuse keys of an export's stages: a stage is reused when its key equals the one its previous manifest
recorded. The FP32 key hashes the traced weights (not the file bytes), the config, the trace options, the
gate rule and the library versions; every later stage's key starts from it.
"""
from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from typing import Any, Mapping

import torch

from ipiqa import __version__
from ipiqa.model import IPIQA

from .graphs import GRAPH_FORMAT
from .options import ExportOptions

__all__ = ["library_versions", "stage_key", "weights_digest", "onnx_key"]


def library_versions() -> dict[str, str]:
    """The versions whose change re-runs the FP32 stage (and so every later one)."""
    out = {"ipiqa": __version__, "python": platform.python_version()}
    for dist in ("torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def stage_key(*parts: object) -> str:
    """SHA-256 of the JSON of ``parts``: what a stage's outputs depend on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every state_dict tensor (name, dtype, shape, bytes): what the graphs are traced from,
    whichever file (or none) the weights came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def onnx_key(model: IPIQA, options: ExportOptions, rule: Mapping[str, Any], versions: Mapping[str, str]) -> str:
    """Reuse key of the FP32 graphs: the traced weights, config, trace options, graph format, gate rule and
    library versions."""
    return stage_key(weights_digest(model), model.cfg.to_dict(), options.opset, options.single_query_pooling, rule,
                     versions, GRAPH_FORMAT)
