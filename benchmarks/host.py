"""Host data path: how many images per second the CPU can decode and resize, per core and across cores.

A GPU engine at thousands of images per second is only as fast as this path feeds it. Measured here on JPEG
files generated in a temporary folder (smooth AI-image-like content plus mild noise, quality 90, so their
decode cost is realistic rather than that of flat colour or pure noise):

- per core (one thread, one process): the uint8 path (``load_resized``: decode + exact resize), the float
  path (``preprocess_file``: the same + lookup-table normalize into a new array, and ``normalize(out=)``
  into a reused one, which saves the page faults of a fresh 3 MB array per image), the code before issue
  13 for comparison (``legacy_preprocess_file``), and the opt-in fast path (``load_resized(fast=True)``);
- scaling over the cores present, thread pool vs process pool (Pillow releases the GIL while decoding and
  resizing, so threads may scale; processes pay a pickle of each result). The faster one is named;
- the fast path's pixel deviation from the exact path (max and mean |d| over all images). Its score-level
  deviation needs a model and is measured by the benchmark that wires this in.

Medians over repeats; no number here is estimated. ``run`` returns frozen dataclasses; ``markdown`` renders them.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from ipiqa.config import CLIP_MEAN, CLIP_STD
from ipiqa.preprocess import load_resized, normalize, preprocess_file
from ipiqa.runtime.cpu import usable_cores

__all__ = ["PathRate", "PoolRate", "FastDeviation", "HostReport", "make_jpegs", "legacy_preprocess_file",
           "per_core_rates", "pool_scaling", "fast_deviation", "run", "markdown"]

@dataclass(frozen=True)
class PathRate:
    """One preprocessing path on one source size, single-threaded."""

    source: int  # source JPEG side in pixels
    path: str  # label, see PATHS
    images_per_s: float  # per core: median over repeats
    ms_per_image: float  # 1000 / images_per_s


@dataclass(frozen=True)
class PoolRate:
    """The uint8 exact path run by a pool of ``workers`` threads or processes."""

    source: int
    pool: str  # "thread" or "process"
    workers: int
    images_per_s: float  # all workers together: median over repeats
    speedup: float  # vs the same pool kind with the first worker count measured (1 by default)


@dataclass(frozen=True)
class FastDeviation:
    """How far ``fast=True`` lands from the exact pixels, and what it buys."""

    source: int
    max_abs_pixel: int  # over every pixel of every image, uint8 levels
    mean_abs_pixel: float
    speedup: float  # fast uint8 img/s over exact uint8 img/s, per core


@dataclass(frozen=True)
class HostReport:
    resolution: int
    cores: int  # CPUs this process may run on
    images_per_size: int
    repeats: int
    per_core: tuple[PathRate, ...]
    scaling: tuple[PoolRate, ...]
    fast: tuple[FastDeviation, ...]
    load_average: tuple[float, float] = (float("nan"), float("nan"))  # 1-min load before / after: was the machine shared?

    @property
    def faster_pool(self) -> Optional[str]:
        """The pool kind with the higher rate at the most workers measured (None if nothing was measured)."""
        if not self.scaling:
            return None
        most = max(r.workers for r in self.scaling)
        return max((r for r in self.scaling if r.workers == most), key=lambda r: r.images_per_s).pool

    def rate(self, source: int, path: str) -> Optional[float]:
        return next((r.images_per_s for r in self.per_core if r.source == source and r.path == path), None)


def make_jpegs(folder: Path, side: int, count: int, seed: int = 0) -> list[Path]:
    """``count`` side x side JPEGs (quality 90): bicubic-upsampled noise (smooth shapes) plus mild grain."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + side)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (max(2, side // 16),) * 2 + (3,), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.int16)
        grain = rng.normal(0.0, 6.0, smooth.shape).astype(np.int16)
        path = folder / f"{side}-{i:04d}.jpg"
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)
_STD = np.asarray(CLIP_STD, dtype=np.float32)


