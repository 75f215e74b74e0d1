"""Trace one graph to ONNX with the dynamo exporter, embed the model config, and check it.

Weights always go to ``<name>.onnx.data`` beside the graph: no 2 GB protobuf limit at any size, and
the runtime reads a graph's metadata without touching its weights.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ipiqa._optional import require
from ipiqa.bundle import METADATA_CONFIG_KEY
from ipiqa.config import IPIQAConfig

from .onnx_files import save_checked
from .options import DEFAULT_OPSET

__all__ = ["DEFAULT_OPSET", "export_onnx", "save_checked"]  # save_checked: from onnx_files


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    cfg: IPIQAConfig,
    opset: int = DEFAULT_OPSET,
    sequence_inputs: Sequence[str] = (),
) -> Path:
    """Export with a dynamic batch axis on every input and output, and a dynamic axis 1 (2 to the context
    length) on ``sequence_inputs`` (the text graph's tokens: see ``TextEncoderGraph``); returns ``path``."""
    require("onnx", extra="export")
    require("onnxscript", extra="export")
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=2, max=cfg.context_length)
    dynamic = {name: {0: batch, **({1: sequence} if name in sequence_inputs else {})} for name in input_names}
    quiet = io.StringIO()
    chatty = logging.getLogger("onnxscript")
    level, chatty.level = chatty.level, logging.ERROR  # "skipping constant folding" notes are not for users
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, tuple(example_inputs), dynamo=True, opset_version=opset, input_names=list(input_names),
            output_names=list(output_names), dynamic_shapes=dynamic, optimize=True, verbose=False,
        )
    chatty.setLevel(level)
    proto = program.model_proto
    _set_batch_dim_names(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_CONFIG_KEY, cfg.to_json()
    save_checked(proto, path, "exported graph")
    return path


def _set_batch_dim_names(proto) -> None:
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "batch"
        if len(dims) > 1 and dims[1].dim_param:
            dims[1].dim_param = "sequence"
