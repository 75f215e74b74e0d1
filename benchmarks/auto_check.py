"""``auto`` measured, not assumed: the ``auto`` row against the fastest gated CPU row of the same run.

``--precision auto`` on CPU follows one rule (``cpu_auto_choice``); this check is what says whether that rule
picked well on the machine the benchmark ran on. When it fails, the rule is what changes (with that machine's
figures in its docstring), never this check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = ["AUTO_ROW", "GATED_ROWS", "TOLERANCE", "AutoCheck", "check_auto", "auto_reason", "markdown"]

AUTO_ROW = "auto"
# The explicit CPU rows auto could serve instead: the same single-query bundle, each precision only where its
# gate passed at export (a row whose gate did not pass has no figure, so it is never the fastest).
GATED_ROWS = ("onnxruntime-cpu", "onnxruntime-cpu-int8", "openvino-cpu", "openvino-cpu-bf16", "openvino-cpu-int8")
TOLERANCE = 0.10


@dataclass(frozen=True)
class AutoCheck:
    """One prompt mix: auto's best batch against the fastest gated row's best batch. ``passed`` is None where
    there is nothing to compare (no auto figure or no gated row measured); ``note`` then says which."""

    images_per_prompt: int
    picked: Optional[str]
    auto_images_per_s: Optional[float]
    auto_batch: Optional[int]
    fastest: Optional[str]
    fastest_images_per_s: Optional[float]
    fastest_batch: Optional[int]
    ratio: Optional[float]
    passed: Optional[bool]
    note: str


def _best(rows: list[dict], name: str) -> Optional[dict]:
    measured = [r for r in rows if r["backend"] == name and r.get("images_per_s")]
    return max(measured, key=lambda r: r["images_per_s"], default=None)


def check_auto(runs: Iterable[dict], tolerance: float = TOLERANCE) -> list[AutoCheck]:
    """Per prompt mix in the run: passed when auto's best rate >= (1 - tolerance) x the fastest gated row's best.
    Rows are the engine table's dicts (``backend``, ``batch``, ``images_per_s``, ``images_per_prompt``,
    and ``picked`` on the auto row: the backend auto chose)."""
    runs = list(runs)
    mixes = list(dict.fromkeys(r.get("images_per_prompt") for r in runs))
    out = []
    for mix in mixes:
        rows = [r for r in runs if r.get("images_per_prompt") == mix]
        auto = _best(rows, AUTO_ROW)
        picked = next((r.get("picked") for r in rows if r["backend"] == AUTO_ROW and r.get("picked")), None)
        gated = [b for b in (_best(rows, name) for name in GATED_ROWS) if b is not None]
        fastest = max(gated, key=lambda r: r["images_per_s"], default=None)
        if auto is None or fastest is None:
            note = "no auto figure in this run" if auto is None else "no gated row measured in this run"
            out.append(AutoCheck(mix, picked, auto and auto["images_per_s"], auto and auto["batch"],
                                 fastest and fastest["backend"], fastest and fastest["images_per_s"],
                                 fastest and fastest["batch"], None, None, note + ": nothing to compare"))
            continue
        ratio = auto["images_per_s"] / fastest["images_per_s"]
        passed = ratio >= 1.0 - tolerance
        note = (f"within {tolerance:.0%} of the fastest gated row" if passed else
                f"more than {tolerance:.0%} below the fastest gated row: the rule in cpu_auto_choice should change")
        out.append(AutoCheck(mix, picked, auto["images_per_s"], auto["batch"], fastest["backend"],
                             fastest["images_per_s"], fastest["batch"], ratio, passed, note))
    return out


def auto_reason(manifest, flags: frozenset) -> str:
    """What ``cpu_auto_choice`` read to pick: the bundle's gate records and the CPU flags its rule looks at
    (the rule itself lives in ``cpu_auto_choice`` alone and is quoted, not re-derived)."""
    from ipiqa.runtime.cpu import BF16_FLAGS, INT8_DOT_FLAGS

    int8 = manifest.onnx.int8.get("cpu") if manifest.onnx.int8 else None
    gates = [f"INT8 image graph gated: {'yes' if int8 else 'no'}",
             f"OpenVINO INT8 gate passed: {'yes' if int8 and int8.openvino_passed else 'no'}"
             + (f" ({int8.openvino.get('quantizer', 'onnxruntime-qdq')})" if int8 and int8.openvino_passed else ""),
             f"BF16 gate recorded: {'yes' if 'bf16' in manifest.onnx_precisions else 'no'}"]
    have = lambda names: ", ".join(f for f in names if f in flags) or "none"  # noqa: E731
    return ("cpu_auto_choice: BF16 on OpenVINO first where the CPU has AMX (or the bundle has no INT8 graph); else "
            "the INT8 image graph (where it computes here as gated), on OpenVINO where its gate passed and the CPU "
            f"has INT8 dot products, on ONNX Runtime otherwise; else ONNX Runtime FP32. Bundle: {'; '.join(gates)}. CPU: INT8 dot flags "
            f"{have(INT8_DOT_FLAGS)}; BF16 flags {have(BF16_FLAGS)}")


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(checks: list[AutoCheck], reason: str = "") -> str:
    lines = [f"| images per prompt | auto picked | auto img/s (batch) | fastest gated row | its img/s (batch) | "
             f"auto / fastest | within {TOLERANCE:.0%} |", "| ---: | --- | ---: | --- | ---: | ---: | --- |"]
    for c in checks:
        verdict = "n/a" if c.passed is None else ("pass" if c.passed else "**FAIL**")
        lines.append(f"| {c.images_per_prompt} | {c.picked or ''} | {_fmt(c.auto_images_per_s, '.2f')} "
                     f"({_fmt(c.auto_batch, 'd')}) | {c.fastest or ''} | {_fmt(c.fastest_images_per_s, '.2f')} "
                     f"({_fmt(c.fastest_batch, 'd')}) | {_fmt(c.ratio, '.2f')} | {verdict}: {c.note} |")
    if reason:
        lines += ["", f"Why: {reason}."]
    return "\n".join(lines)