def legacy_preprocess_file(path: Path, resolution: int) -> np.ndarray:
    """The float path as it was before issue 13 (RGB sources), kept only as this benchmark's baseline."""
    with Image.open(path) as img:
        img.load()
        img = img if img.mode == "RGB" else img.convert("RGB")
    img = img.resize((resolution, resolution), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - _MEAN) / _STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _fast(path: Path, resolution: int) -> np.ndarray:
    return load_resized(path, resolution, fast=True)


_BUFFERS: dict[int, np.ndarray] = {}


def _float_into_buffer(path: Path, resolution: int) -> np.ndarray:
    """The float path as a pipeline should run it: normalize into a reused batch slot, not a new array."""
    out = _BUFFERS.setdefault(resolution, np.empty((3, resolution, resolution), np.float32))
    return normalize(load_resized(path, resolution), out=out)


# label -> loader(path, resolution): what per_core_rates times
PATHS: dict[str, Callable[[Path, int], np.ndarray]] = {
    "uint8 exact": load_resized,
    "float exact": preprocess_file,
    "float exact, reused buffer": _float_into_buffer,
    "float, before #13": legacy_preprocess_file,
    "uint8 fast": _fast,
}


def _interleaved_rates(passes: dict, images: int, repeats: int) -> dict:
    """Median img/s of each zero-argument pass, timed in turn within each repeat after one warm-up each.

    Interleaving makes a burst of load from elsewhere on a shared machine hit every contender alike; the
    order rotates each repeat because a pass that follows one freeing large float arrays was measured
    up to 20% slower (allocator state), whatever it was.
    """
    for run_pass in passes.values():
        run_pass()  # warm-up: page cache, lazy imports, pool start-up
    keys = list(passes)
    times: dict = {key: [] for key in keys}
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            start = time.perf_counter()
            passes[key]()
            times[key].append(time.perf_counter() - start)
    return {key: images / statistics.median(t) for key, t in times.items()}


def per_core_rates(paths_by_source: dict[int, Sequence[Path]], resolution: int, repeats: int = 5,
                   labels: Sequence[str] = tuple(PATHS)) -> tuple[PathRate, ...]:
    """Single-threaded img/s of each path on each source size."""
    rates = []
    for source, paths in paths_by_source.items():
        passes = {label: (lambda loader=PATHS[label]: [loader(p, resolution) for p in paths]) for label in labels}
        for label, rate in _interleaved_rates(passes, len(paths), repeats).items():
            rates.append(PathRate(source, label, rate, 1000.0 / rate))
    return tuple(rates)


def _load_exact(job: tuple[str, int]) -> np.ndarray:
    return load_resized(job[0], job[1])


