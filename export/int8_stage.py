"""The INT8 stage of ``export_bundle``: the image graph quantized per target on the user's images, gated on
held-out ones; and the held-out inputs both INT8 gates (CPU graph, engines) judge on."""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional

from ipiqa.manifest import Int8Calibration, Int8Graph, to_plain
from ipiqa.model import tokenize

from .gate import PARITY_PROMPTS
from .reuse_keys import stage_key
from .stages import ExportContext, run_stage

__all__ = ["int8_stage", "int8_held_out"]


def int8_stage(ctx: ExportContext) -> None:
    """The image graph quantized per target on the user's images and gated on held-out ones (Int8GateError
    below the bar); text and fusion stay FP32 on the CPU and come from ``fp16/`` for engines."""
    from .calibration import calibration_batches, calibration_fingerprint, split_calibration

    opts, cfg = ctx.options.int8, ctx.cfg
    if opts is None:
        return
    split = split_calibration(opts.calibration)
    calibration_files = calibration_fingerprint(split)
    inputs: dict[str, Any] = {}  # calibration batches and held-out images, read once, when a target is built

    def prepared() -> dict[str, Any]:
        if not inputs:
            start = time.perf_counter()
            inputs["batches"] = list(calibration_batches(list(split.calibration), cfg.resolution, opts.size))
            inputs["held"], inputs["tokens"], inputs["source"] = int8_held_out(ctx, split)
            ctx.progress(f"INT8: {sum(len(b) for b in inputs['batches'])} calibration images, {len(inputs['held'])} "
                         f"held out (prompts: {inputs['source']}) ({time.perf_counter() - start:.1f}s)")
        return inputs

    entries: dict[str, Int8Graph] = {}
    reused = []
    openvino = _openvino_kernels()
    for target in ctx.options.int8_targets:
        key = stage_key(ctx.onnx_key, "int8", target, calibration_files, opts.size, dict(opts.settings.get(target, {})),
                        openvino if target == "cpu" else None)
        old = ctx.previous.onnx.int8.get(target) if ctx.previous else None
        entries[target], again = run_stage(ctx, f"INT8 image graph for {target}", key, old.key if old else None, old,
                                        lambda: _build_int8(ctx, target, key, prepared()))
        reused.append(again)
    ctx.report.reused_int8 = all(reused)
    ctx.with_onnx(int8=entries)
    ctx.report.int8 = {target: to_plain(e) for target, e in entries.items()}


def _openvino_version() -> Optional[str]:
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino

    return f"openvino {openvino.__version__}"


def _openvino_kernels() -> Optional[str]:
    """The CPU stage's reuse key part: the OpenVINO version, and NNCF's where it makes the OpenVINO INT8 graph
    (a new NNCF re-quantizes; without NNCF the key is what it was before NNCF was used)."""
    from . import openvino_int8

    runtime, nncf = _openvino_version(), openvino_int8.nncf_version()
    return f"{runtime}; {nncf}" if runtime and nncf else runtime


