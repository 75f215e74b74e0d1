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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection, Iterable, Mapping, Optional, Union

import numpy as np

from ipiqa._optional import require
from ipiqa.bundle import METADATA_PRECISION_KEY
from ipiqa.errors import IPIQAError

from .checks import BOUNDS
from .parity import FP16_ATOL, ParityResult, compare
from .to_onnx import save_checked

__all__ = ["FP32_OPS", "PRECISION_KEY", "Fp16Graph", "convert_to_fp16", "graph_precision", "scores_spread",
           "run_graphs", "fp16_gate", "fp16_emulation", "ort_session", "score_results", "SPREAD_MIN",
           "FP16_COSINE", "CosineResult", "cosine_result",
           "EMBEDDING_SPREAD_MIN", "embedding_spread", "with_spread_note"]
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
_F32, _F16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
# Scores spread when a column's range over the gate inputs is this many times the FP16 bound: only then
# does the rank order carry information that rounding noise cannot reshuffle (an untrained model's
# scores sit within a few 1e-2 of each other).
SPREAD_MIN = 25 * FP16_ATOL
# Intermediate tensors (feature map, embeddings): per-row cosine to FP32. FP16 rounding alone gives
# > 0.99999 on RN50-512; a saturated or NaN tensor gives far less.
FP16_COSINE = BOUNDS["fp16"].cosine_min
# Embeddings whose mean cosine to their own mean over the gate inputs is above 1 - this barely depend on
# the input (the untrained demo model: 1 - 7.8e-6 on RN50-512). Any output near that mean then has a
# cosine near 1, a broken graph's included, and the result says so.
EMBEDDING_SPREAD_MIN = 1e-3


@dataclass(frozen=True)
class CosineResult:
    """Per-row cosine of an embedding against the reference: the criterion that still means something
    when an untrained model's scores barely move (``min_cosine`` over rows, ``max_abs`` reported)."""

    name: str
    min_cosine: float
    bound: float
    max_abs: float
    note: str = ""  # why the number may say little (e.g. embeddings that barely depend on the image)

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.min_cosine) and self.min_cosine >= self.bound)

    def __bool__(self) -> bool:
        return self.passed

    def line(self) -> str:
        return (f"{'PASS' if self.passed else 'FAIL'}  {self.name:<34} min cosine {self.min_cosine:.6f} "
                f"(min {self.bound})  max|d| {self.max_abs:.3e}" + (f"  [{self.note}]" if self.note else ""))

    def to_dict(self) -> dict:
        return {"name": self.name, "min_cosine": self.min_cosine, "bound": self.bound, "max_abs": self.max_abs,
                "passed": self.passed, "note": self.note}


def cosine_result(name: str, ref: np.ndarray, out: np.ndarray, bound: float) -> CosineResult:
    """Row-wise cosine (each row flattened); NaN or inf anywhere fails."""
    a = np.asarray(ref, np.float64).reshape(len(ref), -1)
    b = np.asarray(out, np.float64).reshape(len(out), -1)
    if a.shape != b.shape or not np.all(np.isfinite(b)):
        return CosineResult(name, float("nan"), bound, float("inf"))
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return CosineResult(name, float(((a * b).sum(1) / norms).min()), bound, float(np.abs(a - b).max()))


def embedding_spread(embeddings: np.ndarray) -> float:
    """Mean of 1 - cosine(embedding, mean embedding): 0 when every image gets the same embedding."""
    e = np.asarray(embeddings, np.float64).reshape(len(embeddings), -1)
    mean = e.mean(0)
    cos = e @ mean / np.maximum(np.linalg.norm(e, axis=1) * np.linalg.norm(mean), 1e-30)
    return float(np.mean(1.0 - cos))


def with_spread_note(result: CosineResult, ref: np.ndarray) -> CosineResult:
    """``result`` with a note when the reference embeddings barely depend on the input."""
    spread = embedding_spread(ref)
    if spread >= EMBEDDING_SPREAD_MIN:
        return result
    return replace(result, note=f"embeddings barely depend on the input (spread {spread:.1e}; untrained model?): "
                                "this cosine cannot tell a good graph from a bad one")


