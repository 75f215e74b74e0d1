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
from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from ipiqa._optional import require
from ipiqa.errors import IPIQAError
from ipiqa.metrics import srcc
from ipiqa.runtime.pipeline import load_input

from .checks import BOUNDS, bounds_for
from .fp16 import PRECISION_KEY, CosineResult, cosine_result, ort_session, run_graphs, scores_spread, with_spread_note

__all__ = ["QuantSettings", "TARGETS", "settings_for", "image_input", "image_rows", "image_files", "calibration_batches",
           "CalibrationSplit", "split_calibration", "held_out_images", "parse_setting",
           "quantize_image_graph", "int8_gate", "Int8Gate", "Int8GateError", "RankResult", "quantize_and_gate",
           "Int8Result", "INT8_COSINE", "INT8_SPEARMAN", "SETTINGS_KEY", "int8_checks"]
log = logging.getLogger(__name__)

INT8_COSINE = BOUNDS["int8"].cosine_min
INT8_SPEARMAN = BOUNDS["int8"].spearman_min
SETTINGS_KEY = "ipiqa.int8"  # graph metadata: the QuantSettings as JSON
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class QuantSettings:
    """Everything that decides the INT8 graph; written into the manifest so a bundle says how it was made."""

    target: str  # "cpu" | "tensorrt"
    activation_type: str  # "uint8" | "int8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: no u8 x s8 saturation on CPUs without VNNI
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    calibrate_method: str = "minmax"  # "minmax" | "entropy" | "percentile"
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    calibration_size: int = 64  # images used for calibration (at most)
    nodes_to_exclude: tuple[str, ...] = ()  # kept in FP32 (found by the gate, or given)
    quant_format: str = "QDQ"

    def __post_init__(self) -> None:
        problems = []
        if self.target not in ("cpu", "tensorrt"):
            problems.append(f"target must be cpu or tensorrt, got {self.target!r}")
        if self.activation_type not in ("uint8", "int8") or self.weight_type not in ("uint8", "int8"):
            problems.append(f"types must be uint8 or int8, got {self.activation_type}/{self.weight_type}")
        if self.calibrate_method not in ("minmax", "entropy", "percentile"):
            problems.append(f"calibrate_method must be minmax, entropy or percentile, got {self.calibrate_method!r}")
        if self.calibration_size < 1:
            problems.append(f"calibration_size must be >= 1, got {self.calibration_size}")
        if self.target == "tensorrt" and not (self.activation_type == self.weight_type == "int8"
                                              and self.activation_symmetric and self.weight_symmetric):
            problems.append("TensorRT takes symmetric int8 Q/DQ only (activation_type=weight_type=int8, symmetric)")
        if self.quant_format != "QDQ":
            problems.append("only the QDQ format is produced (TensorRT and ONNX Runtime both take it)")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))

    def to_dict(self) -> dict:
        """JSON-ready (lists, not tuples): what the manifest and the graph metadata store."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSettings":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown INT8 settings {sorted(unknown)} (written by a newer ipiqa?)")
        return cls(**data)


TARGETS = {
    "cpu": QuantSettings("cpu", activation_type="uint8", reduce_range=True),
    "tensorrt": QuantSettings("tensorrt", activation_type="int8", activation_symmetric=True),
}


def settings_for(target: str, **overrides) -> QuantSettings:
    """The target's measured defaults with the caller's overrides (unknown keys are an error)."""
    if target not in TARGETS:
        raise ValueError(f"INT8 target must be one of {', '.join(TARGETS)}, got {target!r}")
    unknown = set(overrides) - (set(QuantSettings.__dataclass_fields__) - {"target"})
    if unknown:
        raise ValueError(f"unknown INT8 settings {sorted(unknown)}; known: {sorted(QuantSettings.__dataclass_fields__)}")
    return replace(TARGETS[target], **overrides)


def parse_setting(text: str) -> tuple[Optional[str], str, object]:
    """``KEY=VALUE`` (every target) or ``TARGET.KEY=VALUE`` -> (target or None, key, value typed like the default).

    Booleans take true/false/1/0/yes/no; tuples (``op_types``, ``nodes_to_exclude``) a comma-separated list.
    """
    key, sep, raw = text.partition("=")
    target, _, key = key.strip().rpartition(".")
    target = target or None
    fields = set(QuantSettings.__dataclass_fields__) - {"target"}
    if not sep or key not in fields:
        raise ValueError(f"--int8-setting takes [TARGET.]KEY=VALUE with KEY one of {', '.join(sorted(fields))}, got {text!r}")
    if target is not None and target not in TARGETS:
        raise ValueError(f"--int8-setting {text!r}: target must be one of {', '.join(TARGETS)}")
    default, raw = getattr(TARGETS[target or "cpu"], key), raw.strip()
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"--int8-setting {text!r}: {key} is true or false")
        return target, key, raw.lower() in ("true", "1", "yes")
    if isinstance(default, int):
        try:
            return target, key, int(raw)
        except ValueError:
            raise ValueError(f"--int8-setting {text!r}: {key} is an integer") from None
    if isinstance(default, tuple):
        return target, key, tuple(v.strip() for v in raw.split(",") if v.strip())
    return target, key, raw


# --- calibration images ------------------------------------------------------------------------------

def image_input(path: Union[str, Path], resolution: int) -> np.ndarray:
    """One file as the image graph takes it: uint8 (R, R, 3), decoded and exactly resized (the runtime's own
    ``load_input``), so calibration sees what scoring will."""
    return load_input(str(path), resolution)


def image_rows(source: Union[str, Path]) -> list[tuple[Path, Optional[str]]]:
    """(image, prompt) pairs: a CSV's ``image`` column (relative to the CSV's folder) with its ``prompt``
    column where it has one (else None), or a folder's images, sorted, without prompts."""
    source = Path(source)
    if source.is_dir():
        rows = [(p, None) for p in sorted(source.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if "image" not in (reader.fieldnames or []):
                raise IPIQAError(f"{source}: no 'image' column (found {reader.fieldnames}); name the image paths 'image'")
            has_prompt = "prompt" in (reader.fieldnames or [])
            rows = [(source.parent / row["image"], (row.get("prompt") or "") if has_prompt else None)
                    for row in reader if row.get("image")]
    else:
        raise IPIQAError(f"{source}: calibration images must be a folder or a CSV with an 'image' column")
    if not rows:
        raise IPIQAError(f"{source}: no calibration images found ({', '.join(IMAGE_SUFFIXES)})")
    return rows


def image_files(source: Union[str, Path]) -> list[Path]:
    """Images named by a CSV's ``image`` column (relative to the CSV's folder) or found in a folder, sorted."""
    return [path for path, _ in image_rows(source)]


@dataclass(frozen=True)
class CalibrationSplit:
    """The user's images split once: calibration, and held-out images the gate judges (never calibrated on)."""

    calibration: tuple[Path, ...]
    held_out: tuple[Path, ...]
    prompts: Optional[tuple[str, ...]]  # the held-out images' prompts from a CSV's prompt column; None: none given


HELD_OUT_MIN, HELD_OUT_MAX, HELD_OUT_SHARE = 4, 32, 5  # held out: 1 in 5 of the images, at least 4, at most 32


def split_calibration(source: Union[str, Path], held_out: Optional[int] = None) -> CalibrationSplit:
    """Hold out ``held_out`` images (default: 1 in 5, 4 to 32), evenly spread over the list; calibrate on the rest.

    A file listed twice (one image, several prompts) is held out or calibrated on as a whole, so no held-out
    image is ever in the calibration set.
    """
    rows = image_rows(source)
    first: dict[Path, Optional[str]] = {}
    for path, prompt in rows:
        first.setdefault(path, prompt)
    files = list(first)
    n = held_out if held_out is not None else min(HELD_OUT_MAX, max(HELD_OUT_MIN, len(files) // HELD_OUT_SHARE))
    if n < 1 or len(files) < n + 1:
        raise IPIQAError(f"{source}: {len(files)} distinct images; the INT8 gate holds out {n} and calibrates on the "
                         f"rest: give at least {n + 1} (a few hundred like those you will score is better)")
    picks = set(np.linspace(0, len(files) - 1, n).round().astype(int).tolist())
    held = tuple(files[i] for i in sorted(picks))
    prompts = tuple(first[p] or "" for p in held) if any(pr is not None for pr in first.values()) else None
    return CalibrationSplit(tuple(f for i, f in enumerate(files) if i not in picks), held, prompts)


def held_out_images(split: CalibrationSplit, resolution: int) -> tuple[np.ndarray, Optional[list[str]]]:
    """The held-out images as the image graph takes them (unreadable ones skipped with a warning), with
    their prompts when the split has them."""
    images, prompts = [], []
    for k, path in enumerate(split.held_out):
        try:
            images.append(image_input(path, resolution))
        except IPIQAError as exc:
            log.warning("INT8 gate: held-out image skipped: %s (%s)", path, exc)
            continue
        prompts.append(split.prompts[k] if split.prompts is not None else "")
    if len(images) < 2:
        raise IPIQAError(f"only {len(images)} of {len(split.held_out)} held-out images could be read; the INT8 gate "
                         "needs at least 2: check the calibration files")
    return np.stack(images), (prompts if split.prompts is not None else None)


def calibration_batches(files: Sequence[Path], resolution: int, size: int, batch: int = 8) -> Iterator[np.ndarray]:
    """Up to ``size`` files, evenly spread over the list, preprocessed exactly as at scoring time.

    Unreadable files are skipped with a warning: one bad file should not stop an export.
    """
    picks = [files[int(i)] for i in np.linspace(0, len(files) - 1, min(size, len(files)))] if files else []
    chunk: list[np.ndarray] = []
    for path in dict.fromkeys(picks):
        try:
            chunk.append(image_input(path, resolution))
        except IPIQAError as exc:
            log.warning("calibration: skipped %s (%s)", path, exc)
            continue
        if len(chunk) == batch:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)


# --- quantization --------------------------------------------------------------------------------------

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


# --- the gate ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankResult:
    """One score column: Spearman gated only where the reference spreads; max |d| always reported."""

    name: str
    max_abs: float
    spearman: Optional[float]
    spearman_min: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs) and (self.spearman is None or self.spearman >= self.spearman_min))

    def __bool__(self) -> bool:
        return self.passed

    def line(self) -> str:
        rank = ("spearman not gated: held-out scores barely spread (untrained model?); the embedding decides"
                if self.spearman is None else f"spearman {self.spearman:.4f} (min {self.spearman_min})")
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<34} max|d| {self.max_abs:.3e}  {rank}"

    def to_dict(self) -> dict:
        return {"name": self.name, "max_abs": self.max_abs, "spearman": self.spearman,
                "spearman_min": self.spearman_min, "passed": self.passed,
                "note": "" if self.spearman is not None else
                "held-out scores barely spread (untrained model?): rank not gated, the embedding criterion decides"}


