"""What the numbers were measured on: CPU, GPU, driver, library versions, and a measured matmul peak."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from importlib import metadata

from ipiqa.runtime.cpu import (FLAGS_ENV, cpu_flags, cpu_model, cpu_signature, hardware_flags, injected_flags,
                               usable_cores)

__all__ = ["machine_info", "machine_slug", "measured_peak_flops"]

# The flags the numbers depend on: FP32 width (AVX2/AVX-512), INT8 dot products (VNNI), BF16 (AVX512-BF16, AMX).
_SIMD_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                         "amx_tile", "avx512_fp16"})


def _gpu() -> dict:
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info = {"name": p.name, "compute_capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
            try:
                info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                pass
            return info
    except ImportError:
        pass
    return {}


def machine_info() -> dict:
    versions = {}
    for dist in ("ipiqa", "torch", "open_clip_torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt",
                 "numpy", "pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    simd = sorted(f for f in cpu_flags() if f in _SIMD_FLAGS)
    info = {"cpu": cpu_model(), "cpu_signature": cpu_signature(), "cpu_flags": simd, "cores": usable_cores(),
            "host_cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "gpu": _gpu(), "versions": versions}
    if injected_flags() is not None:  # the branches ran as another CPU family; the figures are this hardware's
        info["cpu_flags_injected_by"] = FLAGS_ENV
        info["hardware_cpu_flags"] = sorted(f for f in hardware_flags() if f in _SIMD_FLAGS)
    return info


def machine_slug(info: dict) -> str:
    name = info["gpu"].get("name") if info["gpu"] else f"cpu-{info['cores']}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def measured_peak_flops(device: str = "cpu", n: int = 2048, dtype: str = "float32") -> float:
    """FLOP/s of a large matrix product through torch: the ceiling the model's convolutions chase."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    for _ in range(3):
        a @ b
    reps, best = 5, float("inf")
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
