"""QDQ quantization of the image graph (ONNX Runtime's ``quantize_static``, one image per calibration run)
and the ranking of quantized layers by the signal-to-quantization-noise ratio of what each one reads, so the
gate can keep the worst in FP32. Memory stays flat in the number of images: see ``export.int8``.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ipiqa._optional import require
from ipiqa.errors import IPIQAError

from .fp16 import PRECISION_KEY
from .graph_runs import graph_session
from .int8_settings import SETTINGS_KEY, QuantSettings, settings_for

__all__ = ["CALIBRATION_RUN", "quantize_image_graph", "sensitive_nodes"]
log = logging.getLogger(__name__)


# Images per calibration (and layer-ranking) run. The augmented graph (every calibrated tensor kept for
# its ReduceMin/ReduceMax) costs ~0.5 GB per image at 512 px in one run, and ONNX Runtime's arena holds
# about twice one run's working set; 8 images per run peaked at 8.7 GB on RN50-512, one image at 2.0 GB
# and ran faster (2 cores). Ranges do not depend on how the images are grouped.
CALIBRATION_RUN = 1


def _reader(batches: Sequence[np.ndarray], input_name: str, run: int = CALIBRATION_RUN):
    """Calibration feeds: ``run`` images per ``get_next`` (views of the batches, never copies). ``__len__`` and
    ``set_range`` let ``quantize_static`` calibrate stride by stride (``CalibStridedMinMax``)."""
    from onnxruntime.quantization import CalibrationDataReader

    items = [b[i:i + run] for b in batches for i in range(0, len(b), run)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(items))

        def __len__(self) -> int:
            return len(items)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(items[start_index:end_index])

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self.set_range(0, len(items))

    return Reader()


def _input_name(path: Path) -> str:
    onnx = require("onnx", extra="export")
    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def quantize_image_graph(fp32_onnx: Path, out_onnx: Path, calibration: Iterable[np.ndarray],
                         target: str = "cpu", **overrides) -> QuantSettings:
    """Write the QDQ graph ``out_onnx`` (+ ``.data``) calibrated on ``calibration`` (batches of graph inputs)."""
    q = require("onnxruntime.quantization", extra="export")
    onnx = require("onnx", extra="export")
    settings = settings_for(target, **overrides)
    batches, n = [], 0
    for batch in calibration:
        batch = np.asarray(batch)[: settings.calibration_size - n]
        if len(batch):
            batches.append(batch)
            n += len(batch)
        if n >= settings.calibration_size:
            break
    if not batches:
        raise IPIQAError(f"{fp32_onnx}: no calibration images; pass a folder or CSV of images like those you will score")
    settings = replace(settings, calibration_size=n)
    qtype = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}
    method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
              "percentile": q.CalibrationMethod.Percentile}[settings.calibrate_method]
    out_onnx = Path(out_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    (out_onnx.parent / (out_onnx.name + ".data")).unlink(missing_ok=True)  # the writer appends to it otherwise
    q.quantize_static(
        str(fp32_onnx), str(out_onnx), _reader(batches, _input_name(Path(fp32_onnx))),
        quant_format=q.QuantFormat.QDQ, op_types_to_quantize=list(settings.op_types), per_channel=settings.per_channel,
        reduce_range=settings.reduce_range, activation_type=qtype[settings.activation_type],
        weight_type=qtype[settings.weight_type], nodes_to_exclude=list(settings.nodes_to_exclude),
        use_external_data_format=True, calibrate_method=method,
        # One collect_data per image: each computes that run's ranges and merges them into the running min/max
        # (calibrate.py MinMaxCalibrater.merge_range), so no run's outputs outlive it. Not CalibMaxIntermediate-
        # Outputs: in ONNX Runtime 1.32 it discards the held outputs without merging them (collect_data calls
        # clear_collected_data, not compute_data), which drops calibration images.
        extra_options={"ActivationSymmetric": settings.activation_symmetric,
                       "WeightSymmetric": settings.weight_symmetric, "CalibStridedMinMax": 1},
    )
    model = onnx.load(str(out_onnx), load_external_data=False)  # weights stay in the .data file beside it
    for key, value in ((PRECISION_KEY, "int8"), (SETTINGS_KEY, json.dumps(settings.to_dict()))):
        entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(out_onnx))
    log.info("%s: INT8 (%s) calibrated on %d images", out_onnx.name, settings.target, n)
    return settings


def _qdq_pairs(model, activations: Iterable[str]) -> dict[str, tuple[str, str]]:
    """activation -> (tensor before Q/DQ, tensor after) in a QDQ graph, for the named activations, paired by
    ONNX Runtime's own rule (``qdq_loss_debug.create_activation_matching``) applied to tensor names."""
    from onnxruntime.quantization import qdq_loss_debug as dbg

    wanted = set(activations)
    suffixes = ("", dbg.QUANT_INPUT_SUFFIX, dbg.DEQUANT_OUTPUT_SUFFIX, dbg.DEQUANT_OUTPUT_SUFFIX + "_1")
    names = [i.name for i in model.graph.input] + [o for n in model.graph.node for o in n.output]
    candidates = {t: t for t in names if any(t.endswith(x) and t[:len(t) - len(x)] in wanted for x in suffixes)}
    matching = dbg.create_activation_matching(candidates)  # names stand in for the tensors: same pairing
    return {act: (m["pre_qdq"], m["post_qdq"]) for act, m in matching.items() if act in wanted}


