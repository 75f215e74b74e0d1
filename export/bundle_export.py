"""Model file -> bundle: ONNX graphs in FP32 (and FP16, INT8), their gates, optional TensorRT engines, manifest.json.

``export_bundle`` reads as its stages: FP32 graphs + parity gate -> FP16 graphs + FP16 gate -> INT8 image
graphs + INT8 gate -> engines + engine gate -> manifest. Each stage is reused when its inputs are unchanged
(same model bytes, options, gate rule, library versions, calibration files) and the files still hash as
recorded, so re-running an export is cheap and safe. The stages build the typed ``ipiqa.manifest.Manifest``. Any stage that writes a file first removes the
manifest, so a failed gate leaves no manifest describing files that changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from ipiqa import __version__
from ipiqa._optional import require
from ipiqa.bundle import read_bundle, sha256_file, write_manifest
from ipiqa.config import IPIQAConfig
from ipiqa.errors import BundleError, IPIQAError
from ipiqa.manifest import (BUNDLE_FORMAT, EngineGraph, Engines, Fp16Graph, Fp16Graphs, GraphEntry, Int8Calibration,
                            Int8Graph, Manifest, OnnxGraphs, Parity, Source, Tokenizer, io_shapes, to_plain)

from .checks import check_from_dict
from .parity import ParityResult, ToleranceOverride, rule_record
from .trt import EngineSpec, build_engine, input_profiles

if TYPE_CHECKING:  # bound at run time by _torch_side(), from the modules named in _TORCH_SIDE
    import torch

    from ipiqa.model import IPIQA, pooling_mode, tokenize

    from .gate import PARITY_PROMPTS, engine_parity, gate_inputs, onnx_parity
    from .graphs import GATE_OUTPUTS, GraphSpec, build_graphs, graph_specs
    from .to_onnx import DEFAULT_OPSET, export_onnx

# torch and the modules built on it load when an export runs (``_torch_side``), so that the options and errors
# here import on a base install: ``ipiqa-export`` checks every option before it requires torch.
_TORCH_SIDE = {
    "torch": ("torch", None),
    "IPIQA": ("ipiqa.model", "IPIQA"), "pooling_mode": ("ipiqa.model", "pooling_mode"),
    "tokenize": ("ipiqa.model", "tokenize"),
    "PARITY_PROMPTS": (".gate", "PARITY_PROMPTS"), "engine_parity": (".gate", "engine_parity"),
    "gate_inputs": (".gate", "gate_inputs"), "onnx_parity": (".gate", "onnx_parity"),
    "GATE_OUTPUTS": (".graphs", "GATE_OUTPUTS"), "GraphSpec": (".graphs", "GraphSpec"),
    "build_graphs": (".graphs", "build_graphs"), "graph_specs": (".graphs", "graph_specs"),
    "DEFAULT_OPSET": (".to_onnx", "DEFAULT_OPSET"), "export_onnx": (".to_onnx", "export_onnx"),
}


def _torch_side() -> None:
    """Bind the names of ``_TORCH_SIDE`` in this module on first use; a name already bound (or patched) stays."""
    g = globals()
    if all(name in g for name in _TORCH_SIDE):
        return
    require("torch", extra="export")
    require("open_clip", extra="export")
    for name, (module, attr) in _TORCH_SIDE.items():
        if name not in g:
            mod = importlib.import_module(module, __package__)
            g[name] = mod if attr is None else getattr(mod, attr)


def __getattr__(name: str) -> Any:
    """``bundle_export.onnx_parity`` and the other torch-side names, as before they were loaded lazily (PEP 562)."""
    if name in _TORCH_SIDE:
        _torch_side()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_opset() -> int:
    _torch_side()
    return DEFAULT_OPSET

__all__ = ["ExportOptions", "Int8Options", "ExportReport", "ParityGateError", "Fp16GateError", "export_bundle",
           "weights_digest", "onnx_key",
           "onnx_parity", "engine_parity", "gate_inputs", "PARITY_PROMPTS", "DEFAULT_CALIBRATION_SIZE"]
log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_SIZE = 64  # ORT's MinMax ranges settle by a few dozen images; more costs minutes at 512 px


class ParityGateError(IPIQAError):
    def __init__(self, results: Sequence[Any], what: str = "parity gate"):
        self.results = list(results)
        failed = "\n".join(r.line() for r in self.results if not r)
        super().__init__(f"{what} failed; the bundle was not written:\n{failed}")


class Fp16GateError(ParityGateError):
    """The FP16 graphs missed the FP16 bounds (results: ParityResult and CosineResult lines)."""

    def __init__(self, results: Sequence[Any]):
        super().__init__(results, "FP16 gate")


@dataclass(frozen=True)
class Int8Options:
    """``--int8 --calibration SOURCE [--calibration-size N] [--int8-setting [TARGET.]KEY=VALUE ...]``."""

    calibration: Path  # a folder of images, or a CSV with an ``image`` (and optionally ``prompt``) column
    size: int = DEFAULT_CALIBRATION_SIZE
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per target: settings_for overrides

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"--calibration-size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class ExportOptions:
    onnx_only: bool = False
    engine: EngineSpec = field(default_factory=lambda: EngineSpec("fp16", (1, 32, 128)))
    opset: int = field(default_factory=_default_opset)  # export.to_onnx.DEFAULT_OPSET
    parity_images: int = 4  # FP32 gate inputs; the engine gate uses 64
    single_query_pooling: bool = True  # the exact rewrite of both pools (issue 9); False exports the plain form
    tolerance_override: Optional[ToleranceOverride] = None  # --atol/--rtol: replaces the gate's rule; recorded
    fp16_onnx: bool = False  # FP16 graphs without FP16/INT8 engines (ONNX Runtime GPU, Triton)
    fp16_images: int = 16  # FP16 gate inputs (ONNX Runtime CPU, FP16 rounding emulated)
    int8: Optional[Int8Options] = None

    def __post_init__(self) -> None:
        if self.int8 is not None and not self.onnx_only and self.engine.precision != "int8":
            raise ValueError("--int8 with engines builds an INT8 image engine: the engine precision must be int8")
        if self.int8 is None and not self.onnx_only and self.engine.precision == "int8":
            raise ValueError("INT8 engines need calibration images (--int8 --calibration IMAGES.csv|DIR)")

    @property
    def writes_fp16(self) -> bool:
        """FP16 graphs: always for FP16 and INT8 engines (built from them), else on request."""
        return self.fp16_onnx or (not self.onnx_only and self.engine.precision in ("fp16", "int8"))

    @property
    def int8_targets(self) -> tuple[str, ...]:
        """``cpu`` always (ONNX Runtime CPU serves it); ``tensorrt`` when INT8 engines are built."""
        if self.int8 is None:
            return ()
        return ("cpu",) if self.onnx_only else ("cpu", "tensorrt")


@dataclass
class ExportReport:
    bundle: Path
    parity: list[ParityResult]  # FP32 gate, then the engine gate
    fp16: Optional[dict] = None  # the manifest's onnx.fp16 entry as JSON (graphs, gate records) when written
    int8: dict[str, dict] = field(default_factory=dict)  # the manifest's onnx.int8 entries as JSON, per target
    reused_onnx: bool = False
    reused_fp16: bool = False
    reused_int8: bool = False
    reused_engines: bool = False


@dataclass
class _Export:
    """What every stage reads and adds to: the model, the bundle folder, the previous manifest, the new one."""

    model: IPIQA
    out: Path
    options: ExportOptions
    progress: Callable[[str], None]
    previous: Optional[Manifest]
    report: ExportReport
    specs: dict[str, GraphSpec]
    manifest: Optional[Manifest] = None  # set by the FP32 stage, refined by each later stage

    @property
    def cfg(self) -> IPIQAConfig:
        return self.model.cfg

    @property
    def onnx_key(self) -> str:
        return self.built.source.key

    @property
    def built(self) -> Manifest:
        assert self.manifest is not None, "the FP32 stage runs first"  # internal order, not user input
        return self.manifest

    def with_onnx(self, **changes: Any) -> None:
        self.manifest = self.built.replace(onnx=dataclasses.replace(self.built.onnx, **changes))

    def fp32_graphs(self) -> dict[str, Path]:
        return {name: self.out / g.file for name, g in self.built.onnx.graphs.items()}

    def invalidate(self) -> None:
        """About to overwrite files: the old manifest (if any) must not describe them."""
        (self.out / "manifest.json").unlink(missing_ok=True)


def _versions() -> dict[str, str]:
    out = {"ipiqa": __version__, "python": platform.python_version()}
    for dist in ("torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every state_dict tensor (name, dtype, shape, bytes): what the graphs are traced from,
    whichever file (or none) the weights came from."""
    _torch_side()
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def onnx_key(model: IPIQA, options: ExportOptions, rule: Mapping[str, Any], versions: Mapping[str, str]) -> str:
    """Reuse key of the FP32 graphs: the traced weights, config, trace options, gate rule and library versions."""
    return _key(weights_digest(model), model.cfg.to_dict(), options.opset, options.single_query_pooling, rule,
                versions)


