"""OpenVINO's own INT8 image graph: NNCF (``nncf.quantize``, its OpenVINO backend) on the FP32 image graph,
calibrated on the same images as the QDQ graph, saved as an OpenVINO IR and gated on the held-out images
through the runtime's ``OpenVinoBackend``, exactly as the QDQ graph is gated there (``int8.int8_checks``,
label ``openvino-int8``, the INT8 bounds).

Why a second INT8 graph: OpenVINO runs ONNX Runtime's QDQ graph, but its CPU plugin runs the FakeQuantize
layout NNCF writes for it faster: issue 30 measured an NNCF image graph 1.35x the QDQ graph's speed on OpenVINO
at batch 1 and 1.18x at batch 8 (RN50-512, same run); on a 2-core AMD EPYC (Zen 4, AVX512-VNNI), RN50-512 image
graph alone on OpenVINO, interleaved rounds: 28.96 against 20.59 img/s at batch 1 (1.41x), 29.81 against 23.77
at batch 8 (1.25x). NNCF's defaults for the CPU are kept (``NncfSettings``):
the performance preset (symmetric quantizers; an unsigned range after ReLU), per-channel weights, fast bias
correction.

Memory stays flat in the number of calibration images: the dataset is an iterable over the calibration
batches yielding one image per item (views, never copies; never a list of images), and NNCF's OpenVINO
backend reduces each statistic inside the graph (``inplace_statistics``: ReduceMin/ReduceMax/ReduceMean
outputs): the quantizers' ranges are running minima and maxima (NNCF's online aggregators), and the fast bias
correction keeps one per-channel mean per image and layer (its offline ``MeanAggregator``: kilobytes per image,
never activations). The layer ranking (``sensitive_layers``) runs one image at a time and keeps two
sums per activation, reading the outputs in place (no copies). Measured on RN50-512 (2-core AMD EPYC), peak
RSS: NNCF calibration 1.41 GB at 8 images, 1.43 GB at 32; the ranking 1.79 GB at 4 images and at 16.

Where the gate fails, the quantized layers that read the worst-quantized activations stay FP32 through NNCF's
``ignored_scope``, worst first, 1, 2, 4, ... layers, re-quantizing and re-gating each time (the QDQ graph's
rule, ``int8.quantize_and_gate``). The rank is the QDQ graph's measure applied to NNCF's graph: the
signal-to-quantization-noise ratio of each activation FakeQuantize's input against its output, on the
calibration images. A gate that still fails, or NNCF or OpenVINO raising, is a result, never the export's
failure: the caller records its reason, and OpenVINO INT8 falls back to the QDQ graph where that passed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from ipiqa._optional import require
from ipiqa.bundle import METADATA_PRECISION_KEY
from ipiqa.errors import IPIQAError

from .int8 import Int8Gate, int8_gate

__all__ = ["NNCF_FILE", "NNCF_SETTINGS_KEY", "NncfSettings", "OpenVinoInt8Result", "nncf_version",
           "calibration_images", "quantize_openvino", "sensitive_layers", "quantize_and_gate_openvino"]
log = logging.getLogger(__name__)

NNCF_FILE = "int8/image_encoder.openvino.xml"  # weights beside it: image_encoder.openvino.bin
NNCF_SETTINGS_KEY = "ipiqa.int8"  # the IR's rt_info ["framework", key]: the NncfSettings as JSON


def nncf_version() -> Optional[str]:
    """``nncf X`` where both NNCF and OpenVINO are installed (``ipiqa[openvino]``), else None: the stage's
    reuse key and the record's quantizer."""
    if importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None:
        return None
    from importlib import metadata

    return f"nncf {metadata.version('nncf')}"


@dataclass(frozen=True)
class NncfSettings:
    """Everything that decides the NNCF graph (``nncf.quantize``'s arguments); written into the manifest and
    the IR, as ``QuantSettings`` is for the QDQ graph."""

    quantizer: str  # "nncf 3.4.0"
    calibration_size: int  # images calibrated on (``subset_size``)
    preset: str = "performance"  # nncf.QuantizationPreset: symmetric quantizers (NNCF's CPU default)
    target_device: str = "CPU"
    fast_bias_correction: bool = True
    ignored: tuple[str, ...] = ()  # OpenVINO layer names kept FP32 (``ignored_scope``), found by the gate or given
    target: str = "openvino"  # for the gate record: which INT8 graph this is

    def __post_init__(self) -> None:
        if self.preset not in ("performance", "mixed"):
            raise ValueError(f"NNCF preset must be performance or mixed, got {self.preset!r}")
        if self.calibration_size < 1:
            raise ValueError(f"calibration_size must be >= 1, got {self.calibration_size}")
        object.__setattr__(self, "ignored", tuple(self.ignored))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class _Images:
    """The calibration batches as one image per item, re-iterable (NNCF may pass over it more than once),
    views of the batches: never a list of the images."""

    def __init__(self, batches: Sequence[np.ndarray], limit: int) -> None:
        self.batches, self.limit = batches, limit

    def __iter__(self) -> Iterator[np.ndarray]:
        n = 0
        for batch in self.batches:
            for i in range(len(batch)):
                if n >= self.limit:
                    return
                n += 1
                yield batch[i:i + 1]

    def __len__(self) -> int:
        return min(self.limit, sum(len(b) for b in self.batches))


