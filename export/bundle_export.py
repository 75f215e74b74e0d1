"""Model file -> bundle: ONNX graphs in FP32 (and FP16, INT8), their gates, optional TensorRT engines, manifest.json.

``export_bundle`` reads as its stages: FP32 graphs + parity gate -> FP16 graphs + FP16 gate -> BF16 gate ->
INT8 image graphs + INT8 gate (``int8_stage``) -> engines + engine gate (``engine_stage``) -> manifest. Each
stage is reused when its inputs are unchanged (same model bytes, options, gate rule, library versions,
calibration files, and for BF16 the OpenVINO version and CPU) and the files still hash as recorded, so
re-running an export is cheap and safe (``stages.run_stage`` owns that rule). The stages build the typed
``ipiqa.manifest.Manifest``. Any stage that writes a file first removes the manifest, so a failed gate leaves
no manifest describing files that changed. Imports torch: ``ipiqa-export`` imports it once an export runs.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from ipiqa._optional import require
from ipiqa.bundle import read_bundle, write_manifest
from ipiqa.errors import BundleError, IPIQAError
from ipiqa.manifest import (BUNDLE_FORMAT, Bf16Gate, Fp16Graph, Fp16Graphs, GraphEntry, Manifest, OnnxGraphs, Parity,
                            Source, Tokenizer, to_plain, weights_file)
from ipiqa.model import IPIQA, pooling_mode

from .checks import check_from_dict
from .engine_stage import engine_stage
from .gate import PARITY_PROMPTS, engine_parity, gate_inputs, onnx_parity
from .graphs import GATE_OUTPUTS, build_graphs, graph_specs
from .int8_stage import int8_stage
from .text_bf16 import text_bf16_stage
from .text_int8_stage import text_int8_stage
from .options import (DEFAULT_CALIBRATION_SIZE, Bf16GateError, ExportOptions, Fp16GateError,  # noqa: F401 (re-exported)
                      Int8Options, ParityGateError, check_bf16_gating)
from .parity import rule_record
from .reuse_keys import library_versions, onnx_key, stage_key, weights_digest  # noqa: F401 (re-exported)
from .stages import ExportContext, ExportReport, check_gate, run_stage
from .to_onnx import export_onnx

__all__ = ["ExportOptions", "Int8Options", "ExportReport", "ParityGateError", "Fp16GateError", "export_bundle",
           "weights_digest", "onnx_key",
           "onnx_parity", "engine_parity", "gate_inputs", "PARITY_PROMPTS", "DEFAULT_CALIBRATION_SIZE"]
log = logging.getLogger(__name__)

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


def _with_data_files(files: Sequence[str], root: Path) -> list[str]:
    """Each graph file with its weights file (``manifest.weights_file``: ``.onnx.data``, an IR's ``.bin``)."""
    out = []
    for f in files:
        out.append(f)
        if f.endswith((".onnx", ".xml")) and (root / weights_file(f)).is_file():
            out.append(weights_file(f))
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
    ctx = ExportContext(model, out, options, progress, _existing(out), ExportReport(out, []), graph_specs(model))
    _fp32_stage(ctx, source_files)
    if options.writes_fp16:
        _fp16_stage(ctx)
    if options.bf16:
        _bf16_stage(ctx)
    if options.int8 is not None:
        int8_stage(ctx)
    try:
        if options.int8_text:
            text_int8_stage(ctx)
        if options.bf16_text:
            text_bf16_stage(ctx)
    finally:
        ctx.close_text_references()
    if not options.onnx_only:
        engine_stage(ctx)
    _write(ctx)
    return ctx.report


def _fp32_stage(ctx: ExportContext, source_files: Sequence[Path]) -> None:
    """The three FP32 graphs, traced from the model, and the FP32 parity gate through the runtime's backend."""
    model, cfg, out, options = ctx.model, ctx.cfg, ctx.out, ctx.options
    versions = library_versions()
    rule = rule_record(options.tolerance_override)  # a changed gate rule or override re-runs the gate
    key = onnx_key(model, options, rule, versions)  # the traced weights, not the file bytes
    files = {name: f"{name}.onnx" for name in ctx.specs if name != "text_encoder" or cfg.text}
    previous = ctx.previous
    tokenizer, reused = run_stage(ctx, "ONNX graphs", key,
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
        ctx.report.parity = check_gate(onnx_parity(model, ctx.manifest, options.parity_images,
                                              options.tolerance_override), ctx.progress)


def _trace_graphs(ctx: ExportContext, files: Mapping[str, str]) -> Tokenizer:
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
            export_onnx(module, examples[name], ctx.out / files[name], spec.inputs, spec.outputs, cfg, ctx.options.opset,
                        spec.sequence_inputs)
            ctx.progress(f"exported {name}.onnx ({time.perf_counter() - start:.1f}s)")
    return _tokenizer_files(ctx.out)


def _fp16_stage(ctx: ExportContext) -> None:
    """``fp16/<graph>.onnx`` converted from the FP32 graphs, gated on ONNX Runtime CPU (FP16 rounding emulated)."""
    n = ctx.options.fp16_images
    key = stage_key(ctx.onnx_key, "fp16", n)
    old = ctx.previous.onnx.fp16 if ctx.previous else None
    entry, ctx.report.reused_fp16 = run_stage(ctx, "FP16 graphs", key, old.key if old else None, old,
                                           lambda: _build_fp16(ctx, key, n))
    ctx.with_onnx(fp16=entry)
    ctx.report.fp16 = to_plain(entry)


def _build_fp16(ctx: ExportContext, key: str, n: int) -> Fp16Graphs:
    from .fp16 import convert_to_fp16
    from .fp16_gate import fp16_gate

    start = time.perf_counter()
    fp32 = ctx.fp32_graphs()
    graphs = {name: convert_to_fp16(path, ctx.out / "fp16" / path.name) for name, path in fp32.items()}
    converted = time.perf_counter()
    ctx.progress(f"converted fp16/ graphs ({converted - start:.1f}s)")
    x = gate_inputs(ctx.cfg, n, seed=1)
    results = check_gate(fp16_gate(fp32, {k: g.path for k, g in graphs.items()}, x.image, x.tokens if ctx.cfg.text else None,
                              ctx.cfg.outputs), ctx.progress, Fp16GateError)
    return Fp16Graphs(
        key=key, gate_images=n,
        seconds={"convert": round(converted - start, 2), "gate": round(time.perf_counter() - converted, 2)},
        islands="FP32 by construction: normalizations, softmax, reductions, exp/log/pow/sqrt, ArgMax and "
                "attention logits (export.fp16.FP32_OPS); everything else FP16 with FP16 weights",
        graphs={name: Fp16Graph(f"fp16/{g.path.name}", g.fp16_nodes, len(g.fp32_nodes), g.casts)
                for name, g in graphs.items()},
        gate=tuple(r.to_dict() for r in results))


def _bf16_stage(ctx: ExportContext) -> None:
    """The BF16 gate record: the FP32 graphs as ``OpenVinoBackend`` serves them at BF16, on this CPU's kernels."""
    from ipiqa.runtime.cpu import bf16_flags, describe

    check_bf16_gating()
    ov = require("openvino", extra="openvino")
    n = ctx.options.fp16_images
    cpu = f"{describe()} ({', '.join(bf16_flags())})"  # the stage key: another CPU class re-gates
    runtime = f"openvino {ov.__version__}"
    key = stage_key(ctx.onnx_key, "bf16", n, runtime, cpu)
    old = ctx.previous.onnx.bf16 if ctx.previous else None
    entry, ctx.report.reused_bf16 = run_stage(ctx, "BF16 gate", key, old.key if old else None, old,
                                           lambda: _run_bf16_gate(ctx, key, n, runtime, cpu))
    ctx.with_onnx(bf16=entry)
    ctx.report.bf16 = to_plain(entry)


def _run_bf16_gate(ctx: ExportContext, key: str, n: int, runtime: str, cpu: str) -> Bf16Gate:
    from ipiqa.runtime.backends.openvino import inference_precisions

    from .bf16_gate import bf16_gate

    start = time.perf_counter()
    x = gate_inputs(ctx.cfg, n, seed=1)  # the FP16 gate's inputs
    results = check_gate(bf16_gate(ctx.fp32_graphs(), x.image, x.tokens if ctx.cfg.text else None, ctx.cfg.outputs),
                    ctx.progress, Bf16GateError)
    served = {g: p for g, p in inference_precisions("bf16").items() if g in ctx.built.onnx.graphs}
    return Bf16Gate(key=key, runtime=runtime, cpu=cpu, gate_images=n, served=served,
                    gate=tuple(r.to_dict() for r in results), seconds=round(time.perf_counter() - start, 2))


def _write(ctx: ExportContext) -> None:
    """The parity records and every listed file (hashed by ``write_manifest``) into ``manifest.json``."""
    manifest = ctx.built
    records = [(r.name.startswith("engines"), r.to_dict()) for r in ctx.report.parity]
    parity = Parity(rule=manifest.parity.rule, onnx=tuple(r for engine, r in records if not engine),
                    engines=tuple(r for engine, r in records if engine))
    files = _with_data_files(manifest.listed_files(), ctx.out)
    write_manifest(manifest.replace(parity=parity, files=dict.fromkeys(files, "")))