def _tokenizer_files(root: Path) -> Tokenizer:
    from open_clip.tokenizer import default_bpe

    from ipiqa.runtime.tokenizer import ClipTokenizer

    src = Path(default_bpe())
    dst = root / "tokenizer" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    ClipTokenizer(dst).save(root / "tokenizer" / "tokenizer.json")  # HF tokenizers file: the runtime loads it as is
    return Tokenizer(files={"bpe": f"tokenizer/{src.name}", "json": "tokenizer/tokenizer.json"})


def _existing(root: Path) -> Optional[Manifest]:
    try:
        return read_bundle(root)
    except BundleError:
        return None


def _gate(results: list, progress: Callable[[str], None], error: type = ParityGateError) -> list:
    """One line per check; any failure stops the export before a manifest exists."""
    for r in results:
        progress(r.line())
    if not all(results):
        raise error(results)
    return results


def _with_data_files(files: Sequence[str], root: Path) -> list[str]:
    """Each ONNX file with its external weights file (``.onnx.data``) where it has one."""
    out = []
    for f in files:
        out.append(f)
        if f.endswith(".onnx") and (root / (f + ".data")).is_file():
            out.append(f + ".data")
    return out


def export_bundle(model: IPIQA, source_files: Sequence[Path], out: Path, options: Optional[ExportOptions] = None,
                  progress: Callable[[str], None] = log.info) -> ExportReport:
    """Write (or refresh) the bundle in ``out`` (default options: ``ExportOptions()``); raises ParityGateError
    (FP32, FP16, engines) or ``export.int8.Int8GateError`` without writing a manifest on failure."""
    _torch_side()
    options = ExportOptions() if options is None else options
    model = model.eval().float()
    if not options.onnx_only:  # fail before minutes of ONNX work, not after
        try:
            require("tensorrt", extra="tensorrt")
        except IPIQAError as exc:
            raise IPIQAError(f"{exc}; or pass --onnx-only to write the ONNX bundle without engines") from None
        if not torch.cuda.is_available():
            raise IPIQAError("TensorRT engines need a CUDA GPU; on this machine export with --onnx-only")
    if options.tolerance_override is not None:
        log.warning("parity tolerance overridden by %s: every check passes at atol + rtol x scale instead of "
                    "max(fixed, k x floor); the override is recorded in %s", options.tolerance_override.describe(),
                    out / "manifest.json")
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Export(model, out, options, progress, _existing(out), ExportReport(out, []), graph_specs(model))
    _fp32_stage(ctx, source_files)
    if options.writes_fp16:
        _fp16_stage(ctx)
    if options.int8 is not None:
        _int8_stage(ctx)
    if not options.onnx_only:
        _engine_stage(ctx)
    _write(ctx)
    return ctx.report


