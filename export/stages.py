"""What every stage of ``export_bundle`` shares: the export context it reads and adds to, the reuse rule
(``run_stage``) and the gate rule (``check_gate``). Torch-free itself: the model and the graph specs it
carries are only named in annotations (``TYPE_CHECKING``); the stages that use them import torch."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from ipiqa.config import IPIQAConfig
from ipiqa.manifest import Manifest

from .checks import Check
from .options import ExportOptions, ParityGateError

if TYPE_CHECKING:
    from ipiqa.model import IPIQA

    from .graphs import GraphSpec
    from .text_reference import TextReference

__all__ = ["ExportReport", "ExportContext", "run_stage", "check_gate"]
T = TypeVar("T")


@dataclass
class ExportReport:
    bundle: Path
    parity: list[Check]  # FP32 gate, then the engine gate
    fp16: Optional[dict] = None  # the manifest's onnx.fp16 entry as JSON (graphs, gate records) when written
    bf16: Optional[dict] = None  # the manifest's onnx.bf16 entry as JSON (the BF16 gate on OpenVINO) when run
    int8: dict[str, dict] = field(default_factory=dict)  # the manifest's onnx.int8 entries as JSON, per target
    int8_text: Optional[dict] = None  # the manifest's onnx.int8_text entry as JSON (--int8-text)
    bf16_text: Optional[dict] = None  # the manifest's onnx.bf16_text entry as JSON (--bf16-text)
    reused_onnx: bool = False
    reused_fp16: bool = False
    reused_bf16: bool = False
    reused_int8: bool = False
    reused_int8_text: bool = False
    reused_bf16_text: bool = False
    reused_engines: bool = False


@dataclass
class ExportContext:
    """What every stage reads and adds to: the model, the bundle folder, the previous manifest, the new one."""

    model: IPIQA
    out: Path
    options: ExportOptions
    progress: Callable[[str], None]
    previous: Optional[Manifest]
    report: ExportReport
    specs: dict[str, GraphSpec]
    manifest: Optional[Manifest] = None  # set by the FP32 stage, refined by each later stage
    text_references: dict[str, TextReference] = field(default_factory=dict)  # ``text_reference``'s, by prompt digest

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

    def text_reference(self, prompts: list[str]) -> TextReference:
        """The FP32 text embeddings of ``prompts`` (``text_reference.TextReference``), shared by every text gate
        of this export so the FP32 text graph runs over them once."""
        from ipiqa.model import tokenize

        from .text_reference import TextReference, prompt_digest

        key = prompt_digest(prompts)
        if key not in self.text_references:
            length = self.cfg.context_length
            self.text_references[key] = TextReference(self.fp32_graphs(), prompts,
                                                      lambda p: tokenize(p, length).numpy())
        return self.text_references[key]

    def close_text_references(self) -> None:
        for reference in self.text_references.values():
            reference.close()
        self.text_references.clear()

    def invalidate(self) -> None:
        """About to overwrite files: the old manifest (if any) must not describe them."""
        (self.out / "manifest.json").unlink(missing_ok=True)


def check_gate(results: list, progress: Callable[[str], None], error: type = ParityGateError) -> list:
    """One line per check; any failure stops the export before a manifest exists."""
    for r in results:
        progress(r.line())
    if not all(results):
        raise error(results)
    return results


def run_stage(ctx: ExportContext, what: str, key: str, old_key: Optional[str], old: Optional[T],
           build: Callable[[], T]) -> tuple[T, bool]:
    """The reuse rule every stage follows: ``old`` when the previous manifest recorded the same ``key`` (and its
    files still hash as recorded: ``read_bundle`` checked them), else the manifest removed and ``build()``.
    Returns (entry, reused)."""
    if old is not None and old_key == key:
        ctx.progress(f"{what} unchanged: reused")
        return old, True
    ctx.invalidate()
    return build(), False