def calibration_images(batches: Sequence[np.ndarray], limit: Optional[int] = None) -> _Images:
    """One image per item over ``batches`` (at most ``limit``): what NNCF and the ranking iterate."""
    return _Images(batches, limit if limit is not None else sum(len(b) for b in batches))


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF's notes (its logger, below ERROR) and progress bars (rich, on stdout) are not the export's log. Only
    the ``nncf`` logger's own level changes, and back: ``nncf.set_log_level`` would set the level of every handler
    on it for the whole process."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def quantize_openvino(fp32_onnx: Path, out_xml: Path, batches: Sequence[np.ndarray], settings: NncfSettings) -> NncfSettings:
    """Write the NNCF IR ``out_xml`` (+ ``.bin``), its rt_info carrying the FP32 graph's ipiqa config, the
    precision ``int8`` and the settings, so the runtime's graph-metadata check reads it as any other graph."""
    ov = require("openvino", extra="openvino")
    nncf = require("nncf", extra="openvino")
    images = calibration_images(batches, settings.calibration_size)
    n = len(images)
    if n == 0:
        raise IPIQAError(f"{fp32_onnx}: no calibration images; pass a folder or CSV of images like those you will score")
    settings = replace(settings, calibration_size=n)
    model = ov.Core().read_model(str(fp32_onnx))
    with _quiet_nncf():
        quantized = nncf.quantize(
            model, nncf.Dataset(images), preset=nncf.QuantizationPreset(settings.preset),
            target_device=nncf.TargetDevice[settings.target_device], subset_size=n,
            fast_bias_correction=settings.fast_bias_correction,
            ignored_scope=nncf.IgnoredScope(names=list(settings.ignored)) if settings.ignored else None)
    quantized.set_rt_info("int8", ["framework", METADATA_PRECISION_KEY])
    quantized.set_rt_info(json.dumps(settings.to_dict()), ["framework", NNCF_SETTINGS_KEY])
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)  # FP32 layers stay FP32
    log.info("%s: NNCF INT8 calibrated on %d images, %d layers FP32", out_xml.name, n, len(settings.ignored))
    return settings


def _activation_quantizers(model) -> list:
    """The IR's FakeQuantize nodes on activations (their input is computed, not a weight constant)."""
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
            and op.input_value(0).get_node().get_type_name() != "Constant"]


# Ops a quantizer passes through to the layer that reads it (NNCF propagates FakeQuantize above them): ignoring one of
# these in ``ignored_scope`` would change nothing, so the ranking names the layer below instead.
_PASS_THROUGH = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Gather", "Split", "VariadicSplit",
                           "StridedSlice", "Slice", "MaxPool", "Convert", "Broadcast", "Tile", "Pad", "DepthToSpace",
                           "SpaceToDepth", "ShuffleChannels", "ReduceMax"})


def _readers(output) -> list:
    """The layers a quantizer's output feeds, through quantization-agnostic ops; never a FakeQuantize or Result."""
    found, todo, seen = [], [output], set()
    while todo:
        for target in todo.pop().get_target_inputs():
            node = target.get_node()
            if node.get_friendly_name() in seen:
                continue
            seen.add(node.get_friendly_name())
            kind = node.get_type_name()
            if kind in _PASS_THROUGH:
                todo.extend(node.outputs())
            elif kind not in ("FakeQuantize", "Result"):
                found.append(node)
    return found


