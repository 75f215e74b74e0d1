"""The ``ipiqa-export`` command a refusal names: one wording for the manifest, the bundle checks and the runtime.

Its own module so that ``ipiqa.manifest`` and ``ipiqa.bundle`` both read it and neither imports the other back.
Torch-free.
"""
from __future__ import annotations

__all__ = ["REBUILD", "rebuild_command"]

REBUILD = "rebuild it with: ipiqa-export MODEL.safetensors -o BUNDLE"


def rebuild_command(precision: str, engines: bool = False) -> str:
    """The export command that writes graphs (``engines``: TensorRT engines) of ``precision``."""
    if precision == "int8":
        tail = "--int8 --calibration IMAGES.csv|DIR"
    elif precision == "bf16":  # a gate record on the FP32 graphs, run where BF16 is served (needs ipiqa[openvino])
        tail = "--onnx-only --bf16"
    elif precision == "fp16":
        tail = "--fp16" if engines else "--onnx-only --fp16-onnx"
    else:
        tail = "--fp32"
    if precision == "int8" and not engines:
        tail = "--onnx-only " + tail
    return f"ipiqa-export MODEL.safetensors -o BUNDLE {tail}"
