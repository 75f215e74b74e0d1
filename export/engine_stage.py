"""The engine stage of ``export_bundle``: TensorRT engines from the graphs of their precision, then the engine
gate through the runtime's ``TrtBackend``."""
from __future__ import annotations

import time
from typing import Mapping

import torch

from ipiqa._optional import require
from ipiqa.manifest import EngineGraph, Engines, io_shapes

from .checks import check_from_dict
from .gate import engine_parity
from .int8_stage import int8_held_out
from .reuse_keys import stage_key
from .stages import ExportContext, check_gate, run_stage
from .trt import build_engine, input_profiles

__all__ = ["engine_stage"]


def _engine_sources(ctx: ExportContext) -> dict[str, str]:
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


def engine_stage(ctx: ExportContext) -> None:
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
    engines, ctx.report.reused_engines = run_stage(
        ctx, "TensorRT engines", key, old.key if old else None, old,
        lambda: Engines(tensorrt=trt.__version__, gpu=gpu, compute_capability=cc, precision=spec.precision,
                        batch=spec.batch, workspace_gib=spec.workspace_gib, key=key, graphs=_build_engines(ctx, sources)))
    ctx.manifest = ctx.built.replace(engines=engines, precision=spec.precision)
    if ctx.report.reused_engines:
        assert ctx.previous is not None  # reused only from a previous manifest
        ctx.report.parity += [check_from_dict(r) for r in ctx.previous.parity.engines]
        return
    held_out = int8_held_out(ctx)[:2] if spec.precision == "int8" else None
    ctx.report.parity += check_gate(engine_parity(ctx.model, ctx.manifest, override=ctx.options.tolerance_override,
                                             held_out=held_out, columns=ctx.cfg.outputs), ctx.progress)


def _build_engines(ctx: ExportContext, sources: Mapping[str, str]) -> dict[str, EngineGraph]:
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