class _SqnrSums:
    """Per activation, the two sums its SQNR needs over every image seen: signal ||pre||^2 and noise
    ||pre - post||^2 (float64). State is two floats per activation: each run's tensors are dropped once added.

    ``sqnr`` is ``qdq_loss_debug.compute_signal_to_quantization_noice_ratio`` of the concatenated images:
    20 log10(max(||pre||, eps) / max(||pre - post||, eps)), eps = float64 epsilon."""

    def __init__(self, pairs: Mapping[str, tuple[str, str]]) -> None:
        self.pairs = dict(pairs)
        self.signal = dict.fromkeys(self.pairs, 0.0)
        self.noise = dict.fromkeys(self.pairs, 0.0)
        self.runs = 0

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        for act, (pre, post) in self.pairs.items():
            x = np.asarray(values[pre], np.float64).reshape(-1)
            d = x - np.asarray(values[post], np.float64).reshape(-1)
            self.signal[act] += float(x @ x)
            self.noise[act] += float(d @ d)
        self.runs += 1

    def sqnr(self) -> dict[str, float]:
        eps = np.finfo("float").eps
        return {act: 20 * math.log10(max(math.sqrt(self.signal[act]), eps) / max(math.sqrt(self.noise[act]), eps))
                for act in self.pairs}


def _activation_sqnr(int8_onnx: Path, batches: Sequence[np.ndarray], activations: Iterable[str]) -> dict[str, float]:
    """SQNR of each named activation across its Q/DQ pair in the INT8 graph, over ``batches``, one image per
    run: the graph is augmented with only those pairs as outputs, and each run's tensors are summed and dropped."""
    onnx = require("onnx", extra="export")

    model = onnx.load(str(int8_onnx), load_external_data=False)
    pairs = _qdq_pairs(model, activations)
    if not pairs:
        return {}
    inputs = {i.name for i in model.graph.input}
    outputs = list(dict.fromkeys(t for pair in pairs.values() for t in pair if t not in inputs))
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    onnx.external_data_helper.load_external_data_for_model(model, str(Path(int8_onnx).parent))
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None)
                              for t in outputs if t not in have)
    sums = _SqnrSums(pairs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8-debug.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
        del model
        session = graph_session(path, optimize=False)  # as qdq_loss_debug.collect_activations runs it: Q/DQ as written
        reader = _reader(batches, session.get_inputs()[0].name)
        for feeds in iter(reader.get_next, None):
            sums.add({**feeds, **dict(zip(outputs, session.run(outputs, feeds)))})
        del session
    return sums.sqnr()


def sensitive_nodes(fp32_onnx: Path, int8_onnx: Path, batches: Sequence[np.ndarray], op_types: Sequence[str]) -> list[str]:
    """Quantized nodes, worst first: ranked by the signal-to-quantization-noise ratio of the activation
    each one reads, before and after its Q/DQ pair in the INT8 graph, on the calibration images (the QDQ
    loss debugger's ``qdq_err``; computed image by image, so memory does not grow with the images). The FP32
    graph is not run: ``qdq_err`` reads the INT8 graph alone (the debugger's FP32 comparison, ``xmodel_err``,
    was computed and never read)."""
    onnx = require("onnx", extra="export")

    graph = onnx.load(str(fp32_onnx), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type in op_types and n.name and n.input]
    errors = _activation_sqnr(Path(int8_onnx), batches, {n.input[0] for n in nodes})
    ranked: dict[str, float] = {}
    for node in nodes:
        err = errors.get(node.input[0])
        if err is not None and np.isfinite(err):
            ranked[node.name] = float(err)
    return sorted(ranked, key=ranked.get)  # lowest SQNR first