def _executor(kind: str, workers: int) -> Executor:
    if kind == "thread":
        return ThreadPoolExecutor(workers)
    # spawn, not fork: forking a process that has started threads (torch, BLAS, a thread pool) can deadlock
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def pool_scaling(paths: Sequence[Path], source: int, resolution: int, workers: Sequence[int],
                 kinds: Sequence[str] = ("thread", "process"), repeats: int = 3) -> tuple[PoolRate, ...]:
    """img/s of the uint8 exact path with each pool kind and worker count; results come back to the caller.

    All pools are started and warmed first, then timed in turn (see ``_interleaved_rates``).
    """
    jobs = [(str(p), resolution) for p in paths]
    configs = [(kind, n) for kind in kinds for n in workers]
    pools = {c: _executor(*c) for c in configs}

    def one_pass(config: tuple[str, int]) -> None:
        chunk = 1 if config[0] == "thread" else max(1, len(jobs) // (4 * config[1]))
        list(pools[config].map(_load_exact, jobs, chunksize=chunk))

    try:
        rates = _interleaved_rates({c: (lambda c=c: one_pass(c)) for c in configs}, len(jobs), repeats)
    finally:
        for pool in pools.values():
            pool.shutdown()
    return tuple(PoolRate(source, kind, n, rates[(kind, n)], rates[(kind, n)] / rates[(kind, workers[0])])
                 for kind, n in configs)


def fast_deviation(paths_by_source: dict[int, Sequence[Path]], resolution: int,
                   per_core: Sequence[PathRate] = ()) -> tuple[FastDeviation, ...]:
    """Pixel deviation of ``fast=True`` from the exact path; speedup taken from ``per_core`` when measured."""
    rates = {(r.source, r.path): r.images_per_s for r in per_core}
    out = []
    for source, paths in paths_by_source.items():
        diffs = [np.abs(load_resized(p, resolution, fast=True).astype(np.int16) - load_resized(p, resolution))
                 for p in paths]
        exact, fast = rates.get((source, "uint8 exact")), rates.get((source, "uint8 fast"))
        out.append(FastDeviation(source, int(max(d.max() for d in diffs)), float(np.mean([d.mean() for d in diffs])),
                                 fast / exact if exact and fast else float("nan")))
    return tuple(out)


def run(resolution: int = 512, sources: Sequence[int] = (512, 1024, 2048), images: int = 16, repeats: int = 5,
        scaling_source: int = 1024, workers: Optional[Sequence[int]] = None, folder: Optional[Path] = None,
        kinds: Sequence[str] = ("thread", "process")) -> HostReport:
    """Every measurement above. ``workers`` defaults to 1 and every core present; ``folder`` to a temp dir.

    Process pools are started with ``spawn``: a script calling this needs the ``if __name__ == "__main__"``
    guard (``python -m benchmarks`` has it).
    """
    cores = usable_cores()
    load_before = _load_average()
    workers = tuple(workers) if workers else tuple(sorted({1, cores}))
    with tempfile.TemporaryDirectory(prefix="ipiqa-host-") as tmp:
        root = Path(folder) if folder else Path(tmp)
        paths = {s: make_jpegs(root / "jpegs", s, images) for s in dict.fromkeys([*sources, scaling_source])}
        measured = {s: paths[s] for s in sources}
        per_core = per_core_rates(measured, resolution, repeats)
        scaling = pool_scaling(paths[scaling_source], scaling_source, resolution, workers, kinds, repeats)
        fast = fast_deviation(measured, resolution, per_core)
    return HostReport(resolution, cores, images, repeats, per_core, scaling, fast, (load_before, _load_average()))


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return float("nan")


def markdown(report: HostReport) -> str:
    """Three tables: per-core rates by source size, pool scaling, fast-path deviation."""
    labels = list(dict.fromkeys(r.path for r in report.per_core))
    sources = list(dict.fromkeys(r.source for r in report.per_core))
    lines = [f"## Host preprocessing to {report.resolution} px ({report.cores} cores; medians of {report.repeats} "
             f"runs over {report.images_per_size} JPEGs per size; 1-min load average {report.load_average[0]:.1f} "
             f"before, {report.load_average[1]:.1f} after)", "",
             "img/s per core (one thread):", "",
             "| source | " + " | ".join(labels) + " | uint8 exact / before | float exact / before |",
             "| --- | " + " | ".join("---:" for _ in labels) + " | ---: | ---: |"]
    for s in sources:
        cells = [f"{report.rate(s, label):.0f}" if report.rate(s, label) else "" for label in labels]
        old = report.rate(s, "float, before #13")
        for new in (report.rate(s, "uint8 exact"), report.rate(s, "float exact")):
            cells.append(f"{new / old:.2f}x" if new and old else "")
        lines.append(f"| {s}x{s} JPEG | " + " | ".join(cells) + " |")
    if report.scaling:
        lines += ["", f"Scaling of the uint8 exact path ({report.scaling[0].source}x{report.scaling[0].source} JPEGs); "
                  f"faster: **{report.faster_pool} pool**", "",
                  "| pool | workers | img/s | vs 1 worker |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r.pool} | {r.workers} | {r.images_per_s:.0f} | {r.speedup:.2f}x |" for r in report.scaling]
    if report.fast:
        lines += ["", "fast=True (JPEG DCT-scaled decode + reducing_gap) against the exact path:", "",
                  "| source | speedup per core | max abs pixel diff | mean abs pixel diff |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {f.source}x{f.source} | {f.speedup:.2f}x | {f.max_abs_pixel} | {f.mean_abs_pixel:.2f} |"
                  for f in report.fast]
    return "\n".join(lines) + "\n"
