"""FP16 ONNX graphs from the exported FP32 graphs, with FP32 islands by construction, and their gate.

TensorRT 10+ builds strongly typed networks (TensorRT 11: always): precision is whatever the ONNX tensor
types say, so the FP16 engine needs an FP16 *graph*. This converter walks the graph once, gives every node
a precision and inserts a ``Cast`` wherever a tensor crosses between the two:

- FP32 by op type (``FP32_OPS``): normalizations (LayerNorm statistics overflow FP16 once the residual
  stream reaches a few hundred), softmax, reductions (the mean token of the visual pool sums 256-1024
  tokens), exp/log/pow/sqrt, and ArgMax (the end-of-text lookup runs on token ids cast to float, exact in
  FP32 only up to 2^24, in FP16 only up to 2048).
- FP32 by position: the attention logits, i.e. the MatMul feeding each Softmax and the scale/mask ops
  between them (scores and ``-1e4`` masks in FP16 lose the ranking or saturate).
- Everything else (Conv, Gemm, MatMul, activations, data movement) runs in FP16 with FP16 weights:
  that is where the FLOPs and the bytes are.
- Graph inputs and outputs keep their types (float32, or a uint8 image untouched); ``Cast``, ``Shape``
  and integer shape arithmetic are left alone, so shape-computing subgraphs never change type.

Why not ``onnxconverter_common.float16`` (1.16, ``keep_io_types=True``): the image graph's ``feature_map`` is
both a graph output (fusion reads it) and the input of the visual pool's Reshape. The converter casts the
output back to float32 under the output's name, so the Reshape reads float32 while its own output stays
annotated float16: ``onnx.checker`` and ONNX Runtime refuse the graph ("Type (tensor(float16)) of output arg
(view_2) of node (node_Reshape_340) does not match expected type (tensor(float))"). Here an FP16 producer of
a graph output writes ``<name>__fp16``, consumers inside read that, and a Cast writes the float32 output;
every stale ``value_info`` is dropped and types re-inferred, and the result must pass
``onnx.checker.check_model(full_check=True)`` before it is written.

The FP16 gate is ``export.fp16_gate``; this module only converts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping, Optional

import numpy as np

from ipiqa._optional import require
from ipiqa.bundle import METADATA_PRECISION_KEY
from ipiqa.errors import IPIQAError

from .onnx_files import save_checked


__all__ = ["FP32_OPS", "PRECISION_KEY", "FP16_MAX", "ONNX_FLOAT", "ONNX_FLOAT16", "Fp16Conversion", "convert_to_fp16",
           "graph_precision"]
log = logging.getLogger(__name__)

PRECISION_KEY = METADATA_PRECISION_KEY  # metadata written into converted graphs: "fp16"
FP16_MAX = 65504.0
FP32_OPS = frozenset({
    "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
    "LpNormalization", "MeanVarianceNormalization", "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "CumSum", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "ArgMax", "ArgMin", "TopK", "Range",
    "CastLike",
})
_UNTYPED_OPS = frozenset({"Cast", "Shape", "Size", "Constant"})  # accept any input type; output type is fixed
# Ops allowed between an attention MatMul and its Softmax (scale, mask, layout): kept FP32 with the MatMul.
_LOGIT_CHAIN = frozenset({"Mul", "Div", "Add", "Sub", "Where", "Neg", "Reshape", "Transpose", "Squeeze",
                          "Unsqueeze", "Identity"})
_LOGIT_SOURCES = frozenset({"MatMul", "Gemm", "Einsum"})
ONNX_FLOAT, ONNX_FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16


@dataclass(frozen=True)
class Fp16Conversion:
    """What one conversion did, for the manifest entry (``ipiqa.manifest.Fp16Graph``) and the log."""

    path: Path
    fp32_nodes: tuple[str, ...]  # compute nodes kept in FP32 (islands)
    fp16_nodes: int
    casts: int


def _logit_nodes(nodes, producers: Mapping[str, int]) -> set[int]:
    """Indices of the MatMul feeding each Softmax and the elementwise ops between them."""
    marked: set[int] = set()
    for node in nodes:
        if node.op_type not in ("Softmax", "LogSoftmax"):
            continue
        stack = [node.input[0]]
        while stack:
            i = producers.get(stack.pop())
            if i is None or i in marked:
                continue
            src = nodes[i]
            if src.op_type in _LOGIT_SOURCES:
                marked.add(i)
            elif src.op_type in _LOGIT_CHAIN:
                marked.add(i)
                data = src.input[1:] if src.op_type == "Where" else src.input[:1] if src.op_type in (
                    "Reshape", "Squeeze", "Unsqueeze") else src.input
                stack.extend(t for t in data if t)
    return marked


def _constants_to_initializers(graph, numpy_helper) -> None:
    """Float ``Constant`` nodes become initializers, so FP16 consumers get converted weights, not casts."""
    keep = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and value.data_type == ONNX_FLOAT:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _float_slots(node, opset: int) -> Optional[tuple[list[int], list[int]]]:
    """Input and output positions whose type follows the node's float type parameter (schema-driven)."""
    defs = require("onnx", extra="export").defs
    try:
        schema = defs.get_schema(node.op_type, opset, node.domain)
    except Exception:  # noqa: BLE001 - unknown op or domain: the caller keeps it in FP32
        return None
    params = {c.type_param_str for c in schema.type_constraints
              if "tensor(float16)" in c.allowed_type_strs and "tensor(float)" in c.allowed_type_strs}

    def slots(formals, n: int) -> list[int]:
        if not formals:
            return []
        return [k for k in range(n) if formals[min(k, len(formals) - 1)].type_str in params]

    return slots(schema.inputs, len(node.input)), slots(schema.outputs, len(node.output))


