"""Model file -> bundle: ONNX graphs in FP32 (and FP16, INT8), their gates, optional TensorRT engines, manifest.json.

``export_bundle`` reads as its stages: FP32 graphs + parity gate -> FP16 graphs + FP16 gate -> INT8 image
graphs + INT8 gate -> engines + engine gate -> manifest. Each stage is reused when its inputs are unchanged
(same model bytes, options, gate rule, library versions, calibration files) and the files still hash as
recorded, so re-running an export is cheap and safe (``_stage`` owns that rule). The stages build the typed
``ipiqa.manifest.Manifest``. Any stage that writes a file first removes the manifest, so a failed gate leaves
no manifest describing files that changed. Imports torch: ``ipiqa-export`` imports it once an export runs.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import torch

from ipiqa._optional import require
from ipiqa.bundle import read_bundle, sha256_file, write_manifest
from ipiqa.config import IPIQAConfig
from ipiqa.errors import BundleError, IPIQAError
from ipiqa.manifest import (BUNDLE_FORMAT, Bf16Gate, EngineGraph, Engines, Fp16Graph, Fp16Graphs, GraphEntry, Int8Calibration,
                            Int8Graph, Manifest, OnnxGraphs, Parity, Source, Tokenizer, io_shapes, to_plain)
from ipiqa.model import IPIQA, pooling_mode, tokenize

from .checks import Check, check_from_dict
from .gate import PARITY_PROMPTS, engine_parity, gate_inputs, onnx_parity
from .graphs import GATE_OUTPUTS, GraphSpec, build_graphs, graph_specs
from .options import (DEFAULT_CALIBRATION_SIZE, Bf16GateError, check_bf16_gating, ExportOptions, Fp16GateError,  # noqa: F401 (re-exported)
                      Int8Options, ParityGateError)
from .parity import rule_record
from .reuse_keys import library_versions, onnx_key, stage_key, weights_digest  # noqa: F401 (re-exported)
from .to_onnx import export_onnx
from .trt import build_engine, input_profiles

__all__ = ["ExportOptions", "Int8Options", "ExportReport", "ParityGateError", "Fp16GateError", "export_bundle",
           "weights_digest", "onnx_key",
           "onnx_parity", "engine_parity", "gate_inputs", "PARITY_PROMPTS", "DEFAULT_CALIBRATION_SIZE"]
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ExportReport:
    bundle: Path
    parity: list[Check]  # FP32 gate, then the engine gate
    fp16: Optional[dict] = None  # the manifest's onnx.fp16 entry as JSON (graphs, gate records) when written
    bf16: Optional[dict] = None  # the manifest's onnx.bf16 entry as JSON (the BF16 gate on OpenVINO) when run
    int8: dict[str, dict] = field(default_factory=dict)  # the manifest's onnx.int8 entries as JSON, per target
    reused_onnx: bool = False
    reused_fp16: bool = False
    reused_bf16: bool = False
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
    if options.bf16:
        _bf16_stage(ctx)
    if options.int8 is not None:
        _int8_stage(ctx)
    if not options.onnx_only:
        _engine_stage(ctx)
    _write(ctx)
    return ctx.report


def _stage(ctx: _Export, what: str, key: str, old_key: Optional[str], old: Optional[T],
           build: Callable[[], T]) -> tuple[T, bool]:
    """The reuse rule every stage follows: ``old`` when the previous manifest recorded the same ``key`` (and its
    files still hash as recorded: ``read_bundle`` checked them), else the manifest removed and ``build()``.
    Returns (entry, reused)."""
    if old is not None and old_key == key:
        ctx.progress(f"{what} unchanged: reused")
        return old, True
    ctx.invalidate()
    return build(), False


def _fp32_stage(ctx: _Export, source_files: Sequence[Path]) -> None:
    """The three FP32 graphs, traced from the model, and the FP32 parity gate through the runtime's backend."""
    model, cfg, out, options = ctx.model, ctx.cfg, ctx.out, ctx.options
    versions = library_versions()
    rule = rule_record(options.tolerance_override)  # a changed gate rule or override re-runs the gate
    key = onnx_key(model, options, rule, versions)  # the traced weights, not the file bytes
    files = {name: f"{name}.onnx" for name in ctx.specs if name != "text_encoder" or cfg.text}
    previous = ctx.previous
    tokenizer, reused = _stage(ctx, "ONNX graphs", key,
                               previous.source.key if previous else None, previous.tokenizer if previous else None,
                               lambda: _trace_graphs(ctx, files))
    graphs = {n: GraphEntry(files[n], tuple(ctx.specs[n].inputs), tuple(ctx.specs[n].runtime_outputs),
                            tuple(o for o in ctx.specs[n].outputs if o in GATE_OUTPUTS)) for n in files}
    ctx.manifest = Manifest(
        root=out, format=BUNDLE_FORMAT, config=cfg, precision="fp32",
        onnx=OnnxGraphs(opset=options.opset, pooling="single_query" if options.single_query_pooling else "straightforward",
                        graphs=graphs),
        tokenizer=tokenizer, versions=versions, source=Source(tuple(str(p) for p in source_files), key),
        parity=Parity(rule=rule), files={})
    ctx.report.reused_onnx = reused
    if reused:
        assert previous is not None  # reused only from a previous manifest
        ctx.report.parity = [check_from_dict(r) for r in previous.parity.onnx]
    else:  # the manifest about to be written, read by the runtime's own backend
        ctx.report.parity = _gate(onnx_parity(model, ctx.manifest, options.parity_images,
                                              options.tolerance_override), ctx.progress)


