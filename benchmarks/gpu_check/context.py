"""What every part shares: the run's settings (GPU or dry run), the seeded model file and, when a part asks,
the ONNX bundle whose graphs the FLOPs are counted from. Built lazily, so a failing setup step is the error
of the part that needed it, not of the whole check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from .parts import progress

__all__ = ["Settings", "settings_for", "Context"]


@dataclass(frozen=True)
class Settings:
    """The run's sizes. GPU: RN50 at 512 px, sized so the whole check stays under 8 minutes on an H100.
    Dry run: the reduced-width model at 64 px on the CPU, the same code in under a minute."""

    dry_run: bool
    device: str  # "cuda" or "cpu"
    workdir: Path
    resolution: int = 512
    arch: dict = field(default_factory=dict)  # IPIQAConfig widths; {} = RN50
    parity_inputs: int = 64
    parity_batch: int = 16
    compile: bool = True
    decode_images: int = 200
    decode_max_size: tuple[int, int] = (4000, 3000)  # (width, height) of the largest generated JPEG
    batches: tuple[int, ...] = (32, 64, 128)
    e2e_images: int = 1024
    e2e_unique: int = 64  # distinct JPEG files behind the e2e list (the rest are hard links: same decode cost)
    min_seconds: float = 2.0  # per engine-only timing
    workers: int = 1  # host decode threads

    @property
    def fp16(self) -> bool:
        """FP16 runs on CUDA only; the dry run takes the FP16 code paths in FP32 (TorchBackend refuses FP16 on CPU)."""
        return self.device == "cuda"


def settings_for(dry_run: bool, workdir: Path, device: Optional[str] = None, compile: bool = True) -> Settings:
    from ipiqa.demo import SMOKE_ARCH
    from ipiqa.runtime.cpu import usable_cores

    workers = usable_cores()
    if dry_run:
        return Settings(True, device or "cpu", workdir / "dry-run", resolution=64, arch=dict(SMOKE_ARCH),
                        parity_inputs=16, parity_batch=8, decode_images=12,
                        decode_max_size=(300, 200), batches=(2, 4), e2e_images=8, e2e_unique=4, min_seconds=0.0,
                        workers=workers)
    return Settings(False, device or "cuda", workdir / "rn50-512", compile=compile, workers=workers)


class Context:
    """The settings plus the artefacts parts share, each made on first use and kept."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.memo: dict[str, Any] = {}  # results one part computes and a later part reuses (parity's references)
        settings.workdir.mkdir(parents=True, exist_ok=True)

    @cached_property
    def cfg(self) -> Any:
        from ipiqa.config import IPIQAConfig

        return IPIQAConfig(resolution=self.settings.resolution, **self.settings.arch)

    @cached_property
    def model_path(self) -> Path:
        """The seeded, untrained model at the real architecture (reduced widths in the dry run)."""
        from ipiqa.checkpoint import save_model
        from ipiqa.demo import demo_model

        progress(f"setup: seeded model {'(reduced width)' if self.settings.dry_run else 'RN50'} at "
                 f"{self.settings.resolution} px")
        return save_model(self.settings.workdir / "model.safetensors", demo_model(self.cfg).state_dict(), self.cfg)

    @cached_property
    def bundle(self) -> Path:
        """The model's ONNX bundle (FP32, single-query pools; the export's own parity gate runs): the graphs the
        FLOPs are counted from, as ``python -m benchmarks`` counts them."""
        from ipiqa.checkpoint import load_model
        from ipiqa.export.bundle_export import ExportOptions, export_bundle

        progress("setup: ONNX bundle (FLOPs are counted from its graphs)")
        out = self.settings.workdir / "bundle"
        export_bundle(load_model(self.model_path), [self.model_path], out, ExportOptions(onnx_only=True),
                      progress=lambda m: progress(f"  export: {m}"))
        return out

    @cached_property
    def flops_per_image(self) -> dict[str, float]:
        """FLOPs per image and graph at batch 1, and the per-image total the CPU benchmark uses: image encoder +
        fusion + the text encoder once per ``IMAGES_PER_PROMPT`` images (the prompt cache)."""
        from ..__main__ import IMAGES_PER_PROMPT
        from ..flops import graph_flops

        graphs = {g: float(graph_flops(self.bundle / f"{g}.onnx")) for g in ("image_encoder", "text_encoder", "fusion")}
        total = graphs["image_encoder"] + graphs["fusion"] + graphs["text_encoder"] / IMAGES_PER_PROMPT
        return {**graphs, "per_image": total, "images_per_prompt": IMAGES_PER_PROMPT}
