"""The FP16 gate: FP16 graphs against the FP32 graphs on ONNX Runtime CPU, FP16 rounding emulated.

Bounds from ``checks.BOUNDS["fp16"]``: scores within 2e-2 absolute, Spearman where they spread, every
intermediate tensor at per-row cosine ``FP16_COSINE``. Through the runtime's ``OrtBackend`` on the CPU
provider, over the graphs' FP16 emulation (serialized FP32 graphs that round as FP16 would): ONNX Runtime CPU
has no FP16 kernels, so the FP16 files themselves run only on GPU providers (the engine gate's side).
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Mapping, Optional, Union

import numpy as np

from ipiqa._optional import require

from .checks import BOUNDS, CosineResult, ParityResult
from .fp16 import ONNX_FLOAT, ONNX_FLOAT16
from .graph_runs import batches, graph_backend, run_graphs
from .measures import cosine_result, scores_spread, with_spread_note
from .parity import compare

__all__ = ["FP16_COSINE", "fp16_emulation", "score_results", "fp16_gate"]

# Intermediate tensors (feature map, embeddings): per-row cosine to FP32. FP16 rounding alone gives
# > 0.99999 on RN50-512; a saturated or NaN tensor gives far less.
FP16_COSINE = BOUNDS["fp16"].cosine_min

_MOVES_DATA = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "GatherElements", "Concat",
                         "Slice", "Expand", "Identity", "Flatten", "Split", "Tile"})


def fp16_emulation(path: Path) -> bytes:
    """The FP16 graph as an FP32 graph that rounds every FP16 tensor to FP16 (explicit Cast pairs).

    Why: ONNX Runtime's CPU provider has no FP16 kernels for the arithmetic ops (Conv, Gemm, MatMul, Add,
    Mul, AveragePool, Sigmoid, Tanh, ...). It runs them in FP32 behind casts it inserts itself and then
    drops the FP16 round trip between two such ops, so an FP16 graph on CPU neither rounds nor overflows
    where an FP16 engine would. Here each FP16 value (weights, and every tensor an arithmetic node writes)
    is rounded explicitly, so rounding and overflow to inf happen as in the FP16 graph; what stays unmodelled
    is FP16 accumulation inside a kernel, which the engine gate on the GPU covers.
    """
    onnx = require("onnx", extra="export")
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    graph = model.graph
    for k, t in enumerate(graph.initializer):
        if t.data_type == ONNX_FLOAT16:
            graph.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type in _MOVES_DATA:  # exact on values that are already FP16-rounded
            continue
        for k, out in enumerate(node.output):
            if types.get(out) != ONNX_FLOAT16:
                continue
            if node.op_type == "Cast":
                node.attribute[0].CopyFrom(helper.make_attribute("to", ONNX_FLOAT))
            node.output[k] = f"{out}__emulated"
            nodes.append(helper.make_node("Cast", [f"{out}__emulated"], [f"{out}__rounded"], to=ONNX_FLOAT16))
            nodes.append(helper.make_node("Cast", [f"{out}__rounded"], [out], to=ONNX_FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    for value in list(graph.input) + list(graph.output):  # the bundle's graphs have none; kept general
        if value.type.tensor_type.elem_type == ONNX_FLOAT16:
            value.type.tensor_type.elem_type = ONNX_FLOAT
    return model.SerializeToString()



def score_results(label: str, ref: np.ndarray, out: np.ndarray, columns: Collection[str] = ()) -> list[ParityResult]:
    """FP16 bounds per score column; Spearman only where the reference scores spread."""
    ref, out = np.asarray(ref).reshape(len(ref), -1), np.asarray(out).reshape(len(out), -1)
    names = list(columns) or [str(j) for j in range(ref.shape[1])]
    results = []
    for j, spread in enumerate(scores_spread(ref)):
        name = f"{label}/{names[j]}" + ("" if spread else " (scores barely spread: rank not gated)")
        results.append(compare(name, ref[:, j:j + 1], out[:, j:j + 1], scores=bool(spread), fp16=True))
    return results



def fp16_gate(fp32: Mapping[str, Path], fp16: Mapping[str, Path], images: np.ndarray,
              tokens: Optional[np.ndarray] = None, columns: Collection[str] = ()) -> list[Union[ParityResult, CosineResult]]:
    """FP16 graphs against the FP32 graphs through the runtime's ``OrtBackend`` on CPU: end to end, and each
    graph alone.

    The FP16 graphs run as their ``fp16_emulation`` (ONNX Runtime CPU would skip their FP16 rounding).
    Each FP16 graph is also run with the other two in FP32, so a failure names the graph that caused it.
    Passes when every result passes: scores <= 2e-2 absolute and Spearman >= 0.999 where they spread;
    every intermediate tensor (feature map, embeddings) at per-row cosine >= ``FP16_COSINE``.
    """
    emulated = {name: fp16_emulation(Path(p)) for name, p in fp16.items()}
    with graph_backend(fp32) as high, graph_backend(emulated, "fp16-emulated") as low_backend:
        ref, low = run_graphs(high, images, tokens), run_graphs(low_backend, images, tokens)
        results: list = score_results("fp16[end_to_end]", ref["scores"], low["scores"], columns)
        results += [with_spread_note(cosine_result(f"fp16[end_to_end]/{k}", ref[k], low[k], FP16_COSINE), ref[k])
                    for k in ref if k != "scores"]
        sources = {"image_encoder": ("feature_map", "image_embedding"), "text_encoder": ("text_embedding",)}
        for graph, backend in (("image_encoder", high), ("text_encoder", high), ("fusion", low_backend)):
            if graph not in fp16:
                continue
            feeds = {**ref, **{k: low[k] for k in sources.get(graph, ())}}
            text = feeds.get("text_embedding")
            scores = np.concatenate([backend.fusion_outputs({k: v[part] for k, v in feeds.items()},
                                                            None if text is None else text[part])["scores"]
                                     for part in batches(len(images), 16)])
            results += score_results(f"fp16[{graph}]", ref["scores"], scores, columns)
    return results
