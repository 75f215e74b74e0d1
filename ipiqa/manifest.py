"""The bundle manifest as frozen dataclasses: what ``manifest.json`` holds, typed and validated.

Done the way ``IPIQAConfig`` is: each class validates itself in ``__post_init__``; ``from_dict`` rejects
unknown keys and names missing ones by their path in the file (``onnx.graphs.fusion.file``), so a manifest
from another ipiqa is refused with the key that differs rather than misread. ``to_json`` writes the same
nested layout, indented, keys sorted: the file stays the one a person reads.

Only what something reads is stored. I/O shapes are not: they follow from the config (``io_shapes``). The
tokenizer entry lists its files only: the context length is the config's, the special token ids live in
``runtime/tokenizer.py``. Parity records are kept exactly as ``export.parity.ParityResult.to_dict()`` (and
the INT8 gate's ``to_dict()``) write them, so ``ipiqa info`` shows what the export measured.
Torch-free: the runtime reads this module.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .config import IPIQAConfig
from .typed_json import ManifestError, _need, load_typed, to_plain
from .errors import BundleError
from .rebuild import rebuild_command

__all__ = ["BUNDLE_FORMAT", "GRAPHS", "PRECISIONS", "ManifestError", "GraphEntry", "Fp16Graph", "Fp16Graphs", "Bf16Gate",
           "Int8Calibration", "Int8Graph", "Int8TextGraph", "Bf16TextGate", "OnnxGraphs", "EngineGraph", "Engines", "Tokenizer", "Source",
           "Parity", "Manifest", "io_shapes", "check_batch_profile", "to_plain"]

# 3: the manifest is the typed ``Manifest`` below: ``shapes`` (derived from the config), ``preprocess`` and
# ``outputs`` (copies of the config), the tokenizer's context length and token ids, ``onnx.precision(s)``
# (derived) are gone, and ``source.onnx_key`` is ``source.key``, a hash of the traced weights.
# 2: the image graph takes uint8 (B, R, R, 3) and normalizes inside (format 1: float32 NCHW input).
BUNDLE_FORMAT = "ipiqa-bundle/3"
FORMAT_CHANGES = {
    "ipiqa-bundle/1": "format 2 feeds the image graph uint8 (B, R, R, 3) and normalizes inside it",
    "ipiqa-bundle/2": "format 3 types the manifest: shapes come from the config, and 'shapes', 'preprocess', "
                      "'outputs' and the tokenizer's ids are no longer stored",
}
GRAPHS = ("image_encoder", "text_encoder", "fusion")
PRECISIONS = ("fp32", "fp16", "int8")  # of graph files and engines; bf16 is an OpenVINO inference precision
INT8_TARGETS = ("cpu", "tensorrt")

Shape = tuple[Optional[int], ...]


def weights_file(graph: str) -> str:
    """The weights file that travels beside a graph file: an ONNX graph's external data (``FILE.data``), an
    OpenVINO IR's ``.bin``. The one rule for what the manifest hashes, the compile cache keys and a copy carries."""
    return graph[:-len(".xml")] + ".bin" if graph.endswith(".xml") else graph + ".data"


def check_batch_profile(batch: Any) -> tuple[int, int, int]:
    """(min, opt, max) of a TensorRT optimization profile: three integers, 1 <= MIN <= OPT <= MAX.

    The one check behind ``--batch`` (``ipiqa.bundle.parse_batch_profile``), ``export.trt.EngineSpec`` and the
    manifest's ``engines.batch``."""
    values = tuple(batch)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"batch profile must be three integers MIN,OPT,MAX, got {list(values)}")
    lo, opt, hi = values
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch profile needs 1 <= MIN <= OPT <= MAX, got {list(values)}")
    return lo, opt, hi