@dataclass(frozen=True)
class Fp16Graph:
    """What the conversion did, for the manifest and the log."""

    path: Path
    fp32_nodes: tuple[str, ...]  # compute nodes kept in FP32 (islands)
    fp16_nodes: int
    casts: int

    def to_dict(self) -> dict:
        return {"file": self.path.name, "fp32_nodes": list(self.fp32_nodes), "fp16_nodes": self.fp16_nodes,
                "casts": self.casts}


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
        if value is not None and value.data_type == _F32:
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
                    node_block_list: Collection[str] = (), attention_logits_fp32: bool = True) -> Fp16Graph:
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
        alias = f"{name}__{'fp16' if want == _F16 else 'fp32'}"
        if name in inits:  # weights are converted once, offline: no Cast at run time
            arr = numpy_helper.to_array(inits[name])
            if want == _F16 and arr.size and np.abs(arr).max() > FP16_MAX:
                raise IPIQAError(f"{src}: initializer {name!r} exceeds the FP16 range (max |x| "
                                 f"{np.abs(arr).max():.3g}); add its consumer to node_block_list")
            new_inits.append(numpy_helper.from_array(arr.astype(np.float16 if want == _F16 else np.float32), alias))
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
            slots, known = ([k for k, t in enumerate(node.input) if dtype.get(t) == _F32], []), False
        else:
            known = True
        ins, outs = slots
        touches_float = any(dtype.get(node.input[k]) == _F32 for k in ins if node.input[k])
        if node.op_type in _UNTYPED_OPS or not touches_float:
            new_nodes.append(node)  # shape arithmetic, casts, constants: untouched, any input version will do
            continue
        fp16 = known and not (node.op_type in op_block_list or node.name in blocked_nodes or i in logits)
        want = _F16 if fp16 else _F32
        for k in ins:
            if node.input[k] and dtype.get(node.input[k]) == _F32:
                node.input[k] = version(node.input[k], want)
        if not fp16:
            fp32_names.append(node.name or node.op_type)
            new_nodes.append(node)
            continue
        fp16_count += 1
        renamed = []
        for k in outs:
            out = node.output[k]
            if dtype.get(out) != _F32:
                continue
            if out in outputs:  # graph outputs stay float32: compute in FP16, cast on the way out
                node.output[k] = f"{out}__fp16"
                renamed.append(out)
            versions[out] = {_F16: node.output[k]}
        new_nodes.append(node)
        for out in renamed:
            new_nodes.append(helper.make_node("Cast", [f"{out}__fp16"], [out], to=_F32, name=f"{out}_cast"))
            versions[out][_F32] = out
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
    return Fp16Graph(dst, tuple(fp32_names), fp16_count, casts)


def graph_precision(path: Path) -> str:
    """``int8`` (has Q/DQ), ``fp16`` (has FP16 weights or casts) or ``fp32``, read from the graph itself."""
    onnx = require("onnx", extra="export")
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return "int8"
    if any(t.data_type == _F16 for t in model.graph.initializer) or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == _F16 for a in n.attribute) for n in model.graph.node):
        return "fp16"
    return "fp32"


def ort_session(source: Union[Path, bytes], threads: int = 0):
    """A CPU session for an FP32, FP16 or QDQ graph (a file, or a serialized model with its weights inline).

    ONNX Runtime 1.32's NCHWc layout pass (``NchwcTransformer``, which re-lays FP32 convolutions) crashes
    the process while loading the FP16 text graph; FP16 graphs are loaded without it.
    """
    ort = require("onnxruntime", extra="export")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    fp16 = not isinstance(source, bytes) and graph_precision(Path(source)) == "fp16"
    return ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                providers=["CPUExecutionProvider"],
                                disabled_optimizers=["NchwcTransformer"] if fp16 else [])


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
        if t.data_type == _F16:
            graph.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type in _MOVES_DATA:  # exact on values that are already FP16-rounded
            continue
        for k, out in enumerate(node.output):
            if types.get(out) != _F16:
                continue
            if node.op_type == "Cast":
                node.attribute[0].CopyFrom(helper.make_attribute("to", _F32))
            node.output[k] = f"{out}__emulated"
            nodes.append(helper.make_node("Cast", [f"{out}__emulated"], [f"{out}__rounded"], to=_F16))
            nodes.append(helper.make_node("Cast", [f"{out}__rounded"], [out], to=_F32))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    for value in list(graph.input) + list(graph.output):  # the bundle's graphs have none; kept general
        if value.type.tensor_type.elem_type == _F16:
            value.type.tensor_type.elem_type = _F32
    return model.SerializeToString()


