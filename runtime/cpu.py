"""What the CPU can do, read once from the kernel: the one owner of "does this CPU have BF16".

Linux lists the instruction-set extensions in ``/proc/cpuinfo``'s ``flags``; BF16 arithmetic needs AMX
(``amx_bf16``, Intel Sapphire Rapids and later) or AVX512-BF16 (``avx512_bf16``, Intel Cooper Lake and
later, AMD Zen 4 and later). Without either, OpenVINO silently runs a BF16 hint in FP32, so a BF16 run there
would only be a slower FP32 run: it is refused instead, naming the flags.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Optional

__all__ = ["BF16_FLAGS", "cpu_flags", "cpu_model", "bf16_flags", "bf16_refusal", "usable_cores"]

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_CPUINFO = Path("/proc/cpuinfo")


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields ('' values where the file is unreadable: not Linux, a sandbox)."""
    try:
        text = _CPUINFO.read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def bf16_flags(flags: Optional[frozenset[str]] = None) -> tuple[str, ...]:
    """Which of ``BF16_FLAGS`` the CPU has (``flags``: this CPU's when None)."""
    have = cpu_flags() if flags is None else flags
    return tuple(f for f in BF16_FLAGS if f in have)


def bf16_refusal(flags: Optional[frozenset[str]] = None, model: Optional[str] = None) -> Optional[str]:
    """None where BF16 runs natively, else why not, in words a user can act on."""
    if bf16_flags(flags):
        return None
    where = model or cpu_model()
    return (f"this CPU ({where}) has neither AMX (amx_bf16) nor AVX512-BF16 (avx512_bf16), so BF16 would run "
            "as slower FP32 emulation; use --precision fp32 or int8 here, or a CPU with AMX/AVX512-BF16 "
            "(Intel Sapphire Rapids or later, AMD Zen 4 or later)")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), the one source of every thread count.

    ``os.cpu_count()`` is the host's count: in a container limited to 2 CPUs of a 64-core host it says 64, and
    64 intra-op threads on 2 cores thrash. ``sched_getaffinity`` is Linux's; elsewhere ``cpu_count`` is all there is.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