def io_shapes(cfg: IPIQAConfig) -> dict[str, tuple[Shape, str]]:
    """Every graph tensor's shape (batch axis ``None``) and numpy dtype name, from the config alone.

    The one place shapes are written down: the exporter's engine profiles, ``TrtBackend``'s check of the
    engines, Triton's configs and the tests read it; the manifest does not store them.
    """
    r, g = cfg.resolution, cfg.grid
    shapes: dict[str, tuple[Shape, str]] = {
        "image": ((None, r, r, 3), "uint8"),
        "feature_map": ((None, cfg.feature_dim, g, g), "float32"),
        "image_embedding": ((None, cfg.embed_dim), "float32"),
        "scores": ((None, cfg.num_outputs), "float32"),
    }
    if cfg.text:
        shapes.update({"tokens": ((None, cfg.context_length), "int64"),
                       "text_embedding": ((None, cfg.embed_dim), "float32"),
                       "pooled": ((None, cfg.embed_dim), "float32")})  # fusion's gate-only output
    return shapes


@dataclass(frozen=True)
class GraphEntry:
    """One FP32 ONNX graph (``onnx.graphs.<name>``)."""

    file: str  # relative to the bundle; weights beside it in FILE.data
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # what scoring reads (and engines produce)
    gate_outputs: tuple[str, ...] = ()  # graph outputs only the parity gate reads (fusion's ``pooled``)


@dataclass(frozen=True)
class Fp16Graph:
    """One ``fp16/`` graph and how much of it runs in FP16."""

    file: str
    fp16_nodes: int
    fp32_nodes: int  # the FP32 islands (export.fp16.FP32_OPS)
    casts: int


@dataclass(frozen=True)
class Fp16Graphs:
    """``onnx.fp16``: the converted graphs and the FP16 gate that admitted them."""

    key: str  # reuse key: FP32 graphs + gate size
    gate_images: int
    graphs: Mapping[str, Fp16Graph]
    gate: tuple[dict[str, Any], ...]  # ParityResult / CosineResult records, one per check
    islands: str = ""  # which ops stay FP32, in words
    seconds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Bf16Gate:
    """``onnx.bf16``: the FP32 graphs passed the BF16 gate on OpenVINO. No files of its own: BF16 is how
    OpenVINO runs the FP32 graphs (``served``: each graph's inference precision; the text graph stays FP32)."""

    key: str  # reuse key: FP32 graphs + gate size + OpenVINO version + CPU
    runtime: str  # e.g. "openvino 2026.4.1": the kernels that were gated
    cpu: str  # the gating machine's CPU model and its BF16 flags
    gate_images: int
    served: Mapping[str, str]  # graph -> "bf16" | "fp32"
    gate: tuple[dict[str, Any], ...]  # check records (export.checks), one per check
    seconds: float = 0.0


@dataclass(frozen=True)
class Int8Calibration:
    source: str  # the folder or CSV given to --calibration
    images: int  # used to calibrate
    held_out: int  # gated on
    held_out_prompts: str  # where the held-out prompts came from


@dataclass(frozen=True)
class Int8Graph:
    """``onnx.int8.<target>``: the INT8 image graph quantized for one target, its settings and gate."""

    file: str
    target: str  # "cpu" (ONNX Runtime) | "tensorrt" (engines)
    key: str
    settings: Mapping[str, Any]  # export.int8.QuantSettings.to_dict()
    gate: Mapping[str, Any]  # export.int8.Int8Gate.to_dict()
    criterion: str  # which rule decided the gate
    calibration: Int8Calibration
    serves: str = ""
    excluded_nodes: tuple[str, ...] = ()
    attempts: tuple[str, ...] = ()
    seconds: float = 0.0
    # cpu target, where openvino was installed at export: OpenVINO's INT8 image graph, gated on the same held-out
    # images ({"runtime": "openvino X", "quantizer": "nncf X" | "onnxruntime-qdq", "gate": Int8Gate.to_dict(),
    # "file": NNCF's IR where it passed, "settings", "attempts"; "nncf": why not NNCF's graph, on the fallback)
    openvino: Optional[Mapping[str, Any]] = None

    @property
    def openvino_passed(self) -> bool:
        return bool(self.openvino and self.openvino.get("gate", {}).get("passed"))

    @property
    def openvino_file(self) -> Optional[str]:
        """OpenVINO's own INT8 image graph (NNCF's IR) where its gate passed; None: OpenVINO runs ``file``."""
        return self.openvino.get("file") if self.openvino_passed else None  # type: ignore[union-attr]

    def __post_init__(self) -> None:
        _need(self.target in INT8_TARGETS, "target", f"must be one of {', '.join(INT8_TARGETS)}, got {self.target!r}")
        if self.openvino is not None and "file" in self.openvino:
            f = self.openvino["file"]
            _need(isinstance(f, str) and f.endswith(".xml") and not Path(f).is_absolute() and ".." not in Path(f).parts,
                  "openvino.file", f"must be an OpenVINO IR (.xml) inside the bundle, got {f!r}")