def _trace_graphs(ctx: _Export, files: Mapping[str, str]) -> Tokenizer:
    """Trace each graph to ONNX (in the pooling form asked for) and copy the tokenizer files beside them."""
    model, cfg = ctx.model, ctx.cfg
    x = gate_inputs(cfg, 2)
    with torch.no_grad():
        fmap, emb = model.encode_image(x.model_images)
        text = model.encode_text(x.model_tokens) if cfg.text else None
    examples = {"image_encoder": (torch.from_numpy(x.image),), "text_encoder": (torch.from_numpy(x.tokens),),
                "fusion": (fmap, emb, text) if cfg.text else (emb,)}
    with pooling_mode(model, ctx.options.single_query_pooling):  # traced into the graphs; caller's mode kept
        for name, module in build_graphs(model).items():
            start = time.perf_counter()
            spec = ctx.specs[name]
            export_onnx(module, examples[name], ctx.out / files[name], spec.inputs, spec.outputs, cfg, ctx.options.opset)
            ctx.progress(f"exported {name}.onnx ({time.perf_counter() - start:.1f}s)")
    return _tokenizer_files(ctx.out)


def _fp16_stage(ctx: _Export) -> None:
    """``fp16/<graph>.onnx`` converted from the FP32 graphs, gated on ONNX Runtime CPU (FP16 rounding emulated)."""
    n = ctx.options.fp16_images
    key = stage_key(ctx.onnx_key, "fp16", n)
    old = ctx.previous.onnx.fp16 if ctx.previous else None
    entry, ctx.report.reused_fp16 = _stage(ctx, "FP16 graphs", key, old.key if old else None, old,
                                           lambda: _build_fp16(ctx, key, n))
    ctx.with_onnx(fp16=entry)
    ctx.report.fp16 = to_plain(entry)


def _build_fp16(ctx: _Export, key: str, n: int) -> Fp16Graphs:
    from .fp16 import convert_to_fp16
    from .fp16_gate import fp16_gate

    start = time.perf_counter()
    fp32 = ctx.fp32_graphs()
    graphs = {name: convert_to_fp16(path, ctx.out / "fp16" / path.name) for name, path in fp32.items()}
    converted = time.perf_counter()
    ctx.progress(f"converted fp16/ graphs ({converted - start:.1f}s)")
    x = gate_inputs(ctx.cfg, n, seed=1)
    results = _gate(fp16_gate(fp32, {k: g.path for k, g in graphs.items()}, x.image, x.tokens if ctx.cfg.text else None,
                              ctx.cfg.outputs), ctx.progress, Fp16GateError)
    return Fp16Graphs(
        key=key, gate_images=n,
        seconds={"convert": round(converted - start, 2), "gate": round(time.perf_counter() - converted, 2)},
        islands="FP32 by construction: normalizations, softmax, reductions, exp/log/pow/sqrt, ArgMax and "
                "attention logits (export.fp16.FP32_OPS); everything else FP16 with FP16 weights",
        graphs={name: Fp16Graph(f"fp16/{g.path.name}", g.fp16_nodes, len(g.fp32_nodes), g.casts)
                for name, g in graphs.items()},
        gate=tuple(r.to_dict() for r in results))