@dataclass(frozen=True)
class Int8Gate:
    settings: QuantSettings
    results: tuple[Union[CosineResult, RankResult], ...]
    held_out: int

    @property
    def passed(self) -> bool:
        return all(self.results)

    def __bool__(self) -> bool:
        return self.passed

    def table(self) -> str:
        return "\n".join(r.line() for r in self.results)

    @property
    def criterion(self) -> str:
        """What decided the gate, in words (an untrained model's scores cannot rank, so there it is the embedding)."""
        ranked = [r for r in self.results if isinstance(r, RankResult)]
        if ranked and all(r.spearman is None for r in ranked):
            return ("image-embedding cosine only: the held-out scores barely spread (untrained model?), so "
                    "Spearman is not gated")
        return "image-embedding cosine and Spearman of each spread score column"

    def to_dict(self) -> dict:
        return {"settings": self.settings.to_dict(), "held_out_images": self.held_out, "passed": self.passed,
                "criterion": self.criterion, "results": [r.to_dict() for r in self.results]}


class Int8GateError(IPIQAError):
    def __init__(self, gate: Int8Gate, path: Path):
        self.gate = gate
        super().__init__(f"{path}: the INT8 gate failed on {gate.held_out} held-out images even with "
                         f"{len(gate.settings.nodes_to_exclude)} layers kept in FP32:\n{gate.table()}\n"
                         "calibrate on more images like those you will score (--calibration-size), "
                         "or export without --int8")