def _batches(n: int, batch: int) -> Iterable[slice]:
    return (slice(i, min(i + batch, n)) for i in range(0, n, batch))


def run_graphs(paths: Mapping[str, Union[Path, bytes]], images: np.ndarray, tokens: Optional[np.ndarray] = None,
               batch: int = 16) -> dict[str, np.ndarray]:
    """The bundle's graphs composed on ONNX Runtime CPU: every intermediate tensor, every fusion output."""
    sessions = {name: ort_session(p) for name, p in paths.items()}
    if "text_embedding" in {i.name for i in sessions["fusion"].get_inputs()} and tokens is None:
        raise IPIQAError("this model's fusion graph reads a text embedding: pass tokens (one prompt per image)")
    out: dict[str, list] = {}
    for part in _batches(len(images), batch):
        feeds = dict(zip(("feature_map", "image_embedding"), sessions["image_encoder"].run(None, {"image": images[part]})))
        if "text_encoder" in sessions and tokens is not None:
            (feeds["text_embedding"],) = sessions["text_encoder"].run(None, {"tokens": tokens[part]})
        fusion = sessions["fusion"]
        names = [o.name for o in fusion.get_outputs()]  # scores, and the cross pool's gate-only ``pooled``
        feeds.update(zip(names, fusion.run(names, {i.name: feeds[i.name] for i in fusion.get_inputs()})))
        for k, v in feeds.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def scores_spread(ref: np.ndarray) -> np.ndarray:
    """Per score column: does the reference spread enough (``SPREAD_MIN``) for its rank order to mean anything?"""
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    return np.ptp(ref, axis=0) >= SPREAD_MIN


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
    """FP16 graphs against the FP32 graphs on ONNX Runtime CPU: end to end, and each graph alone.

    The FP16 graphs run as their ``fp16_emulation`` (ONNX Runtime CPU would skip their FP16 rounding).
    Each FP16 graph is also run with the other two in FP32, so a failure names the graph that caused it.
    Passes when every result passes: scores <= 2e-2 absolute and Spearman >= 0.999 where they spread;
    every intermediate tensor (feature map, embeddings) at per-row cosine >= ``FP16_COSINE``.
    """
    ref = run_graphs(fp32, images, tokens)
    emulated = {name: fp16_emulation(Path(p)) for name, p in fp16.items()}
    low = run_graphs(emulated, images, tokens)
    results: list = score_results("fp16[end_to_end]", ref["scores"], low["scores"], columns)
    results += [with_spread_note(cosine_result(f"fp16[end_to_end]/{k}", ref[k], low[k], FP16_COSINE), ref[k])
                for k in ref if k != "scores"]
    fusion32, fusion16 = ort_session(fp32["fusion"]), ort_session(emulated["fusion"])
    sources = {"image_encoder": ("feature_map", "image_embedding"), "text_encoder": ("text_embedding",)}
    for graph, session in (("image_encoder", fusion32), ("text_encoder", fusion32), ("fusion", fusion16)):
        if graph not in fp16:
            continue
        feeds = {**ref, **{k: low[k] for k in sources.get(graph, ())}}
        scores = np.concatenate([session.run(["scores"], {i.name: feeds[i.name][part] for i in session.get_inputs()})[0]
                                 for part in _batches(len(images), 16)])
        results += score_results(f"fp16[{graph}]", ref["scores"], scores, columns)
    return results