def sensitive_layers(int8_xml: Path, batches: Sequence[np.ndarray], limit: int = 16) -> list[str]:
    """The layers NNCF quantized, worst first: each FakeQuantize on an activation is ranked by the
    signal-to-quantization-noise ratio of its input against its output over up to ``limit`` calibration
    images (one per run; two sums per activation kept), and names the layers that read it, through the ops a
    quantizer passes through (``_PASS_THROUGH``: ignoring a Transpose would keep nothing FP32); the names
    ``ignored_scope`` takes. The QDQ graph's ranking (``quantize.sensitive_nodes``) on NNCF's graph."""
    ov = require("openvino", extra="openvino")
    core = ov.Core()
    model = core.read_model(str(int8_xml))
    quantizers = _activation_quantizers(model)
    if not quantizers:
        return []
    tensors: dict[tuple[str, int], str] = {}  # (producer, port) -> the name it is read back by
    names: list[str] = []
    known: dict[str, set] = {}
    for fq in quantizers:  # two quantizers may read one tensor: it is named (and output) once
        for port in (fq.input_value(0), fq.output(0)):
            where = (port.get_node().get_friendly_name(), port.get_index())
            if where not in tensors:
                tensors[where] = f"ipiqa.sqnr.{len(tensors)}"
                known[tensors[where]] = set(port.get_names()) | {tensors[where]}  # a graph output keeps its own
                port.get_tensor().add_names({tensors[where]})
            names.append(tensors[where])
    model.add_outputs(list(dict.fromkeys(names)))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    by_name = {n: o for o in compiled.outputs for n in o.get_names()}
    outputs = [next(by_name[n] for n in sorted(known[name]) if n in by_name) for name in names]
    signal, noise = np.zeros(len(quantizers)), np.zeros(len(quantizers))
    request = compiled.create_infer_request()
    for image in calibration_images(batches, limit):
        result = request.infer({0: image}, share_outputs=True)  # read before the next run: no copies
        for k in range(len(quantizers)):
            x = np.asarray(result[outputs[2 * k]], np.float64).reshape(-1)
            d = x - np.asarray(result[outputs[2 * k + 1]], np.float64).reshape(-1)
            signal[k] += float(x @ x)
            noise[k] += float(d @ d)
    eps = np.finfo("float").eps
    sqnr = [20 * math.log10(max(math.sqrt(s), eps) / max(math.sqrt(e), eps)) for s, e in zip(signal, noise)]
    ranked: dict[str, float] = {}
    for k in sorted(range(len(quantizers)), key=lambda k: sqnr[k]):
        for node in _readers(quantizers[k].output(0)):
            ranked.setdefault(node.get_friendly_name(), sqnr[k])
    return list(ranked)  # lowest SQNR first (dict order)


@dataclass(frozen=True)
class OpenVinoInt8Result:
    path: Path
    settings: NncfSettings
    gate: Int8Gate
    attempts: tuple[str, ...] = field(default=())  # one line per gate, for the log and the manifest


def quantize_and_gate_openvino(fp32: Mapping[str, Path], out_xml: Path, calibration: Iterable[np.ndarray],
                               held_out: np.ndarray, tokens: Optional[np.ndarray] = None, columns: Sequence[str] = (),
                               calibration_size: int = 64, max_excluded: int = 16,
                               reference: Optional[Mapping[str, np.ndarray]] = None,
                               ignored: Sequence[str] = ()) -> OpenVinoInt8Result:
    """Quantize with NNCF, gate through ``OpenVinoBackend``, and keep the worst layers FP32 (``ignored_scope``)
    until the gate passes or ``max_excluded`` layers are FP32. Returns the last gate, passed or not (the
    caller records it); NNCF or OpenVINO raising propagates (the caller records that too)."""
    from .graph_runs import run_graphs

    version = nncf_version()
    if version is None:
        raise IPIQAError("OpenVINO's own INT8 graph needs NNCF and OpenVINO: pip install 'ipiqa[openvino]'")
    batches = [np.asarray(b) for b in calibration]  # the caller's batches (views); images are fed one by one
    settings = NncfSettings(version, calibration_size, ignored=tuple(ignored))
    reference = run_graphs(fp32, held_out, tokens) if reference is None else reference

    def attempt(s: NncfSettings) -> tuple[NncfSettings, Int8Gate]:
        s = quantize_openvino(Path(fp32["image_encoder"]), out_xml, batches, s)
        return s, int8_gate(fp32, out_xml, s, held_out, tokens, columns, runtime="openvino",  # type: ignore[arg-type]
                            reference=reference)

    settings, gate = attempt(settings)
    attempts = [f"{len(settings.ignored)} ignored: {'PASS' if gate else 'FAIL'}"]
    if gate:
        return OpenVinoInt8Result(Path(out_xml), settings, gate, tuple(attempts))
    ranked = [n for n in sensitive_layers(Path(out_xml), batches) if n not in settings.ignored]
    count = 1
    while not gate and ranked and len(settings.ignored) < max_excluded:
        take = min(count, max_excluded - len(settings.ignored))
        extra, ranked, count = tuple(ranked[:take]), ranked[take:], count * 2
        settings, gate = attempt(replace(settings, ignored=settings.ignored + extra))
        attempts.append(f"{len(settings.ignored)} ignored ({', '.join(extra)}): {'PASS' if gate else 'FAIL'}")
        log.info("OpenVINO INT8 gate: %s", attempts[-1])
    return OpenVinoInt8Result(Path(out_xml), settings, gate, tuple(attempts))