def convert_to_fp16(src: Path, dst: Path, op_block_list: Collection[str] = FP32_OPS,
                    node_block_list: Collection[str] = (), attention_logits_fp32: bool = True) -> Fp16Conversion:
    """Write ``dst`` (+ ``dst.data``): ``src`` with FP16 weights and compute outside the FP32 islands.

    ``op_block_list``/``node_block_list`` name op types / node names kept in FP32; ``attention_logits_fp32``
    keeps each Softmax's producing MatMul and scale/mask ops in FP32 (turning it off exists to show the gate
    catching what it protects against).
    """
    onnx = require("onnx", extra="export")
    from onnx import helper, numpy_helper

    src, dst = Path(src), Path(dst)
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # noqa: BLE001
        raise IPIQAError(f"{src}: cannot load the FP32 graph ({exc}); re-export the bundle") from None
    graph = model.graph
    if any(a.type == onnx.AttributeProto.GRAPH for n in graph.node for a in n.attribute):
        raise IPIQAError(f"{src}: graphs with control flow (If/Loop/Scan) are not supported by the FP16 converter")
    _constants_to_initializers(graph, numpy_helper)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    del graph.value_info[:]  # stale once types change; re-inferred below
    # Types from the weightless graph: inference serializes the model, and weights may pass 2 GB.
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False), strict_mode=True)
    dtype = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    dtype.update({t.name: t.data_type for t in graph.initializer})
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    producers = {out: i for i, n in enumerate(nodes) for out in n.output}
    logits = _logit_nodes(nodes, producers) if attention_logits_fp32 else set()
    blocked_nodes = set(node_block_list)
    outputs = {o.name for o in graph.output}

    versions: dict[str, dict[int, str]] = {}  # original tensor -> {elem type: name holding it}
    new_inits: list = []
    new_nodes: list = []
    casts = 0

    def version(name: str, want: int) -> str:
        nonlocal casts
        have = versions.setdefault(name, {dtype.get(name, 0): name})
        if want in have:
            return have[want]
        alias = f"{name}__{'fp16' if want == ONNX_FLOAT16 else 'fp32'}"
        if name in inits:  # weights are converted once, offline: no Cast at run time
            arr = numpy_helper.to_array(inits[name])
            if want == ONNX_FLOAT16 and arr.size and np.abs(arr).max() > FP16_MAX:
                raise IPIQAError(f"{src}: initializer {name!r} exceeds the FP16 range (max |x| "
                                 f"{np.abs(arr).max():.3g}); add its consumer to node_block_list")
            new_inits.append(numpy_helper.from_array(arr.astype(np.float16 if want == ONNX_FLOAT16 else np.float32), alias))
        else:
            new_nodes.append(helper.make_node("Cast", [next(iter(have.values()))], [alias], to=want,
                                              name=f"{alias}_cast"))
            casts += 1
        have[want] = alias
        return alias

    fp32_names, fp16_count = [], 0
    for i, node in enumerate(nodes):
        slots = _float_slots(node, opset)
        if slots is None:  # an op this onnx does not know: computed in FP32 on FP32 inputs
            slots, known = ([k for k, t in enumerate(node.input) if dtype.get(t) == ONNX_FLOAT], []), False
        else:
            known = True
        ins, outs = slots
        touches_float = any(dtype.get(node.input[k]) == ONNX_FLOAT for k in ins if node.input[k])
        if node.op_type in _UNTYPED_OPS or not touches_float:
            new_nodes.append(node)  # shape arithmetic, casts, constants: untouched, any input version will do
            continue
        fp16 = known and not (node.op_type in op_block_list or node.name in blocked_nodes or i in logits)
        want = ONNX_FLOAT16 if fp16 else ONNX_FLOAT
        for k in ins:
            if node.input[k] and dtype.get(node.input[k]) == ONNX_FLOAT:
                node.input[k] = version(node.input[k], want)
        if not fp16:
            fp32_names.append(node.name or node.op_type)
            new_nodes.append(node)
            continue
        fp16_count += 1
        renamed = []
        for k in outs:
            out = node.output[k]
            if dtype.get(out) != ONNX_FLOAT:
                continue
            if out in outputs:  # graph outputs stay float32: compute in FP16, cast on the way out
                node.output[k] = f"{out}__fp16"
                renamed.append(out)
            versions[out] = {ONNX_FLOAT16: node.output[k]}
        new_nodes.append(node)
        for out in renamed:
            new_nodes.append(helper.make_node("Cast", [f"{out}__fp16"], [out], to=ONNX_FLOAT, name=f"{out}_cast"))
            versions[out][ONNX_FLOAT] = out
            casts += 1

    # Inputs of untouched nodes may have moved to an FP16 version: point them at whichever version exists.
    for node in new_nodes:
        for k, name in enumerate(node.input):
            have = versions.get(name)
            if have and name not in have.values():
                node.input[k] = next(iter(have.values()))
    used = {name for n in new_nodes for name in n.input} | outputs
    kept = [t for t in graph.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    # A weight used only in FP16 keeps its original name (readable graphs, refit by name).
    rename = {}
    for t in kept:
        base = t.name[:-len("__fp16")] if t.name.endswith("__fp16") else None
        if base and base not in used:
            rename[t.name] = base
    for t in kept:
        t.name = rename.get(t.name, t.name)
    for node in new_nodes:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    entry = model.metadata_props.add()
    entry.key, entry.value = PRECISION_KEY, "fp16"
    save_checked(model, dst, "FP16 graph")
    log.info("%s: %d nodes FP16, %d FP32, %d casts", dst.name, fp16_count, len(fp32_names), casts)
    return Fp16Conversion(dst, tuple(fp32_names), fp16_count, casts)


def graph_precision(path: Path) -> str:
    """``int8`` (has Q/DQ), ``fp16`` (has FP16 weights or casts) or ``fp32``, read from the graph itself."""
    onnx = require("onnx", extra="export")
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return "int8"
    if any(t.data_type == ONNX_FLOAT16 for t in model.graph.initializer) or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == ONNX_FLOAT16 for a in n.attribute) for n in model.graph.node):
        return "fp16"
    return "fp32"