def _bf16_stage(ctx: _Export) -> None:
    """The BF16 gate record: the FP32 graphs as ``OpenVinoBackend`` serves them at BF16, on this CPU's kernels."""
    from ipiqa.runtime.cpu import bf16_flags, cpu_model

    check_bf16_gating()
    ov = require("openvino", extra="openvino")
    n = ctx.options.fp16_images
    cpu = f"{cpu_model()} ({', '.join(bf16_flags())})"
    runtime = f"openvino {ov.__version__}"
    key = stage_key(ctx.onnx_key, "bf16", n, runtime, cpu)
    old = ctx.previous.onnx.bf16 if ctx.previous else None
    entry, ctx.report.reused_bf16 = _stage(ctx, "BF16 gate", key, old.key if old else None, old,
                                           lambda: _run_bf16_gate(ctx, key, n, runtime, cpu))
    ctx.with_onnx(bf16=entry)
    ctx.report.bf16 = to_plain(entry)


def _run_bf16_gate(ctx: _Export, key: str, n: int, runtime: str, cpu: str) -> Bf16Gate:
    from ipiqa.runtime.backends.openvino import inference_precisions

    from .bf16_gate import bf16_gate

    start = time.perf_counter()
    x = gate_inputs(ctx.cfg, n, seed=1)  # the FP16 gate's inputs
    results = _gate(bf16_gate(ctx.fp32_graphs(), x.image, x.tokens if ctx.cfg.text else None, ctx.cfg.outputs),
                    ctx.progress, Bf16GateError)
    served = {g: p for g, p in inference_precisions("bf16").items() if g in ctx.built.onnx.graphs}
    return Bf16Gate(key=key, runtime=runtime, cpu=cpu, gate_images=n, served=served,
                    gate=tuple(r.to_dict() for r in results), seconds=round(time.perf_counter() - start, 2))


def _int8_stage(ctx: _Export) -> None:
    """The image graph quantized per target on the user's images and gated on held-out ones (Int8GateError
    below the bar); text and fusion stay FP32 on the CPU and come from ``fp16/`` for engines."""
    from .calibration import calibration_batches, split_calibration

    opts, cfg = ctx.options.int8, ctx.cfg
    if opts is None:
        return
    split = split_calibration(opts.calibration)
    calibration_files = [(str(p), sha256_file(p)) for p in split.calibration + split.held_out if p.is_file()]
    inputs: dict[str, Any] = {}  # calibration batches and held-out images, read once, when a target is built

    def prepared() -> dict[str, Any]:
        if not inputs:
            start = time.perf_counter()
            inputs["batches"] = list(calibration_batches(list(split.calibration), cfg.resolution, opts.size))
            inputs["held"], inputs["tokens"], inputs["source"] = _int8_held_out(ctx, split)
            ctx.progress(f"INT8: {sum(len(b) for b in inputs['batches'])} calibration images, {len(inputs['held'])} "
                         f"held out (prompts: {inputs['source']}) ({time.perf_counter() - start:.1f}s)")
        return inputs

    entries: dict[str, Int8Graph] = {}
    reused = []
    for target in ctx.options.int8_targets:
        key = stage_key(ctx.onnx_key, "int8", target, calibration_files, opts.size, dict(opts.settings.get(target, {})))
        old = ctx.previous.onnx.int8.get(target) if ctx.previous else None
        entries[target], again = _stage(ctx, f"INT8 image graph for {target}", key, old.key if old else None, old,
                                        lambda: _build_int8(ctx, target, key, prepared()))
        reused.append(again)
    ctx.report.reused_int8 = all(reused)
    ctx.with_onnx(int8=entries)
    ctx.report.int8 = {target: to_plain(e) for target, e in entries.items()}


