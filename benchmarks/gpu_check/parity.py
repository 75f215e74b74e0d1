"""Part 1: the torch backend on the GPU (FP32, FP16 channels-last, each also with ``--compile``) against the
same backend's CPU FP32 run, per branch and on the scores, judged by the gates' bounds table.

Inputs are the engine gate's: seeded images and the gate's odd prompts (empty, ~200 words, CJK/HTML/emoji).
Branches: feature map, image embedding, text embedding, cross pool (``pooled``), read through the backend's
own engine calls, so what is checked is the code that scores. The FP32 rule's floor (the reference's own FP32
error) comes from the same model in float64 on the same inputs. Bounds: ``ipiqa.export.checks.BOUNDS``.
"""
from __future__ import annotations

import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from .context import Context
from .parts import NOT_RUN, PartResult, progress, status_of

__all__ = ["BRANCHES", "Variant", "variants", "branch_outputs", "float64_outputs", "judge", "bounds_text", "part"]

BRANCHES = ("feature_map", "image_embedding", "text_embedding", "pooled")


@dataclass(frozen=True)
class Variant:
    name: str
    fp16: bool
    compile: bool
    tf32: bool = True  # torch's defaults: cuDNN convolutions may use TF32 (matmuls do not)


def variants(compiled: bool) -> tuple[Variant, ...]:
    """The eager variants (FP32 as torch runs it, FP32 with TF32 off, FP16), or the ``--compile`` ones."""
    if compiled:
        return Variant("fp32-compile", False, True), Variant("fp16-compile", True, True)
    return Variant("fp32", False, False), Variant("fp32-no-tf32", False, False, tf32=False), Variant("fp16", True, False)


def _batches(n: int, batch: int):
    return (slice(i, min(i + batch, n)) for i in range(0, n, batch))


