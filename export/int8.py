"""INT8 image graph: QDQ quantization calibrated on the user's images, gated on held-out images.

Only the image graph is quantized: it holds nearly all FLOPs (the RN50 trunk at 512 px); text embeddings
are cached per prompt and fusion is a few small products. Settings depend on where the graph runs:

- ``cpu``: activations uint8 (asymmetric), weights int8 per channel, ``reduce_range`` (7-bit weights). On
  AVX2 CPUs without VNNI, ONNX Runtime multiplies u8 x s8 pairs with ``vpmaddubsw``, whose 16-bit sums
  saturate; 7-bit weights keep them in range. Measured on the CI machine (AMD EPYC, 2 cores, AVX2, no
  VNNI), RN50-512 image graph, batch 4, FP32 and INT8 sessions interleaved in one process: median 2.37x
  over 6 rounds (3.0 -> 7.2 img/s with the cores contended, 7.7 -> 18.4 free); symmetric S8S8 ran 1.3x.
- ``tensorrt``: symmetric S8S8 QDQ (activations and weights symmetric, weights per channel): explicit
  quantization, the only INT8 form a strongly typed TensorRT network takes.

The gate compares the INT8 image graph with the FP32 graphs on held-out images (never the calibration
set): image-embedding cosine >= 0.995 for every image; where the held-out scores spread (a trained model),
Spearman >= 0.99 per score column; max |d| always reported. An untrained model's scores barely move, so
there the embedding criterion decides and the result says so; the untrained demo model's embeddings barely
move either (RN50-512: mean cosine to their mean 1 - 7.8e-6), so its 0.9996 says little, and the result
says that too. Layers that break the gate are ranked
by the signal-to-quantization-noise ratio of the activation each one reads (ONNX Runtime's QDQ loss
debugger's measure) and kept in FP32, worst first, re-gating each time.

Memory stays flat in the number of calibration images. Calibration runs one image at a time and ONNX
Runtime's calibrator merges each run's ranges into its running min/max before the next
(``CalibStridedMinMax``); the layer ranking runs the INT8 graph one image at a time with only the tensors
it compares as outputs, and keeps two sums per activation. Measured on RN50 at 512 px (2-core AMD EPYC,
``benchmarks/results/cpu-2core/export.md``), peak RSS: calibration 2.03 GB at 8 images, 2.07 GB at 64; the
layer ranking stays under that; a whole export whose gate fails once (rank, exclude, re-quantize, re-gate,
16 held out) 2.34 GB at 64. Before (8 images per run, every activation of every image kept for the
ranking): calibration 4.9 GB at 8 images, 8.7 GB from 16.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from ipiqa.errors import IPIQAError
from ipiqa.metrics import srcc

from .checks import BOUNDS, CosineResult, RankResult, bounds_for
from .graph_runs import graph_backend, run_graphs
from .int8_settings import QuantSettings
from .measures import cosine_result, scores_spread, with_spread_note
from .quantize import quantize_image_graph, sensitive_nodes

__all__ = ["int8_gate", "Int8Gate", "Int8GateError", "quantize_and_gate", "Int8Result", "INT8_COSINE",
           "INT8_SPEARMAN", "int8_checks"]
log = logging.getLogger(__name__)

INT8_COSINE = BOUNDS["int8"].cosine_min
INT8_SPEARMAN = BOUNDS["int8"].spearman_min


@dataclass(frozen=True)
class Int8Gate:
    settings: QuantSettings
    results: tuple[Union[CosineResult, RankResult], ...]
    held_out: int
    error: Optional[str] = None  # the runtime raised instead of running the set: a failed gate, with its reason

    @property
    def passed(self) -> bool:
        return self.error is None and all(self.results)

    def __bool__(self) -> bool:
        return self.passed

    def table(self) -> str:
        return "\n".join(r.line() for r in self.results)

    @property
    def criterion(self) -> str:
        """What decided the gate, in words (an untrained model's scores cannot rank, so there it is the embedding)."""
        if self.error is not None:
            return f"not judged: the runtime raised ({self.error})"
        ranked = [r for r in self.results if isinstance(r, RankResult)]
        if ranked and all(r.spearman is None for r in ranked):
            return ("image-embedding cosine only: the held-out scores barely spread (untrained model?), so "
                    "Spearman is not gated")
        return "image-embedding cosine and Spearman of each spread score column"

    def to_dict(self) -> dict:
        return {"settings": self.settings.to_dict(), "held_out_images": self.held_out, "passed": self.passed,
                "criterion": self.criterion, "results": [r.to_dict() for r in self.results],
                **({} if self.error is None else {"error": self.error})}


class Int8GateError(IPIQAError):
    def __init__(self, gate: Int8Gate, path: Path):
        self.gate = gate
        super().__init__(f"{path}: the INT8 gate failed on {gate.held_out} held-out images even with "
                         f"{len(gate.settings.nodes_to_exclude)} layers kept in FP32:\n{gate.table()}\n"
                         "calibrate on more images like those you will score (--calibration-size), "
                         "or export without --int8")


def int8_gate(fp32: Mapping[str, Path], int8_image: Path, settings: QuantSettings, images: np.ndarray,
              tokens: Optional[np.ndarray] = None, columns: Sequence[str] = (), runtime: str = "onnxruntime",
              reference: Optional[Mapping[str, np.ndarray]] = None) -> Int8Gate:
    """The INT8 image graph composed with the FP32 text and fusion graphs, against all-FP32, on ``images``.

    Through the runtime's ``OrtBackend`` on the set it serves (``OrtBackend.from_graphs``: the manifest is
    written only once every gate has passed). CPU target: optimized, the fused int8 kernels the served
    backend runs. TensorRT target: Q/DQ executed as written (fake quantization in FP32), which is what
    TensorRT's explicit quantization computes exactly, without the CPU kernels' u8 x s8 saturation.
    ``runtime="openvino"``: the same set through ``OpenVinoBackend`` (its int8 kernels), checks named
    ``openvino-int8/...``: what lets ``--precision auto`` serve INT8 there. ``reference``: the FP32 graphs'
    outputs on these images (``run_graphs``), computed once by a caller that gates more than once.
    """
    ref = run_graphs(fp32, images, tokens) if reference is None else reference
    served = {**fp32, "image_encoder": Path(int8_image)}  # the set OrtBackend(manifest, precision="int8") serves
    if runtime == "openvino":
        from ipiqa.runtime.backends.openvino import OpenVinoBackend

        backend, label = OpenVinoBackend.from_graphs(served, "int8"), "openvino-int8"
    else:
        backend, label = graph_backend(served, "int8", optimize=settings.target == "cpu"), "int8"
    with backend:
        low = run_graphs(backend, images, tokens, batch=8)
    results = int8_checks(label, ref["image_embedding"], low["image_embedding"], ref["scores"], low["scores"], columns)
    return Int8Gate(settings, tuple(results), len(images))


def int8_checks(label: str, ref_embedding: np.ndarray, embedding: np.ndarray, ref_scores: np.ndarray,
                scores: np.ndarray, columns: Sequence[str] = ()) -> list[Union[CosineResult, RankResult]]:
    """The INT8 criterion, for the CPU graph and the TensorRT engines alike (bounds: ``checks.BOUNDS["int8"]``):
    image-embedding cosine for every held-out image, and Spearman of each score column where the reference
    spreads; max |d| reported."""
    bounds = bounds_for("int8")
    ref_scores, scores = ref_scores.reshape(len(ref_scores), -1), np.asarray(scores).reshape(len(scores), -1)
    results: list = [with_spread_note(cosine_result(f"{label}/image_embedding", ref_embedding, embedding,
                                                    bounds.cosine_min), ref_embedding)]
    names = list(columns) or [str(j) for j in range(ref_scores.shape[1])]
    for j, spread in enumerate(scores_spread(ref_scores)):
        finite = scores.shape == ref_scores.shape and bool(np.all(np.isfinite(scores[:, j])))
        max_abs = float(np.abs(scores[:, j] - ref_scores[:, j]).max()) if finite else float("inf")
        rho = float(srcc(scores[:, j], ref_scores[:, j])) if spread and finite else None
        results.append(RankResult(f"{label}/scores/{names[j]}", max_abs, rho, bounds.spearman_min))
    return results


@dataclass(frozen=True)
class Int8Result:
    path: Path
    gate: Int8Gate
    attempts: tuple[str, ...] = field(default=())  # one line per re-gate, for the log
    reference: Mapping[str, np.ndarray] = field(default_factory=dict)  # FP32 outputs on the held-out images


def quantize_and_gate(fp32: Mapping[str, Path], out_onnx: Path, calibration: Iterable[np.ndarray],
                      held_out: np.ndarray, tokens: Optional[np.ndarray] = None, target: str = "cpu",
                      columns: Sequence[str] = (), max_excluded: int = 16, **overrides) -> Int8Result:
    """Quantize the image graph, gate it, and keep the most damaged layers in FP32 until it passes.

    Exclusions grow 1, 2, 4, ... up to ``max_excluded`` nodes; still failing raises Int8GateError with the
    table. ``held_out`` must not overlap the calibration images.
    """
    batches = [np.asarray(b) for b in calibration]
    image = Path(fp32["image_encoder"])
    settings = quantize_image_graph(image, out_onnx, batches, target, **overrides)
    reference = run_graphs(fp32, held_out, tokens)  # once: every re-gate compares against the same FP32 outputs
    gate = int8_gate(fp32, out_onnx, settings, held_out, tokens, columns, reference=reference)
    attempts = [f"{len(settings.nodes_to_exclude)} excluded: {'PASS' if gate else 'FAIL'}"]
    if gate:
        return Int8Result(Path(out_onnx), gate, tuple(attempts), reference)
    ranked = [n for n in sensitive_nodes(image, Path(out_onnx), batches, settings.op_types)
              if n not in settings.nodes_to_exclude]
    count = 1
    while not gate and ranked and len(settings.nodes_to_exclude) < max_excluded:
        take = min(count, max_excluded - len(settings.nodes_to_exclude))
        extra, ranked, count = tuple(ranked[:take]), ranked[take:], count * 2
        overrides["nodes_to_exclude"] = settings.nodes_to_exclude + extra
        overrides["calibration_size"] = settings.calibration_size
        settings = quantize_image_graph(image, out_onnx, batches, target, **overrides)
        gate = int8_gate(fp32, out_onnx, settings, held_out, tokens, columns, reference=reference)
        attempts.append(f"{len(settings.nodes_to_exclude)} excluded ({', '.join(extra)}): {'PASS' if gate else 'FAIL'}")
        log.info("INT8 gate: %s", attempts[-1])
    if not gate:
        raise Int8GateError(gate, Path(out_onnx))
    return Int8Result(Path(out_onnx), gate, tuple(attempts), reference)
