"""What the CPU can do, read once from the kernel: the one owner of "does this CPU have BF16 / VNNI / AMX".

Linux lists the instruction-set extensions in ``/proc/cpuinfo``'s ``flags``; BF16 arithmetic needs AMX
(``amx_bf16``, Intel Sapphire Rapids and later) or AVX512-BF16 (``avx512_bf16``, Intel Cooper Lake and
later, AMD Zen 4 and later). Without either, OpenVINO silently runs a BF16 hint in FP32, so a BF16 run there
would only be a slower FP32 run: it is refused instead, naming the flags.

``$IPIQA_CPU_FLAGS`` (flag names, comma- or space-separated) replaces the kernel's list for every decision
that reads flags, in this process and the processes it starts: how the tests run each CPU family's branch on
any machine. It decides branches only; arithmetic is still the hardware's (``hardware_flags``), and a BF16
engine compiled where the hardware lacks BF16 is refused after compiling (``backends/openvino.py``).
"""
from __future__ import annotations

import os
import platform
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

from ipiqa.errors import IPIQAError

__all__ = ["BF16_FLAGS", "INT8_DOT_FLAGS", "FLAGS_ENV", "cpu_flags", "hardware_flags", "injected_flags", "cpu_model",
           "cpu_signature", "describe", "bf16_flags", "bf16_refusal", "int8_dot_flags", "int8_weights_refusal", "usable_cores"]

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # int8 dot products: what OpenVINO's int8 kernels need
FLAGS_ENV = "IPIQA_CPU_FLAGS"
_CPUINFO = Path("/proc/cpuinfo")
_FLAG_NAME = re.compile(r"[a-z0-9_]+")


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


def hardware_flags() -> frozenset[str]:
    """The kernel's list, whatever ``$IPIQA_CPU_FLAGS`` says: what the instructions really are."""
    return frozenset(_cpuinfo().get("flags", "").split())


def injected_flags() -> Optional[frozenset[str]]:
    """The flags ``$IPIQA_CPU_FLAGS`` sets (read at every call, so a test's environment takes effect at once),
    or None when it is unset or empty."""
    value = os.environ.get(FLAGS_ENV, "").strip()
    if not value:
        return None
    names = [n for n in re.split(r"[\s,]+", value) if n]
    bad = [n for n in names if not _FLAG_NAME.fullmatch(n)]
    if bad:
        raise IPIQAError(f"${FLAGS_ENV}: {bad[0]!r} is not a CPU flag name; write the names as /proc/cpuinfo does, "
                         f"e.g. {FLAGS_ENV}=avx2,avx512f,avx512_vnni (or unset it to read this CPU's own)")
    return frozenset(names)


def cpu_flags() -> frozenset[str]:
    """The flags every branch reads: ``$IPIQA_CPU_FLAGS`` where set, else this CPU's."""
    injected = injected_flags()
    return hardware_flags() if injected is None else injected


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_signature() -> str:
    """x86 family and model ("family 26 model 2": Zen 5), '' where unknown: shared machines name Zen 4 and Zen 5
    alike ("AMD EPYC", flags differing only in avx_vnni), and benchmark figures differ between them (1.6x measured)."""
    info = _cpuinfo()
    family, model = info.get("cpu family", ""), info.get("model", "")
    return f"family {family} model {model}" if family and model else ""


def describe() -> str:
    """The CPU as records name it: its model, and that its flags were injected when they were."""
    return cpu_model() + (f", flags set by ${FLAGS_ENV}" if injected_flags() is not None else "")


def bf16_flags(flags: Optional[frozenset[str]] = None) -> tuple[str, ...]:
    """Which of ``BF16_FLAGS`` the CPU has (``flags``: ``cpu_flags()`` when None)."""
    have = cpu_flags() if flags is None else flags
    return tuple(f for f in BF16_FLAGS if f in have)


def bf16_refusal(flags: Optional[frozenset[str]] = None, model: Optional[str] = None) -> Optional[str]:
    """None where BF16 runs natively, else why not, in words a user can act on."""
    if bf16_flags(flags):
        return None
    where = model or describe()
    return (f"this CPU ({where}) has neither AMX (amx_bf16) nor AVX512-BF16 (avx512_bf16), so BF16 would run "
            "as slower FP32 emulation; use --precision fp32 or int8 here, or a CPU with AMX/AVX512-BF16 "
            "(Intel Sapphire Rapids or later, AMD Zen 4 or later)")


def int8_dot_flags(flags: Optional[frozenset[str]] = None) -> tuple[str, ...]:
    """Which of ``INT8_DOT_FLAGS`` the CPU has (``flags``: ``cpu_flags()`` when None): empty where u8 x s8
    kernels sum pairs of products in 16 bits."""
    have = cpu_flags() if flags is None else flags
    return tuple(f for f in INT8_DOT_FLAGS if f in have)


def int8_weights_refusal(exact_without_dot: bool, what: str, flags: Optional[frozenset[str]] = None) -> Optional[str]:
    """None where an INT8 graph computes on this CPU as its gate measured it, else why not. Without INT8 dot
    products (VNNI, AMX: 32-bit sums) the u8 x s8 kernels add pairs of products in 16 bits, which full-range 8-bit
    weights overflow: the INT8 text graph gated at cosine >= 0.995 on Zen 4 gave 0.78 on Zen 3 (AVX2), measured.
    ``exact_without_dot``: the graph is safe there anyway (7-bit weights, ``reduce_range``, keep every pair in
    range; or its gate ran without dot products too). ``what``: the graph, named."""
    if exact_without_dot or int8_dot_flags(flags):
        return None
    return (f"{what} has full-range 8-bit weights, and this CPU ({describe()}) has no INT8 dot products "
            f"({', '.join(INT8_DOT_FLAGS)}), where its u8 x s8 sums saturate in 16 bits")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), the one source of every thread count.

    ``os.cpu_count()`` is the host's count: in a container limited to 2 CPUs of a 64-core host it says 64, and
    64 intra-op threads on 2 cores thrash. ``sched_getaffinity`` is Linux's; elsewhere ``cpu_count`` is all there is.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