@dataclass(frozen=True)
class Int8TextGraph:
    """``onnx.int8_text``: the CPU INT8 text graph (``ipiqa-export --int8 --int8-text``) and its gate: per-prompt
    text-embedding cosine against the FP32 text graph through ONNX Runtime. Served with the int8 set on ONNX
    Runtime only when ``passed``; otherwise the FP32 text graph runs, as without it."""

    file: str
    key: str
    settings: Mapping[str, Any]  # export.text_int8.quantize_text_graph's record
    passed: bool
    min_cosine: float
    prompts: int  # how many prompts the gate judged
    prompt_source: str  # which prompts, in words (the label files, or the gate's own only)
    gate: Mapping[str, Any]  # export.text_int8.TextInt8Gate.to_dict()
    cpu: str = ""  # the gating machine's CPU and its int8 dot-product flags: the kernels that were judged
    attempts: tuple[str, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class Bf16TextGate:
    """``onnx.bf16_text``: the FP32 text graph at BF16 on OpenVINO, its end-of-text search on int32 ids
    (``runtime.backends.openvino_text``), gated per prompt (``ipiqa-export --bf16 --bf16-text``): text-embedding
    cosine against ONNX Runtime FP32. No file of its own. OpenVINO serves the text graph at BF16 (with ``bf16``
    and ``int8``) only when ``passed`` and the CPU has BF16; otherwise at FP32, as without it."""

    key: str  # reuse key: FP32 graphs + prompts + OpenVINO version + CPU
    runtime: str  # "openvino X": the kernels that were judged
    cpu: str  # the gating machine's CPU model and its BF16 flags
    passed: bool
    min_cosine: float
    prompts: int
    prompt_source: str
    gate: Mapping[str, Any]  # export.text_int8.TextInt8Gate.to_dict() (label "bf16")
    seconds: float = 0.0


@dataclass(frozen=True)
class OnnxGraphs:
    """``onnx``: the FP32 graphs (always), the ``fp16/`` graphs and the INT8 image graphs (when exported)."""

    opset: int
    pooling: str  # "single_query" | "straightforward": which exact form of the pools was traced
    graphs: Mapping[str, GraphEntry]
    fp16: Optional[Fp16Graphs] = None
    int8: Mapping[str, Int8Graph] = field(default_factory=dict)
    bf16: Optional[Bf16Gate] = None
    int8_text: Optional[Int8TextGraph] = None
    bf16_text: Optional[Bf16TextGate] = None

    def __post_init__(self) -> None:
        _need(self.pooling in ("single_query", "straightforward"), "pooling",
              f"must be single_query or straightforward, got {self.pooling!r}")
        unknown = sorted(set(self.graphs) - set(GRAPHS))
        _need(not unknown, "graphs", f"unknown graphs {unknown}; ipiqa writes {', '.join(GRAPHS)}")
        if self.fp16 is not None:
            _need(set(self.fp16.graphs) == set(self.graphs), "fp16.graphs",
                  f"lists {sorted(self.fp16.graphs)}, the FP32 graphs are {sorted(self.graphs)}")
        for target, entry in self.int8.items():
            _need(entry.target == target, f"int8.{target}.target", f"is {entry.target!r}")

    @property
    def precisions(self) -> tuple[str, ...]:
        """fp32 always; fp16 (``fp16/``), bf16 (the FP32 graphs, gated at BF16 on OpenVINO) and int8 (the CPU
        INT8 image graph, served with the FP32 text and fusion graphs) when exported: what ``--precision`` can ask."""
        return ("fp32", *(("fp16",) if self.fp16 else ()), *(("bf16",) if self.bf16 else ()),
                *(("int8",) if "cpu" in self.int8 else ()))


@dataclass(frozen=True)
class EngineGraph:
    file: str  # engines/<graph>.<precision>.plan
    onnx: str  # the graph it was built from


@dataclass(frozen=True)
class Engines:
    """``engines``: TensorRT engines run only with the TensorRT version and GPU architecture that built them."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "8.9"
    precision: str
    batch: tuple[int, int, int]  # the optimization profile: min, opt, max
    workspace_gib: float
    key: str
    graphs: Mapping[str, EngineGraph]

    def __post_init__(self) -> None:
        _need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        try:
            check_batch_profile(self.batch)
        except ValueError as exc:
            raise ManifestError("batch", str(exc)) from None


@dataclass(frozen=True)
class Tokenizer:
    files: Mapping[str, str]  # "bpe": open_clip's vocabulary, "json": the HF tokenizers file the runtime loads

    def __post_init__(self) -> None:
        _need(bool(self.files), "files", "lists no tokenizer file")

    @property
    def file(self) -> str:
        """The file the runtime loads: the ready ``tokenizers`` JSON, else the BPE vocabulary."""
        return self.files.get("json") or next(iter(self.files.values()))


@dataclass(frozen=True)
class Source:
    files: tuple[str, ...]  # the model file(s) exported, for the reader; not part of the key
    key: str  # reuse key of the FP32 graphs: traced weights + config + options + versions


@dataclass(frozen=True)
class Parity:
    """The parity gate's rule and its results, as ``export.parity`` writes them (``ParityResult.to_dict()``)."""

    rule: Mapping[str, Any]
    onnx: tuple[dict[str, Any], ...] = ()
    engines: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for where, records in (("onnx", self.onnx), ("engines", self.engines)):
            for i, r in enumerate(records):
                _need("name" in r and "passed" in r, f"{where}[{i}]", "a parity record needs 'name' and 'passed'")


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, typed. ``root``: the bundle folder (not stored; paths in the file are relative to it)."""

    root: Path = field(compare=False)
    format: str
    config: IPIQAConfig
    precision: str  # what the bundle serves by default: the engines' precision, else fp32
    onnx: OnnxGraphs
    tokenizer: Tokenizer
    versions: Mapping[str, str]  # ipiqa, python, torch, onnx... that wrote the bundle
    source: Source
    parity: Parity
    files: Mapping[str, str]  # every file of the bundle -> SHA-256
    engines: Optional[Engines] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        _need(self.format == BUNDLE_FORMAT, "format", f"is {self.format!r}, this ipiqa reads {BUNDLE_FORMAT!r}")
        _need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _need(self.precision == (self.engines.precision if self.engines else "fp32"), "precision",
              f"is {self.precision!r} but the engines are {self.engines.precision if self.engines else 'absent'}")
        _need("ipiqa" in self.versions, "versions.ipiqa", "missing: which ipiqa wrote the bundle")
        needed = GRAPHS if self.config.text else ("image_encoder", "fusion")
        missing = [g for g in needed if g not in self.onnx.graphs]
        _need(not missing, "onnx.graphs", f"graphs {missing} not listed")

    # ---- what the runtime asks

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.config.outputs

    @property
    def onnx_precisions(self) -> tuple[str, ...]:
        return self.onnx.precisions

    @property
    def engine_precision(self) -> Optional[str]:
        return self.engines.precision if self.engines else None

    @property
    def int8_text_passed(self) -> bool:
        """The bundle holds an INT8 text graph whose gate passed (``onnx.int8_text``)."""
        return self.onnx.int8_text is not None and self.onnx.int8_text.passed

    @property
    def bf16_text_passed(self) -> bool:
        """The text graph passed its per-prompt BF16 gate on OpenVINO (``onnx.bf16_text``)."""
        return self.onnx.bf16_text is not None and self.onnx.bf16_text.passed

    def graph_precision(self, name: str, precision: str = "fp32", int8_text: bool = False) -> str:
        """What graph ``name`` of the ``precision`` set is stored in: the rule ``graph_path`` and the metadata
        check share. ``int8_text``: the caller serves the gated INT8 text graph (ONNX Runtime, which gated it)."""
        if precision == "int8":
            if name == "image_encoder" or (name == "text_encoder" and int8_text and self.int8_text_passed):
                return "int8"
            return "fp32"
        return "fp32" if precision == "bf16" else precision

    def graph_path(self, name: str, precision: str = "fp32", int8_text: bool = False,
                   runtime: str = "onnxruntime") -> Path:
        """The graph ``name`` of the ``precision`` set (int8: the CPU INT8 image graph, on ``runtime`` "openvino"
        OpenVINO's own IR where its gate passed, the INT8 text graph where ``int8_text`` asks for it and its gate
        passed; bf16 and the rest of int8: the FP32 graphs)."""
        if precision not in self.onnx_precisions:
            raise self.missing_precision(precision)
        if precision == "fp16":
            return self.root / self.onnx.fp16.graphs[name].file  # type: ignore[union-attr]
        if precision == "int8" and name == "image_encoder":
            cpu = self.onnx.int8["cpu"]
            return self.root / ((runtime == "openvino" and cpu.openvino_file) or cpu.file)
        if self.graph_precision(name, precision, int8_text) == "int8":
            return self.root / self.onnx.int8_text.file  # type: ignore[union-attr]
        return self.root / self.onnx.graphs[name].file

    def missing_precision(self, precision: str) -> BundleError:
        """The one refusal of a ``precision`` the bundle has no ONNX graphs for, naming the export that adds them."""
        what = ("records no passing BF16 gate (BF16 runs the FP32 graphs on OpenVINO once gated)" if precision == "bf16"
                else f"has no {precision} ONNX graphs")
        return BundleError(f"{self.root}: this bundle {what} (it has {', '.join(self.onnx_precisions)}); "
                           f"rebuild it with: {rebuild_command(precision)}")

    def engine_path(self, name: str) -> Optional[Path]:
        engine = self.engines.graphs.get(name) if self.engines else None
        return self.root / engine.file if engine else None

    def listed_files(self) -> list[str]:
        """Every file the manifest names (graphs, engines, tokenizer), without the weights beside the graphs
        (``weights_file``)."""
        files = [g.file for g in self.onnx.graphs.values()]
        files += [g.file for g in self.onnx.fp16.graphs.values()] if self.onnx.fp16 else []
        files += [e.file for e in self.onnx.int8.values()]
        files += [e.openvino_file for e in self.onnx.int8.values() if e.openvino_file]
        files += [self.onnx.int8_text.file] if self.onnx.int8_text else []
        files += list(self.tokenizer.files.values())
        files += [g.file for g in self.engines.graphs.values()] if self.engines else []
        return files

    # ---- (de)serialization

    def to_dict(self) -> dict[str, Any]:
        return {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "root"}

    def to_json(self) -> str:
        """Indented, keys sorted: ``manifest.json`` is read by people too."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: Union[str, Path] = ".") -> "Manifest":
        """Strict: raises ``ManifestError`` naming the key (dotted path) that is unknown, missing or invalid."""
        if not isinstance(data, Mapping):
            raise ManifestError("", f"a manifest is a JSON object, got {type(data).__name__}")
        return load_typed(cls, {**data, "root": root}, "")

    @classmethod
    def from_json(cls, text: str, root: Union[str, Path] = ".") -> "Manifest":
        return cls.from_dict(json.loads(text), root)

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)
