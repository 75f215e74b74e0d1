"""INT8 text graph for the CPU: the transformer's MatMul/Gemm weights quantized per channel, activations
quantized dynamically (per call, from each tensor's own range: no calibration set), gated per prompt.

Why: the prompt cache hides the text graph only when many images share a prompt; at ~1 image per prompt
(AIGCQA-20k: 1.03) it runs FP32 for nearly every image while the image graph runs INT8 (issue 30).

What stays exact: only MatMul/Gemm with a constant weight are quantized (ONNX Runtime's dynamic quantizer,
``MatMulConstBOnly``), so attention's activation x activation products, softmax, LayerNorm, the end-of-text
ArgMax over the token ids and the gather of that row keep FP32. ``eot_path_problem`` checks the last two on
the written graph: nothing between the ``tokens`` input and the gather's index may quantize or narrow a type.

The gate (``text_int8_gate``): the INT8 text graph through the runtime's own ``OrtBackend`` against the FP32
one, per prompt, text-embedding cosine >= ``BOUNDS["int8"].cosine_min`` (0.995, the INT8 image bound), over
the gate's adversarial prompts and every distinct prompt of the three label files (``prompt_sets``), streamed
batch by batch. Not fatal: a failed gate is recorded and the FP32 text graph is served, as before.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

import numpy as np

from ipiqa._optional import require

from .checks import BOUNDS
from .fp16 import PRECISION_KEY

if TYPE_CHECKING:
    from .text_reference import TextReference

__all__ = ["TEXT_OP_TYPES", "TEXT_SETTINGS", "TEXT_GATE_PROMPTS", "TextInt8Gate", "quantize_text_graph",
           "eot_path_problem", "text_int8_gate", "text_gate_prompts", "compare_text"]

TEXT_OP_TYPES = ("MatMul", "Gemm")
# reduce_range (7-bit weights): as the CPU image graph, u8 x s8 products on AVX2 CPUs without VNNI sum in 16 bits.
TEXT_SETTINGS = {"op_types": list(TEXT_OP_TYPES), "per_channel": True, "weight_type": "int8",
                 "activations": "uint8, dynamic (per call)", "reduce_range": True, "constant_weights_only": True}
TEXT_SETTINGS_KEY = "ipiqa.int8_text"
# What may lie between ``tokens`` and the gather's index: integer/index plumbing, FP32 or INT64 casts.
_INDEX_OPS = {"Cast", "ArgMax", "Unsqueeze", "Expand", "Reshape", "Identity", "Squeeze", "Flatten"}
_EXACT_TYPES = {1, 6, 7}  # FLOAT, INT32, INT64 (onnx.TensorProto)
# Beyond the parity gate's four: lengths and scripts real prompts have (cut at 77 tokens, blank, symbols).
TEXT_GATE_PROMPTS = ("", " ", "a" * 76, "a " * 76, "word " * 3000, "🎉🔥 emoji 😀👍🏽", "中文提示词，高清",
                     "&lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39;", "<start_of_text> literal <end_of_text> tokens",
                     "MiXeD CaSe 123 4.5e6, (masterpiece:1.2), [best quality], 8k uhd")


def text_gate_prompts(datasets: Optional[Path]) -> tuple[list[str], str]:
    """(prompts, where they came from): the gate's own adversarial prompts, then every distinct prompt of the
    three label files when ``datasets`` holds them (None: the gate's own prompts only, and the source says so)."""
    from .gate import PARITY_PROMPTS
    from .prompt_sets import distinct_prompts

    own = list(dict.fromkeys([*PARITY_PROMPTS, *TEXT_GATE_PROMPTS]))
    if datasets is None:
        return own, f"the gate's {len(own)} prompts only (no label files in ../shared/datasets)"
    real = [p for p in distinct_prompts(datasets) if p not in set(own)]
    return own + real, f"the gate's {len(own)} prompts + {len(real)} distinct prompts of {datasets}"


class _NoPreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_text_graph(fp32_text: Path, out_onnx: Path, nodes_to_exclude: Sequence[str] = (),
                        reduce_range: bool = TEXT_SETTINGS["reduce_range"]) -> dict:
    """Write the INT8 text graph ``out_onnx`` (+ ``.data``); returns the settings recorded beside it."""
    q = require("onnxruntime.quantization", extra="export")
    onnx = require("onnx", extra="export")
    out_onnx = Path(out_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    (out_onnx.parent / (out_onnx.name + ".data")).unlink(missing_ok=True)  # the writer appends to it otherwise
    quiet = _NoPreprocessingAdvice()  # the quantizer advises shape pre-processing on the root logger each call
    logging.getLogger().addFilter(quiet)
    try:
        q.quantize_dynamic(str(fp32_text), str(out_onnx), op_types_to_quantize=list(TEXT_OP_TYPES), per_channel=True,
                           reduce_range=reduce_range, weight_type=q.QuantType.QInt8,
                           nodes_to_exclude=list(nodes_to_exclude), use_external_data_format=True,
                           extra_options={"MatMulConstBOnly": True})  # attention's activation products stay FP32
    finally:
        logging.getLogger().removeFilter(quiet)
    settings = {**TEXT_SETTINGS, "reduce_range": reduce_range, "nodes_to_exclude": list(nodes_to_exclude)}
    model = onnx.load(str(out_onnx), load_external_data=False)
    for key, value in ((PRECISION_KEY, "int8"), (TEXT_SETTINGS_KEY, json.dumps(settings))):
        entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(out_onnx))
    return settings


def eot_path_problem(graph_file: Path) -> Optional[str]:
    """None when the end-of-text lookup is exact in ``graph_file``, else why not: the ArgMax must read the
    ``tokens`` input through FP32/integer casts only, and the gather's index must come from it through index
    plumbing only (no Q/DQ, no FP16/BF16 cast on the way)."""
    onnx = require("onnx", extra="export")
    model = onnx.load(str(graph_file), load_external_data=False)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    argmax = [n for n in g.node if n.op_type == "ArgMax"]
    if len(argmax) != 1:
        return f"{len(argmax)} ArgMax nodes (the end-of-text search is one ArgMax over the token ids)"

    def narrowing(node) -> Optional[str]:
        if node.op_type not in _INDEX_OPS:
            return f"{node.op_type} node {node.name!r} on the end-of-text path"
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to not in _EXACT_TYPES:
            return f"Cast node {node.name!r} to {onnx.TensorProto.DataType.Name(to)} on the end-of-text path"
        return None

    tensor = argmax[0].input[0]
    while tensor != "tokens":  # back from the ArgMax to the graph input, one producer at a time
        node = producer.get(tensor)
        if node is None:
            return f"the ArgMax does not read the tokens input (reads {tensor!r})"
        if (problem := narrowing(node)) is not None:
            return problem
        tensor = node.input[0]
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    frontier, gathers = list(argmax[0].output), []
    while frontier:  # forward from the ArgMax to the gather that reads the row
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in ("GatherElements", "Gather", "GatherND"):
                gathers.append(node)
                continue
            if (problem := narrowing(node)) is not None:
                return problem
            frontier.extend(node.output)
    if len(gathers) != 1:
        return f"the end-of-text index feeds {len(gathers)} gathers, expected one"
    return None


@dataclass(frozen=True)
class TextInt8Gate:
    """Per-prompt text-embedding cosine of a reduced-precision text graph against FP32 (INT8 here; the BF16 text
    gate, ``export.text_bf16``, reads the same record with its own ``label`` and bound), and the end-of-text
    path check."""

    min_cosine: float
    max_abs: float
    prompts: int
    prompt_source: str
    bound: float
    eot_problem: Optional[str] = None
    worst_prompt: str = ""  # the first 80 characters of the prompt with the lowest cosine
    label: str = "int8"

    @property
    def passed(self) -> bool:
        return self.eot_problem is None and bool(np.isfinite(self.min_cosine)) and self.min_cosine >= self.bound

    def __bool__(self) -> bool:
        return self.passed

    def line(self) -> str:
        why = f"; end-of-text path not exact: {self.eot_problem}" if self.eot_problem else ""
        return (f"{'PASS' if self.passed else 'FAIL'} {self.label}/text_embedding: min cosine {self.min_cosine:.6f} "
                f"(bound {self.bound}) over {self.prompts} prompts, max|d| {self.max_abs:.3g}{why}")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "min_cosine": self.min_cosine, "max_abs": self.max_abs, "prompts": self.prompts,
                "prompt_source": self.prompt_source, "bound": self.bound, "eot_problem": self.eot_problem,
                "worst_prompt": self.worst_prompt}


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.all(np.isfinite(b)):
        return np.full(len(a), np.nan)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def compare_text(reference: TextReference, low) -> tuple[float, float, int]:
    """(min cosine, max |d|, index of the worst prompt) of backend ``low``'s text embeddings against the FP32
    ``reference``'s, a batch at a time (memory flat in the number of prompts); a non-finite row stops at NaN."""
    worst, worst_i, max_abs = np.inf, 0, 0.0
    for start, tokens, a in reference.batches():
        b = low.encode_text(tokens)
        cos = _row_cosines(a, b)
        i = int(np.argmin(np.nan_to_num(cos, nan=-np.inf)))
        if not np.isfinite(cos[i]) or cos[i] < worst:
            worst, worst_i = (float(cos[i]) if np.isfinite(cos[i]) else float("nan")), start + i
            if np.isnan(worst):
                break
        max_abs = max(max_abs, float(np.abs(np.asarray(a) - np.asarray(b)).max()))
    return worst, max_abs, worst_i


def text_int8_gate(fp32: Mapping[str, Path], int8_text: Path, prompts: Iterable[str], tokenize, source: str = "",
                   batch: int = 64, reference: Optional[TextReference] = None) -> TextInt8Gate:
    """The INT8 text graph in the set ``OrtBackend`` serves for int8 (image INT8 or FP32 alike: only the text
    graph is judged here) against the FP32 graphs' text embeddings, prompt by prompt, ``batch`` at a time
    (memory flat in the number of prompts). ``tokenize``: prompts -> int64 (B, context_length). ``reference``:
    the export's shared FP32 embeddings of these prompts (``TextReference``), else computed here."""
    from .graph_runs import graph_backend
    from .text_reference import TextReference

    prompts = list(prompts)
    reference = reference or TextReference(fp32, prompts, tokenize, batch)
    reference.check_prompts(prompts)
    with graph_backend({**fp32, "text_encoder": Path(int8_text)}, "int8") as low:
        worst, max_abs, worst_i = compare_text(reference, low)
    return TextInt8Gate(worst, max_abs, len(prompts), source, BOUNDS["int8"].cosine_min, eot_path_problem(Path(int8_text)),
                        prompts[worst_i][:80] if prompts else "")
