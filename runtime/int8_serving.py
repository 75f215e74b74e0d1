"""Which of a bundle's INT8 graphs compute on this CPU as their gate measured them: the one rule every INT8 entry
point reads (``OrtBackend``, ``OpenVinoBackend``, ``cpu_auto_choice``).

A gate ran on the export machine's kernels. Graphs with 7-bit weights (``reduce_range``, the CPU default of both
the image and the text graph) compute alike on every CPU; full-range 8-bit weights overflow the 16-bit pair sums of
u8 x s8 kernels on CPUs without INT8 dot products (``cpu.int8_weights_refusal``). So a full-range graph gated on a
VNNI machine is never served on an AVX2 one: the text graph falls back to FP32 (documented, as where its gate
failed), the image graph is refused with the fix (it is what ``--precision int8`` asks for). NNCF's IR for
OpenVINO has full-range weights (its overflow fix covers the first layer only): it is served without INT8 dot
products only where its gate ran without them too (``cpu_int8_dot`` in its record).
"""
from __future__ import annotations

from typing import Optional

from ipiqa.bundle import Manifest, rebuild_command
from ipiqa.errors import IPIQAError

from .cpu import int8_weights_refusal

__all__ = ["image_int8_refusal", "refuse_int8_image_here", "openvino_ir_refusal", "refuse_openvino_int8_here",
           "text_int8_servable"]


def image_int8_refusal(manifest: Manifest, flags: Optional[frozenset[str]] = None) -> Optional[str]:
    """None where the bundle's CPU INT8 QDQ image graph computes here as gated (or there is none), else why not."""
    entry = manifest.onnx.int8.get("cpu") if manifest.onnx.int8 else None
    if entry is None:
        return None
    return int8_weights_refusal(bool(entry.settings.get("reduce_range", False)), entry.file, flags)


def refuse_int8_image_here(manifest: Manifest) -> None:
    """Raise, naming the fix, where ``image_int8_refusal`` says the INT8 image graph would be wrong on this CPU."""
    reason = image_int8_refusal(manifest)
    if reason:
        raise IPIQAError(f"{manifest.root}: {reason}; re-export without cpu.reduce_range=false "
                         f"({rebuild_command('int8')}), or serve --precision fp32 on this CPU")


def text_int8_servable(manifest: Manifest, flags: Optional[frozenset[str]] = None) -> bool:
    """The INT8 text graph serves (ONNX Runtime, ``--precision int8``) where its gate passed and it computes here
    as gated; else the FP32 text graph runs, as without it."""
    graph = manifest.onnx.int8_text
    if graph is None or not graph.passed:
        return False
    return int8_weights_refusal(bool(graph.settings.get("reduce_range", False)), graph.file, flags) is None


def openvino_ir_refusal(manifest: Manifest, flags: Optional[frozenset[str]] = None) -> Optional[str]:
    """None where OpenVINO's own INT8 image graph (NNCF's IR) computes here as gated (or there is none), else why
    not: gated on a CPU with INT8 dot products (an unrecorded CPU counts as one), served on one without."""
    entry = manifest.onnx.int8.get("cpu") if manifest.onnx.int8 else None
    if entry is None or not entry.openvino_file:
        return None
    gated_with_dot = bool((entry.openvino or {}).get("cpu_int8_dot", True))
    return int8_weights_refusal(not gated_with_dot, f"{entry.openvino_file} (gated on a CPU with INT8 dot products)",
                                flags)


def refuse_openvino_int8_here(manifest: Manifest) -> None:
    """Raise, naming the fix, where the INT8 image graph OpenVINO would serve (NNCF's IR where recorded, else the
    QDQ graph) would be wrong on this CPU. A bundle without INT8 graphs passes: ``graph_path`` refuses it."""
    entry = manifest.onnx.int8.get("cpu") if manifest.onnx.int8 else None
    if entry is None:
        return
    if not entry.openvino_file:
        refuse_int8_image_here(manifest)
    elif reason := openvino_ir_refusal(manifest):
        raise IPIQAError(f"{manifest.root}: {reason}; serve INT8 with --backend onnxruntime on this CPU, or "
                         "re-export the INT8 graph on a CPU like it")
