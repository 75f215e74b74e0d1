"""The one reading of a ``--device`` string, shared by every command and API that runs a model.

``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``. ``auto`` stays unresolved here (torch-free): each backend resolves
it by what it can reach (``resolve_torch``: torch's CUDA; the runtime: GPU providers or engines).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import IPIQAError

__all__ = ["Device", "parse_device", "DEVICE_HELP"]

DEVICE_HELP = "auto, cpu, cuda or cuda:N (auto: the first CUDA GPU if one is usable, else cpu)."


@dataclass(frozen=True)
class Device:
    kind: str  # "auto" | "cpu" | "cuda"
    index: int = 0  # GPU ordinal; 0 for cpu/auto

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind

    def resolve_torch(self) -> str:
        """A torch device string; ``auto`` becomes cuda:0 when torch sees a GPU, and CUDA asked for where torch
        sees none is refused (never a silent CPU fallback). Needs torch."""
        from ._optional import require

        if self.kind == "cpu":
            return "cpu"
        has_cuda = require("torch", extra="torch").cuda.is_available()
        if self.kind == "auto":
            return "cuda:0" if has_cuda else "cpu"
        if not has_cuda:
            raise IPIQAError(f"--device {self}: torch sees no CUDA GPU here; use --device cpu or auto")
        return str(self)


def parse_device(text: "str | Device") -> Device:
    """``"cuda:1"`` -> Device("cuda", 1); anything else than the four forms is refused with the forms."""
    if isinstance(text, Device):
        return text
    kind, sep, index = str(text).strip().lower().partition(":")
    if kind not in ("auto", "cpu", "cuda") or (sep and (kind != "cuda" or not index.isdigit())):
        raise IPIQAError(f"unknown device {text!r}; use {DEVICE_HELP}")
    return Device(kind, int(index) if index else 0)