def _fp32_stage(ctx: _Export, source_files: Sequence[Path]) -> None:
    """The three FP32 graphs, traced from the model, and the FP32 parity gate through the runtime's backend."""
    model, cfg, out, options = ctx.model, ctx.cfg, ctx.out, ctx.options
    versions = _versions()
    rule = rule_record(options.tolerance_override)  # a changed gate rule or override re-runs the gate
    key = onnx_key(model, options, rule, versions)  # the traced weights, not the file bytes
    files = {name: f"{name}.onnx" for name in ctx.specs if name != "text_encoder" or cfg.text}
    reuse = ctx.previous is not None and ctx.previous.source.key == key
    if reuse:
        ctx.progress("ONNX graphs unchanged (same model, options and versions): reused")
        ctx.report.reused_onnx = True
        ctx.report.parity = [check_from_dict(r) for r in ctx.previous.parity.onnx]
        tokenizer = ctx.previous.tokenizer
    else:
        ctx.invalidate()
        x = gate_inputs(cfg, 2)
        with torch.no_grad():
            fmap, emb = model.encode_image(x.model_images)
            text = model.encode_text(x.model_tokens) if cfg.text else None
        examples = {"image_encoder": (torch.from_numpy(x.image),), "text_encoder": (torch.from_numpy(x.tokens),),
                    "fusion": (fmap, emb, text) if cfg.text else (emb,)}
        with pooling_mode(model, options.single_query_pooling):  # traced into the graphs; caller's mode kept
            for name, module in build_graphs(model).items():
                start = time.perf_counter()
                spec = ctx.specs[name]
                export_onnx(module, examples[name], out / files[name], spec.inputs, spec.outputs, cfg, options.opset)
                ctx.progress(f"exported {name}.onnx ({time.perf_counter() - start:.1f}s)")
        tokenizer = _tokenizer_files(out)

    graphs = {n: GraphEntry(files[n], tuple(ctx.specs[n].inputs), tuple(ctx.specs[n].runtime_outputs),
                            tuple(o for o in ctx.specs[n].outputs if o in GATE_OUTPUTS)) for n in files}
    ctx.manifest = Manifest(
        root=out, format=BUNDLE_FORMAT, config=cfg, precision="fp32",
        onnx=OnnxGraphs(opset=options.opset, pooling="single_query" if options.single_query_pooling else "straightforward",
                        graphs=graphs),
        tokenizer=tokenizer, versions=versions, source=Source(tuple(str(p) for p in source_files), key),
        parity=Parity(rule=rule), files={})
    if not reuse:  # the manifest about to be written, read by the runtime's own backend
        ctx.report.parity = _gate(onnx_parity(model, ctx.manifest, options.parity_images,
                                              options.tolerance_override), ctx.progress)