def _build_int8(ctx: _Export, target: str, key: str, inputs: Mapping[str, Any]) -> Int8Graph:
    from .int8 import quantize_and_gate

    opts = ctx.options.int8
    assert opts is not None  # _int8_stage runs only with --int8
    start = time.perf_counter()
    rel = f"int8/image_encoder.{target}.onnx"
    overrides = {"calibration_size": opts.size, **opts.settings.get(target, {})}
    result = quantize_and_gate(ctx.fp32_graphs(), ctx.out / rel, inputs["batches"], inputs["held"], inputs["tokens"],
                               target, ctx.cfg.outputs, **overrides)
    for r in result.gate.results:
        ctx.progress(f"[{target}] {r.line()}")
    gate = result.gate
    entry = Int8Graph(
        file=rel, target=target, key=key, settings=gate.settings.to_dict(),
        serves="image_encoder; text_encoder and fusion run from the " +
               ("FP32 graphs" if target == "cpu" else "fp16/ graphs (engines)"),
        excluded_nodes=tuple(gate.settings.nodes_to_exclude), attempts=tuple(result.attempts),
        criterion=gate.criterion, gate=gate.to_dict(),
        calibration=Int8Calibration(str(opts.calibration), gate.settings.calibration_size, len(inputs["held"]),
                                    inputs["source"]),
        seconds=round(time.perf_counter() - start, 2))
    ctx.progress(f"INT8 image graph for {target}: {rel} ({entry.seconds:.1f}s; {gate.criterion})")
    return entry


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
    spec = ctx.options.engine
    gpu = torch.cuda.get_device_name()
    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    sources = _engine_sources(ctx)
    onnx = ctx.built.onnx
    graph_keys = [onnx.fp16.key if onnx.fp16 else None,
                  onnx.int8["tensorrt"].key if "tensorrt" in onnx.int8 else None]
    key = stage_key(ctx.onnx_key, spec.precision, spec.batch, spec.workspace_gib, trt.__version__, gpu, cc, sources,
               graph_keys)
    old = ctx.previous.engines if ctx.previous else None
    engines, ctx.report.reused_engines = _stage(
        ctx, "TensorRT engines", key, old.key if old else None, old,
        lambda: Engines(tensorrt=trt.__version__, gpu=gpu, compute_capability=cc, precision=spec.precision,
                        batch=spec.batch, workspace_gib=spec.workspace_gib, key=key, graphs=_build_engines(ctx, sources)))
    ctx.manifest = ctx.built.replace(engines=engines, precision=spec.precision)
    if ctx.report.reused_engines:
        assert ctx.previous is not None  # reused only from a previous manifest
        ctx.report.parity += [check_from_dict(r) for r in ctx.previous.parity.engines]
        return
    held_out = _int8_held_out(ctx)[:2] if spec.precision == "int8" else None
    ctx.report.parity += _gate(engine_parity(ctx.model, ctx.manifest, override=ctx.options.tolerance_override,
                                             held_out=held_out, columns=ctx.cfg.outputs), ctx.progress)


def _build_engines(ctx: _Export, sources: Mapping[str, str]) -> dict[str, EngineGraph]:
    spec, out = ctx.options.engine, ctx.out
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
    return built


def _write(ctx: _Export) -> None:
    """The parity records and every listed file (hashed by ``write_manifest``) into ``manifest.json``."""
    manifest = ctx.built
    records = [(r.name.startswith("engines"), r.to_dict()) for r in ctx.report.parity]
    parity = Parity(rule=manifest.parity.rule, onnx=tuple(r for engine, r in records if not engine),
                    engines=tuple(r for engine, r in records if engine))
    files = _with_data_files(manifest.listed_files(), ctx.out)
    write_manifest(manifest.replace(parity=parity, files=dict.fromkeys(files, "")))