def branch_outputs(backend: Any, images: np.ndarray, tokens: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Every branch of a ``TorchBackend`` and its scores. Where the backend exposes its branches as the gates read
    them (``image_outputs``/``fusion_outputs``), through the gates' own ``run_graphs``; else through its engine
    calls (``_encode_image``: the handle it fuses from; the cross pool as ``_fuse`` computes it), the scores
    through ``score``, the call users run."""
    from ipiqa.runtime.backends.base import Backend

    if type(backend).image_outputs is not Backend.image_outputs:
        from ipiqa.export.graph_runs import run_graphs

        return run_graphs(backend, images, tokens, batch)
    torch = backend.torch
    out: dict[str, list] = {}
    for part in _batches(len(images), batch):
        feature_map, embedding = backend._encode_image(np.ascontiguousarray(images[part]))
        text = backend.encode_text(tokens[part])
        with torch.inference_mode():
            model = backend.model
            pooled = model.txt_attnpool(feature_map, torch.from_numpy(text).to(backend.device, backend.dtype),
                                        model.single_query_pooling)
        values = {"feature_map": feature_map, "image_embedding": embedding, "text_embedding": text, "pooled": pooled,
                  "scores": backend.score(images[part], text)}
        for k, v in values.items():
            out.setdefault(k, []).append(v if isinstance(v, np.ndarray) else v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def float64_outputs(model_path: Any, images: np.ndarray, tokens: np.ndarray, batch: int, device: str) -> dict[str, np.ndarray]:
    """The same model in float64 (single-query pools, as the backend serves it) on ``device``: the floor."""
    import torch

    from ipiqa.checkpoint import load_model

    model = load_model(model_path).to(device, torch.float64).eval()
    out: dict[str, list] = {}
    with torch.inference_mode():
        for part in _batches(len(images), batch):
            fmap, emb = model.encode_pixels(torch.from_numpy(np.ascontiguousarray(images[part])).to(device))
            text = model.encode_text(torch.from_numpy(tokens[part]).to(device))
            values = {"feature_map": fmap, "image_embedding": emb, "text_embedding": text,
                      "pooled": model.txt_attnpool(fmap, text, model.single_query_pooling),
                      "scores": model.fuse(fmap, emb, text)}
            for k, v in values.items():
                out.setdefault(k, []).append(v.cpu().numpy())
    del model
    return {k: np.concatenate(v) for k, v in out.items()}


def judge(label: str, precision: str, ref: dict, ref64: dict, out: dict, columns) -> list:
    """Check objects (the gates' own classes) for one run against the CPU FP32 reference.

    FP32: every branch and the scores by the FP32 rule (``compare``: ``max(1e-4 x max(1, scale), k x floor)``),
    the cross pool relative to its own scale as the ONNX gate checks it. FP16: every branch by per-row cosine,
    the scores by ``fp16_gate.score_results`` (absolute bound, Spearman where they spread)."""
    from ipiqa.export.checks import bounds_for
    from ipiqa.export.fp16_gate import score_results
    from ipiqa.export.measures import cosine_result, with_spread_note
    from ipiqa.export.parity import compare

    checks: list = []
    if precision == "fp32":
        for branch in BRANCHES:
            # the pool peaks near 0.1 on an untrained model: relative to its own scale, as the ONNX gate does
            scale = (float(np.abs(ref[branch]).max(initial=0.0)) or 1.0) if branch == "pooled" else 1.0
            name = f"{label}/{branch}" + (" (relative)" if branch == "pooled" else "")
            checks.append(compare(name, ref[branch] / scale, out[branch] / scale, ref64=ref64[branch] / scale))
        checks.append(compare(f"{label}/scores", ref["scores"], out["scores"], scores=True, ref64=ref64["scores"]))
    else:
        bound = bounds_for(precision).cosine_min
        checks += [with_spread_note(cosine_result(f"{label}/{b}", ref[b], out[b], bound), ref[b]) for b in BRANCHES]
        checks += score_results(f"{label}/scores", ref["scores"], out["scores"], columns)
    return checks


def _spearman_min(ref: np.ndarray, out: np.ndarray) -> Optional[float]:
    """The gates' figure (``parity.worst_spearman``): reported for every run, gated only where scores spread."""
    from ipiqa.export.parity import worst_spearman

    return worst_spearman(ref.reshape(len(ref), -1), out.reshape(len(out), -1))


def _fmt(value: Optional[float]) -> str:
    return "n/a (no column ranks)" if value is None else f"{value:.5f}"


def bounds_text() -> str:
    from ipiqa.export.checks import bounds_for

    fp32, fp16 = bounds_for("fp32"), bounds_for("fp16")
    return (f"BOUNDS fp32: max|d| <= max({fp32.rtol:g} x max(1, scale), {fp32.floor_multiple:g} x floor) per branch "
            f"and scores; fp16: per-row cosine >= {fp16.cosine_min} per branch, scores |d| <= {fp16.atol:g}, "
            f"Spearman >= {fp16.spearman_min} where scores spread")


def _row(variant: str, check: Any, extra: dict) -> dict:
    record = check.to_dict()
    return {"variant": variant, "check": check.name, "measure_name": type(check).measure_name,
            "measure": record["measure"], "bound": record["bound"], "max_abs": record["max_abs"],
            "passed": check.passed, "note": record["note"], **extra}


def _references(ctx: Context) -> tuple[Any, dict, dict]:
    """(gate inputs, CPU FP32 outputs, float64 outputs), computed once for the eager and the compiled part."""
    if "parity" not in ctx.memo:
        from ipiqa.export.gate import gate_inputs
        from ipiqa.runtime.backends.pytorch import TorchBackend

        s = ctx.settings
        x = gate_inputs(ctx.cfg, s.parity_inputs, seed=1)
        progress(f"parity: CPU FP32 reference on {s.parity_inputs} inputs")
        reference = TorchBackend(ctx.model_path, "cpu")
        ref = branch_outputs(reference, x.image, x.tokens, s.parity_batch)
        reference.close()
        progress(f"parity: float64 floor on {s.device}")
        ctx.memo["parity"] = x, ref, float64_outputs(ctx.model_path, x.image, x.tokens, s.parity_batch, s.device)
    return ctx.memo["parity"]


@contextmanager
def _tf32(torch: Any, allowed: bool) -> Iterator[None]:
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if not allowed:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@contextmanager
def _dry_compile(torch: Any, dry_run: bool) -> Iterator[None]:
    """Dry run: ``torch.compile`` with dynamo's eager backend, so the compiled code path (tracing, guards, the
    backend's wiring) runs on a CPU in seconds; inductor's C++ builds would take minutes there."""
    if not dry_run:
        yield
        return
    original = torch.compile
    torch.compile = lambda fn, **kw: original(fn, **{**kw, "backend": "eager", "mode": None})
    try:
        yield
    finally:
        torch.compile = original


def _run_variant(ctx: Context, v: Variant, x: Any, ref: dict, ref64: dict) -> tuple[list[dict], str]:
    """One variant's rows and its summary phrase."""
    import torch

    from ipiqa.runtime.backends.pytorch import TorchBackend

    s = ctx.settings
    fp16 = v.fp16 and s.fp16
    label = v.name if fp16 == v.fp16 else f"{v.name} (dry run: FP32 on CPU)"
    if v.compile and s.dry_run:
        label += " (dry run: dynamo, eager backend)"
    progress(f"parity: {label} on {s.device}")
    with _dry_compile(torch, s.dry_run):
        backend = TorchBackend(ctx.model_path, s.device, fp16=fp16, compile=v.compile)
    with _tf32(torch, v.tf32):
        try:
            out = branch_outputs(backend, x.image, x.tokens, s.parity_batch)
        finally:
            backend.close()
            if s.device == "cuda":
                torch.cuda.empty_cache()
        extra = {"backend": backend.name, "spearman_min": _spearman_min(ref["scores"], out["scores"]),
                 "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                 "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    checks = judge(label, "fp16" if v.fp16 else "fp32", ref, ref64, out, ctx.cfg.outputs)
    for c in checks:
        progress(f"  {c.line()}")
    scores = [c for c in checks if c.name.startswith(f"{label}/scores")]
    cosines = [c.measure for c in checks if type(c).measure_name == "min cosine"]
    summary = (f"{v.name}: {sum(c.passed for c in checks)}/{len(checks)} pass, scores max|d| "
               f"{max(c.max_abs for c in scores):.2e}, Spearman {_fmt(extra['spearman_min'])}"
               + (f", min cosine {min(cosines):.6f}" if cosines else ""))
    return [_row(v.name, c, extra) for c in checks], summary


def part(ctx: Context, compiled: bool = False) -> PartResult:
    """The eager variants, or (``compiled``) the ``--compile`` ones: a part of their own, run last, since their
    builds take the longest and must not keep the other parts from running. A variant that raises is a failed
    row; the next variant still runs."""
    x, ref, ref64 = _references(ctx)
    rows: list[dict] = []
    notes: list[str] = []
    summaries: list[str] = []
    for v in variants(compiled):
        if v.compile and not ctx.settings.compile:
            rows.append({"variant": v.name, "check": f"{v.name}/*", "passed": None, "note": f"{NOT_RUN}: --no-compile"})
            notes.append(f"{v.name}: {NOT_RUN} (--no-compile)")
            continue
        try:
            variant_rows, summary = _run_variant(ctx, v, x, ref, ref64)
        except Exception as exc:  # noqa: BLE001 - this variant's failure, reported; the others still run
            summary = f"{v.name}: ERROR {type(exc).__name__}: {exc}".splitlines()[0][:300]
            variant_rows = [{"variant": v.name, "check": f"{v.name}/*", "passed": False, "note": summary,
                             "traceback": traceback.format_exc()}]
            progress(f"  {summary}")
        rows += variant_rows
        summaries.append(summary)
    judged = [r["passed"] for r in rows if r["passed"] is not None]
    return PartResult("parity-compile" if compiled else "parity", status_of(judged) if judged else NOT_RUN,
                      bounds_text(), "; ".join(summaries) or "nothing ran", tuple(rows), tuple(notes))