def _fp16_stage(ctx: _Export) -> None:
    """``fp16/<graph>.onnx`` converted from the FP32 graphs, gated on ONNX Runtime CPU (FP16 rounding emulated)."""
    from .fp16 import convert_to_fp16
    from .fp16_gate import fp16_gate

    n = ctx.options.fp16_images
    key = _key(ctx.onnx_key, "fp16", n)
    old = ctx.previous.onnx.fp16 if ctx.previous else None
    if old is not None and old.key == key:
        ctx.progress("FP16 graphs unchanged: reused")
        ctx.with_onnx(fp16=old)
        ctx.report.fp16, ctx.report.reused_fp16 = to_plain(old), True
        return
    ctx.invalidate()
    start = time.perf_counter()
    fp32 = ctx.fp32_graphs()
    graphs = {name: convert_to_fp16(path, ctx.out / "fp16" / path.name) for name, path in fp32.items()}
    converted = time.perf_counter()
    ctx.progress(f"converted fp16/ graphs ({converted - start:.1f}s)")
    x = gate_inputs(ctx.cfg, n, seed=1)
    results = _gate(fp16_gate(fp32, {k: g.path for k, g in graphs.items()}, x.image, x.tokens if ctx.cfg.text else None,
                              ctx.cfg.outputs), ctx.progress, Fp16GateError)
    entry = Fp16Graphs(
        key=key, gate_images=n,
        seconds={"convert": round(converted - start, 2), "gate": round(time.perf_counter() - converted, 2)},
        islands="FP32 by construction: normalizations, softmax, reductions, exp/log/pow/sqrt, ArgMax and "
                "attention logits (export.fp16.FP32_OPS); everything else FP16 with FP16 weights",
        graphs={name: Fp16Graph(f"fp16/{g.path.name}", g.fp16_nodes, len(g.fp32_nodes), g.casts)
                for name, g in graphs.items()},
        gate=tuple(r.to_dict() for r in results))
    ctx.with_onnx(fp16=entry)
    ctx.report.fp16 = to_plain(entry)


