"""The text graph at BF16 on OpenVINO, gated per prompt (``ipiqa-export --bf16``, CPUs with AMX or AVX512-BF16).

Why: at ~1 image per prompt the text graph runs for nearly every image; on a BF16 CPU OpenVINO runs it at about
half its FP32 time (RN50-512, cut calls: 16.6 against 29.5 ms per prompt, measured on a 2-core Zen 4). What
runs: the FP32 text graph as ``OpenVinoBackend`` serves it at BF16, its end-of-text search moved onto int32 ids
(``runtime.backends.openvino_text``); without that move the search reads the wrong row (cosine 0.43).

The gate: per-prompt text-embedding cosine >= ``BOUNDS["bf16"].cosine_min`` (0.999, the BF16 table's bound for
every intermediate tensor) against ``OrtBackend`` FP32, over the gate's adversarial prompts and every distinct
prompt of the three label files (``text_gate_prompts``), streamed. Never fatal: recorded as ``onnx.bf16_text``;
a failed gate (or an OpenVINO refusal of the rewrite) leaves the text graph FP32, as before.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Mapping, Optional

from ipiqa._optional import require
from ipiqa.manifest import Bf16TextGate, to_plain

from .checks import BOUNDS
from .prompt_sets import datasets_folder
from .reuse_keys import stage_key
from .stages import ExportContext, run_stage
from .text_int8 import TextInt8Gate, compare_text, text_gate_prompts
from .text_reference import TextReference, prompt_digest

__all__ = ["text_bf16_gate", "text_bf16_stage"]


def text_bf16_gate(fp32: Mapping[str, Path], prompts: Iterable[str], tokenize, source: str = "",
                   batch: int = 64, reference: Optional[TextReference] = None) -> TextInt8Gate:
    """The FP32 text graph through ``OpenVinoBackend`` with the text graph served at BF16 against ONNX Runtime FP32,
    prompt by prompt. An exception from OpenVINO (a graph whose end-of-text search cannot be moved) is a failed gate
    with its reason, never the export's end. ``reference``: the export's shared FP32 embeddings of these prompts."""
    from ipiqa.runtime.backends.openvino import OpenVinoBackend

    prompts = list(prompts)
    reference = reference or TextReference(fp32, prompts, tokenize, batch)
    reference.check_prompts(prompts)
    bound = BOUNDS["bf16"].cosine_min
    graphs = {name: Path(path) for name, path in fp32.items()}
    served = {name: "bf16" if name == "text_encoder" else "fp32" for name in graphs}  # only the text graph judged
    try:
        with OpenVinoBackend.from_graphs(graphs, "bf16", served=served) as low:
            worst, max_abs, worst_i = compare_text(reference, low)
    except Exception as exc:  # noqa: BLE001 - any OpenVINO failure is this optional gate's result
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
        return TextInt8Gate(float("nan"), float("nan"), len(prompts), source, bound, reason, label="bf16")
    return TextInt8Gate(worst, max_abs, len(prompts), source, bound, None, prompts[worst_i][:80] if prompts else "",
                        label="bf16")


def text_bf16_stage(ctx: ExportContext) -> None:
    """``--bf16-text`` (with ``--bf16``): the gate above, recorded in ``onnx.bf16_text`` whether it passed or not;
    reused while the FP32 graphs, the prompts, OpenVINO and the CPU class are the same."""
    from ipiqa.runtime.cpu import bf16_flags, describe

    if not ctx.cfg.text:
        ctx.progress("BF16 text gate: this model has no text branch; nothing to gate")
        return
    ov = require("openvino", extra="openvino")
    prompts, source = text_gate_prompts(datasets_folder())
    runtime, cpu = f"openvino {ov.__version__}", f"{describe()} ({', '.join(bf16_flags())})"
    key = stage_key(ctx.onnx_key, "bf16-text", prompt_digest(prompts), runtime, cpu)
    old = ctx.previous.onnx.bf16_text if ctx.previous else None
    entry, ctx.report.reused_bf16_text = run_stage(ctx, "BF16 text gate", key, old.key if old else None, old,
                                                   lambda: _gate_record(ctx, key, prompts, source, runtime, cpu))
    ctx.with_onnx(bf16_text=entry)
    ctx.report.bf16_text = to_plain(entry)


def _gate_record(ctx: ExportContext, key: str, prompts: list, source: str, runtime: str, cpu: str) -> Bf16TextGate:
    start = time.perf_counter()
    ctx.progress(f"BF16 text gate: {len(prompts)} prompts ({source}) on {runtime}")
    gate = text_bf16_gate(ctx.fp32_graphs(), prompts, None, source, reference=ctx.text_reference(prompts))
    served = ("served at BF16 by OpenVINO (bf16, int8) on BF16 CPUs" if gate
              else "not served: OpenVINO keeps the text graph FP32")
    ctx.progress(f"BF16 text gate: {gate.line()} ({served}; {time.perf_counter() - start:.1f}s)")
    return Bf16TextGate(key=key, runtime=runtime, cpu=cpu, passed=gate.passed, min_cosine=gate.min_cosine,
                        prompts=gate.prompts, prompt_source=source, gate=gate.to_dict(),
                        seconds=round(time.perf_counter() - start, 2))
