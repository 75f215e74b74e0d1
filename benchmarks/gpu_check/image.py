"""What the GPU machine's image holds, as far as this check relies on it, and the wheels carried beside it.

From the device tool's KINDS.md ('cuda' image, package list read on 2026-11-17) and issue 31: the check may
import these, the standard library, ipiqa and benchmarks, and what ``benchmarks/gpu_wheels.txt`` lists.
``tests/test_gpu_check.py`` holds the check's imports to that.
"""
from __future__ import annotations

import re
from pathlib import Path

from .layout import ROOT

__all__ = ["IMAGE_PACKAGES", "WHEELS_FILE", "wheels", "normalized"]

IMAGE_PACKAGES = frozenset({
    # issue 31's list
    "torch", "torchvision", "numpy", "onnx", "onnxruntime", "safetensors", "tokenizers", "pillow", "pyarrow",
    "pytest", "triton", "cupy-cuda13x", "cuda-bindings",
    # also in the image (KINDS.md), imported by ipiqa (click, tqdm; onnxscript for the ONNX export) or by the
    # carried open_clip (regex, timm, huggingface-hub, pyyaml)
    "click", "tqdm", "onnxscript", "regex", "timm", "huggingface-hub", "pyyaml",
})
WHEELS_FILE = ROOT / "benchmarks" / "gpu_wheels.txt"


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels(path: Path = WHEELS_FILE) -> dict[str, str]:
    """``name==version`` lines of the wheels file -> {normalized name: version}."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name, sep, version = spec.partition("==")
            if not sep or not version.strip():
                raise ValueError(f"{path}: {spec!r} is not pinned as NAME==VERSION")
            out[normalized(name.strip())] = version.strip()
    return out