def _int8_stage(ctx: _Export) -> None:
    """The image graph quantized per target on the user's images and gated on held-out ones (Int8GateError
    below the bar); text and fusion stay FP32 on the CPU and come from ``fp16/`` for engines."""
    from .calibration import calibration_batches, split_calibration
    from .int8 import quantize_and_gate

    opts, cfg = ctx.options.int8, ctx.cfg
    if opts is None:
        return
    split = split_calibration(opts.calibration)
    calibration_files = [(str(p), sha256_file(p)) for p in split.calibration + split.held_out if p.is_file()]
    entries: dict[str, Int8Graph] = {}
    pending = []
    for target in ctx.options.int8_targets:
        key = _key(ctx.onnx_key, "int8", target, calibration_files, opts.size, dict(opts.settings.get(target, {})))
        old = ctx.previous.onnx.int8.get(target) if ctx.previous else None
        if old is not None and old.key == key:
            ctx.progress(f"INT8 image graph for {target} unchanged: reused")
            entries[target] = old
        else:
            pending.append((target, key))
    if pending:
        ctx.invalidate()
        start = time.perf_counter()
        batches = list(calibration_batches(list(split.calibration), cfg.resolution, opts.size))
        held, tokens, source = _int8_held_out(ctx, split)
        ctx.progress(f"INT8: {sum(len(b) for b in batches)} calibration images, {len(held)} held out "
                     f"(prompts: {source}) ({time.perf_counter() - start:.1f}s)")
        for target, key in pending:
            start = time.perf_counter()
            rel = f"int8/image_encoder.{target}.onnx"
            overrides = {"calibration_size": opts.size, **opts.settings.get(target, {})}
            result = quantize_and_gate(ctx.fp32_graphs(), ctx.out / rel, batches, held, tokens, target, cfg.outputs,
                                       **overrides)
            for r in result.gate.results:
                ctx.progress(f"[{target}] {r.line()}")
            gate = result.gate
            entries[target] = Int8Graph(
                file=rel, target=target, key=key, settings=gate.settings.to_dict(),
                serves="image_encoder; text_encoder and fusion run from the " +
                       ("FP32 graphs" if target == "cpu" else "fp16/ graphs (engines)"),
                excluded_nodes=tuple(gate.settings.nodes_to_exclude), attempts=tuple(result.attempts),
                criterion=gate.criterion, gate=gate.to_dict(),
                calibration=Int8Calibration(str(opts.calibration), gate.settings.calibration_size, len(held), source),
                seconds=round(time.perf_counter() - start, 2))
            ctx.progress(f"INT8 image graph for {target}: {rel} ({entries[target].seconds:.1f}s; {gate.criterion})")
    else:
        ctx.report.reused_int8 = True
    ctx.with_onnx(int8=entries)
    ctx.report.int8 = {target: to_plain(e) for target, e in entries.items()}


def _int8_held_out(ctx: _Export, split=None) -> tuple:
    """(uint8 images, tokens or None, where the prompts came from): the held-out calibration images both INT8
    gates judge (the CPU graph's and the engines'), never calibrated on."""
    from .calibration import held_out_images, split_calibration

    assert ctx.options.int8 is not None, "INT8 gates need --int8 --calibration"  # ExportOptions refuses otherwise
    split = split or split_calibration(ctx.options.int8.calibration)
    held, prompts = held_out_images(split, ctx.cfg.resolution)
    source = "the CSV's prompt column" if prompts is not None else "the gate's prompts (PARITY_PROMPTS)"
    if prompts is None:
        prompts = [PARITY_PROMPTS[i % len(PARITY_PROMPTS)] for i in range(len(held))]
    tokens = tokenize(prompts, ctx.cfg.context_length).numpy() if ctx.cfg.text else None
    return held, tokens, source