def _reason(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"


def _nncf_graph(ctx: ExportContext, runtime: str, inputs: Mapping[str, Any], reference: Mapping[str, Any],
                size: int) -> dict:
    """OpenVINO's own INT8 image graph (NNCF, ``openvino_int8``) in the bundle, gated like the QDQ graph there.
    A passing record (``quantizer`` "nncf X", ``file``, ``settings``, ``attempts``, ``gate``), or ``{"nncf":
    reason}`` (+ ``nncf_attempts`` where it was gated) for the caller to fall back to the QDQ graph; never raises."""
    from . import openvino_int8

    version = openvino_int8.nncf_version()
    if version is None:
        return {"nncf": "NNCF is not installed (pip install 'ipiqa[openvino]')"}
    xml = ctx.out / openvino_int8.NNCF_FILE
    try:
        result = openvino_int8.quantize_and_gate_openvino(
            ctx.fp32_graphs(), xml, inputs["batches"], inputs["held"], inputs["tokens"], ctx.cfg.outputs,
            calibration_size=size, reference=reference)
    except Exception as exc:  # noqa: BLE001 - NNCF or OpenVINO failing is this optional graph's result, not the export's
        _remove_ir(xml)
        return {"nncf": f"{version} raised {_reason(exc)}"}
    for r in result.gate.results:
        ctx.progress(f"[cpu on {runtime}, {version}] {r.line()}")
    if not result.gate:
        _remove_ir(xml)  # no file the manifest does not list stays in the bundle
        failed = "; ".join(r.line() for r in result.gate.results if not r) or result.gate.criterion
        return {"nncf": f"{version} missed the INT8 bounds with {len(result.settings.ignored)} layers FP32 ({failed})",
                "nncf_attempts": list(result.attempts)}
    from ipiqa.runtime.cpu import int8_dot_flags

    return {"runtime": runtime, "quantizer": version, "file": openvino_int8.NNCF_FILE,
            "cpu_int8_dot": bool(int8_dot_flags()),  # int8_serving.openvino_ir_refusal reads it
            "settings": result.settings.to_dict(), "attempts": list(result.attempts), "gate": result.gate.to_dict()}


def _remove_ir(xml) -> None:
    for path in (xml, xml.with_suffix(".bin")):
        path.unlink(missing_ok=True)


def _openvino_gate(ctx: ExportContext, rel: str, settings: Any, inputs: Mapping[str, Any],
                   reference: Mapping[str, Any], size: int) -> Optional[dict]:
    """OpenVINO's INT8 image graph and its gate on the same held-out images (``Int8Graph.openvino``); recorded,
    never fatal. First NNCF's graph for OpenVINO (``_nncf_graph``: ``quantizer`` "nncf X", ``file``); where NNCF is
    missing, raises or misses the bounds, the CPU QDQ graph through OpenVINO's int8 kernels (``quantizer``
    "onnxruntime-qdq", ``nncf``: why not NNCF's). A failure there, an exception from OpenVINO included (a graph
    its reader or CPU plugin refuses), is a failed gate with its reason, and only keeps ``auto`` on ONNX Runtime
    for INT8."""
    from .int8 import Int8Gate, int8_gate

    runtime = _openvino_version()
    if runtime is None:
        return None
    nncf = _nncf_graph(ctx, runtime, inputs, reference, size)
    if "nncf" not in nncf:
        return nncf
    ctx.progress(f"[cpu on {runtime}] OpenVINO's own INT8 graph not used: {nncf['nncf']}; gating the QDQ graph there")
    record = {"runtime": runtime, "quantizer": "onnxruntime-qdq", **nncf}
    try:
        gate = int8_gate(ctx.fp32_graphs(), ctx.out / rel, settings, inputs["held"], inputs["tokens"],
                         ctx.cfg.outputs, runtime="openvino", reference=reference)
    except Exception as exc:  # noqa: BLE001 - any OpenVINO failure is this optional gate's result, not the export's
        reason = _reason(exc)
        ctx.progress(f"[cpu on {runtime}] OpenVINO INT8 gate failed ({reason}); INT8 is served on ONNX Runtime")
        return {**record, "gate": Int8Gate(settings, (), len(inputs["held"]), error=reason).to_dict()}
    for r in gate.results:
        ctx.progress(f"[cpu on {runtime}] {r.line()}")
    return {**record, "gate": gate.to_dict()}


def _build_int8(ctx: ExportContext, target: str, key: str, inputs: Mapping[str, Any]) -> Int8Graph:
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
        seconds=round(time.perf_counter() - start, 2),
        openvino=(_openvino_gate(ctx, rel, gate.settings, inputs, result.reference, gate.settings.calibration_size)
                  if target == "cpu" else None))
    ctx.progress(f"INT8 image graph for {target}: {rel} ({entry.seconds:.1f}s; {gate.criterion})")
    return entry


def int8_held_out(ctx: ExportContext, split=None) -> tuple:
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
