"""FLOPs of an ONNX graph at a given batch, counted from its shapes (Conv, MatMul, Gemm: 2 per multiply-add).

Elementwise ops, norms and softmax are left out: under 1% of this model's arithmetic.
"""
from __future__ import annotations

from math import prod
from pathlib import Path

__all__ = ["graph_flops"]


def _dims(value_info) -> list[int]:
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def graph_flops(path: Path, batch: int = 1, sequence: int = 77) -> int:
    """At ``batch`` rows and, where an input has a dynamic axis 1 (the text graph's tokens), ``sequence`` tokens:
    the full context by default, an upper bound now that the runtime cuts each text call at its end-of-text."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.dim_value and axis < 2:
                dim.ClearField("dim_param")
                dim.dim_value = batch if axis == 0 else sequence
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: _dims(v) for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
            if out and w and all(out):
                total += 2 * prod(out) * prod(w[1:])
        elif node.op_type in ("MatMul", "Gemm"):
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and out and all(out) and all(a):
                k = a[-2] if node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute) else a[-1]
                total += 2 * prod(out) * k
    return total