def _engine_sources(ctx: _Export) -> dict[str, str]:
    """The ONNX graph each engine is built from: its precision lives in the graph (strongly typed)."""
    precision = ctx.options.engine.precision
    onnx = ctx.built.onnx
    if precision == "fp32":
        return {name: g.file for name, g in onnx.graphs.items()}
    assert onnx.fp16 is not None, "FP16 graphs are written for FP16 and INT8 engines"  # ExportOptions.writes_fp16
    fp16 = {name: g.file for name, g in onnx.fp16.graphs.items()}
    if precision == "fp16":
        return fp16
    return {**fp16, "image_encoder": onnx.int8["tensorrt"].file}


def _engine_stage(ctx: _Export) -> None:
    """TensorRT engines from the graphs of their precision, then the engine gate through the runtime's TrtBackend."""
    trt = require("tensorrt", extra="tensorrt")
    spec, out = ctx.options.engine, ctx.out
    gpu = torch.cuda.get_device_name()
    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    sources = _engine_sources(ctx)
    onnx = ctx.built.onnx
    graph_keys = [onnx.fp16.key if onnx.fp16 else None,
                  onnx.int8["tensorrt"].key if "tensorrt" in onnx.int8 else None]
    engine_key = _key(ctx.onnx_key, spec.precision, spec.batch, spec.workspace_gib, trt.__version__, gpu, cc,
                      sources, graph_keys)
    old = ctx.previous.engines if ctx.previous else None
    if old is not None and old.key == engine_key:
        ctx.progress("TensorRT engines unchanged: reused")
        ctx.report.reused_engines = True
        ctx.report.parity += [check_from_dict(r) for r in ctx.previous.parity.engines]
        ctx.manifest = ctx.built.replace(engines=old, precision=spec.precision)
        return
    ctx.invalidate()
    (out / "engines").mkdir(exist_ok=True)
    built: dict[str, EngineGraph] = {}
    shapes = io_shapes(ctx.cfg)
    for name, onnx_file in sources.items():
        start = time.perf_counter()
        graph = ctx.specs[name]
        profiles = input_profiles({i: shapes[i][0] for i in graph.inputs}, spec.batch)
        blob = build_engine(out / onnx_file, profiles, spec, timing_cache=out / "engines" / "timing.cache",
                            outputs=graph.runtime_outputs)
        rel = f"engines/{name}.{spec.precision}.plan"
        (out / rel).write_bytes(blob)
        built[name] = EngineGraph(rel, onnx_file)
        ctx.progress(f"built {rel} from {onnx_file} ({time.perf_counter() - start:.1f}s)")
    engines = Engines(tensorrt=trt.__version__, gpu=gpu, compute_capability=cc, precision=spec.precision,
                      batch=spec.batch, workspace_gib=spec.workspace_gib, key=engine_key, graphs=built)
    ctx.manifest = ctx.built.replace(engines=engines, precision=spec.precision)
    held_out = _int8_held_out(ctx)[:2] if spec.precision == "int8" else None
    ctx.report.parity += _gate(engine_parity(ctx.model, ctx.manifest, override=ctx.options.tolerance_override,
                                             held_out=held_out, columns=ctx.cfg.outputs), ctx.progress)


def _write(ctx: _Export) -> None:
    """The parity records and every listed file (hashed by ``write_manifest``) into ``manifest.json``."""
    manifest = ctx.built
    records = [(r.name.startswith("engines"), r.to_dict()) for r in ctx.report.parity]
    parity = Parity(rule=manifest.parity.rule, onnx=tuple(r for engine, r in records if not engine),
                    engines=tuple(r for engine, r in records if engine))
    files = _with_data_files(manifest.listed_files(), ctx.out)
    write_manifest(manifest.replace(parity=parity, files=dict.fromkeys(files, "")))