def _int8_session(path: Path, target: str):
    """CPU: the optimized session the runtime runs (fused int8 kernels). TensorRT: Q/DQ executed as written
    (fake quantization in FP32), which is what TensorRT's explicit quantization computes exactly, without
    the CPU kernels' u8 x s8 saturation."""
    if target == "cpu":
        return ort_session(path)
    ort = require("onnxruntime", extra="export")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def int8_gate(fp32: Mapping[str, Path], int8_image: Path, settings: QuantSettings, images: np.ndarray,
              tokens: Optional[np.ndarray] = None, columns: Sequence[str] = ()) -> Int8Gate:
    """The INT8 image graph composed with the FP32 text and fusion graphs, against all-FP32, on ``images``."""
    ref = run_graphs(fp32, images, tokens)
    session = _int8_session(Path(int8_image), settings.target)
    fusion = ort_session(fp32["fusion"])
    emb, scores = [], []
    for i in range(0, len(images), 8):
        fmap_i, emb_i = session.run(None, {"image": images[i:i + 8]})
        feeds = {"feature_map": fmap_i, "image_embedding": emb_i,
                 **({"text_embedding": ref["text_embedding"][i:i + 8]} if "text_embedding" in ref else {})}
        scores.append(fusion.run(["scores"], {x.name: feeds[x.name] for x in fusion.get_inputs()})[0])
        emb.append(emb_i)
    results = int8_checks("int8", ref["image_embedding"], np.concatenate(emb), ref["scores"], np.concatenate(scores),
                          columns)
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
    ort = require("onnxruntime", extra="export")

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
    options = ort.SessionOptions()  # as qdq_loss_debug.collect_activations runs it: Q/DQ executed as written
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    sums = _SqnrSums(pairs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8-debug.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
        del model
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        reader = _reader(batches, session.get_inputs()[0].name)
        for feeds in iter(reader.get_next, None):
            sums.add({**feeds, **dict(zip(outputs, session.run(outputs, feeds)))})
        del session
    return sums.sqnr()


def _sensitive_nodes(fp32_onnx: Path, int8_onnx: Path, batches: Sequence[np.ndarray], op_types: Sequence[str]) -> list[str]:
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


@dataclass(frozen=True)
class Int8Result:
    path: Path
    gate: Int8Gate
    attempts: tuple[str, ...] = field(default=())  # one line per re-gate, for the log


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
    gate = int8_gate(fp32, out_onnx, settings, held_out, tokens, columns)
    attempts = [f"{len(settings.nodes_to_exclude)} excluded: {'PASS' if gate else 'FAIL'}"]
    if gate:
        return Int8Result(Path(out_onnx), gate, tuple(attempts))
    ranked = [n for n in _sensitive_nodes(image, Path(out_onnx), batches, settings.op_types)
              if n not in settings.nodes_to_exclude]
    count = 1
    while not gate and ranked and len(settings.nodes_to_exclude) < max_excluded:
        take = min(count, max_excluded - len(settings.nodes_to_exclude))
        extra, ranked, count = tuple(ranked[:take]), ranked[take:], count * 2
        overrides["nodes_to_exclude"] = settings.nodes_to_exclude + extra
        overrides["calibration_size"] = settings.calibration_size
        settings = quantize_image_graph(image, out_onnx, batches, target, **overrides)
        gate = int8_gate(fp32, out_onnx, settings, held_out, tokens, columns)
        attempts.append(f"{len(settings.nodes_to_exclude)} excluded ({', '.join(extra)}): {'PASS' if gate else 'FAIL'}")
        log.info("INT8 gate: %s", attempts[-1])
    if not gate:
        raise Int8GateError(gate, Path(out_onnx))
    return Int8Result(Path(out_onnx), gate, tuple(attempts))
