"""The INT8 text stage of ``export_bundle`` (``--int8-text``): the text graph quantized (``text_int8``) and
gated per prompt on this CPU; recorded in ``onnx.int8_text`` whether it passed or not, never fatal: a failed
gate leaves ``--precision int8`` on the FP32 text graph, as without the flag."""
from __future__ import annotations

import time

from ipiqa.manifest import Int8TextGraph, to_plain

from .reuse_keys import stage_key
from .stages import ExportContext, run_stage
from .text_reference import prompt_digest

__all__ = ["text_int8_stage", "TEXT_INT8_FILE"]

TEXT_INT8_FILE = "int8/text_encoder.cpu.onnx"


def _cpu() -> str:
    from ipiqa.runtime.cpu import describe, int8_dot_flags

    flags = int8_dot_flags()
    return f"{describe()} ({', '.join(flags) or 'no int8 dot-product flags'})"


def text_int8_stage(ctx: ExportContext) -> None:
    from .prompt_sets import datasets_folder
    from .text_int8 import TEXT_SETTINGS, text_gate_prompts

    if not ctx.cfg.text:
        ctx.progress("INT8 text graph: this model has no text branch; nothing to quantize")
        return
    import onnxruntime

    prompts, source = text_gate_prompts(datasets_folder())
    digest = prompt_digest(prompts)
    cpu = _cpu()  # the kernels judged: another CPU class re-gates
    key = stage_key(ctx.onnx_key, "int8-text", TEXT_SETTINGS, digest, cpu, onnxruntime.__version__)
    old = ctx.previous.onnx.int8_text if ctx.previous else None
    entry, ctx.report.reused_int8_text = run_stage(ctx, "INT8 text graph", key, old.key if old else None, old,
                                                   lambda: _build(ctx, key, prompts, source, cpu))
    ctx.with_onnx(int8_text=entry)
    ctx.report.int8_text = to_plain(entry)


def _build(ctx: ExportContext, key: str, prompts: list, source: str, cpu: str) -> Int8TextGraph:
    """Quantize and gate: 7-bit weights first (safe from the 16-bit sums of AVX2 without VNNI, like the CPU
    image graph), then full-range 8-bit weights where that misses the bound."""
    from .text_int8 import quantize_text_graph, text_int8_gate

    start = time.perf_counter()
    ctx.progress(f"INT8 text graph: gating on {len(prompts)} prompts ({source})")
    fp32, out = ctx.fp32_graphs(), ctx.out / TEXT_INT8_FILE
    attempts = []
    for reduce_range in (True, False):
        settings = quantize_text_graph(fp32["text_encoder"], out, reduce_range=reduce_range)
        gate = text_int8_gate(fp32, out, prompts, None, source, reference=ctx.text_reference(prompts))
        attempts.append(f"reduce_range={reduce_range}: {gate.line()}")
        ctx.progress(f"INT8 text graph, reduce_range={reduce_range}: {gate.line()}")
        if gate:
            break
    served = "served by --precision int8 on ONNX Runtime" if gate else "not served: --precision int8 keeps the FP32 text graph"
    ctx.progress(f"INT8 text graph: {TEXT_INT8_FILE} ({served}; {time.perf_counter() - start:.1f}s)")
    return Int8TextGraph(file=TEXT_INT8_FILE, key=key, settings=settings, passed=gate.passed,
                         min_cosine=gate.min_cosine, prompts=gate.prompts, prompt_source=source, gate=gate.to_dict(),
                         cpu=cpu, attempts=tuple(attempts), seconds=round(time.perf_counter() - start, 2))
