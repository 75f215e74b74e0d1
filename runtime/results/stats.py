"""One-pass, bounded-memory accumulators for the report: every row of a file of any size is counted, and what
is kept is capped (bins, heaps, samples), so a report of 1M rows stays a few MB.

Histogram scheme (one pass, no known range needed): bins on a decimal grid, width ``10**k`` or ``2 * 10**k``,
edges at integer multiples of the width. When a value falls outside the span of ``max_bins`` bins, the width
steps up (x2, then x5, ...) and existing bins merge exactly (their edges are on the coarser grid too). Counts stay
exact; the final histogram has between ``max_bins / 5`` and ``max_bins`` bins over the values' range, with
readable edges (0.01, 0.02, 0.1, ...), and the page's threshold steps are those edges, so "rows at or above the
threshold" read off the bins is exact for every step.
"""
from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Generic, Hashable, Iterable, Optional, TypeVar

import numpy as np

__all__ = ["DecimalHistogram", "Histogram", "Moments", "Covariance", "Extremes", "Reservoir", "PromptSpread", "PromptStats"]

T = TypeVar("T")
MIN_WIDTH_EXP = -8  # the finest bin: 1e-8 (far below any score's meaning)
MAX_BIN_INDEX = 2 ** 52  # bin indices stay exact integers in float64


@dataclass(frozen=True)
class Histogram:
    """A finished histogram: ``counts[i]`` rows in ``[start + i*width, start + (i+1)*width)``.

    ``width_text`` is the width as the shortest decimal (the page's slider step)."""

    start: float
    width: float
    width_text: str
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def edge(self, i: int) -> float:
        return _edge(self.start_index + i, self.width)

    @property
    def start_index(self) -> int:
        return round(self.start / self.width) if self.width else 0

    def at_least(self, threshold: float) -> int:
        """Rows in the bins at or above the bin that starts at ``threshold`` (exact at bin edges)."""
        if not self.counts:
            return 0
        i = math.ceil(round((threshold - self.start) / self.width, 6))
        return sum(self.counts[max(i, 0):])


def _edge(k: int, width: float) -> float:
    """Edge k of the grid, rounded to the width's decimals so 0.6 is 0.6, not 0.6000000000000001."""
    digits = max(0, -math.floor(math.log10(width)) + 1)
    return round(k * width, digits)


class DecimalHistogram:
    """Exact counts on a decimal grid that coarsens as the range grows (see the module docstring)."""

    def __init__(self, max_bins: int = 100):
        if max_bins < 5:
            raise ValueError("max_bins must be at least 5")
        self.max_bins = max_bins
        self.step = 2 * MIN_WIDTH_EXP  # width = (1 or 2) * 10**(step // 2): even steps 10**k, odd 2*10**k
        self.lo: Optional[int] = None  # bin index of counts[0]
        self.counts = np.zeros(0, dtype=np.int64)
        self.vmin, self.vmax = math.inf, -math.inf

    @property
    def width(self) -> float:
        return (2.0 if self.step % 2 else 1.0) * 10.0 ** (self.step // 2)

    def _indices(self, values: np.ndarray) -> np.ndarray:
        """floor(x / width), corrected so that a value on an edge (as ``_edge`` prints it) is in the bin above."""
        w = self.width
        k = np.floor(values / w)
        edges = np.round(k * w, max(0, -math.floor(math.log10(w)) + 1))
        k -= values < edges
        nxt = np.round((k + 1) * w, max(0, -math.floor(math.log10(w)) + 1))
        k += values >= nxt
        return k.astype(np.int64)

    def _coarsen(self) -> None:
        """One step up the grid (x2 or x5), merging bins exactly."""
        factor = 5 if self.step % 2 else 2
        self.step += 1
        if self.lo is None:
            return
        lo = self.lo // factor
        new = np.zeros((self.lo + len(self.counts) - 1) // factor - lo + 1, dtype=np.int64)
        np.add.at(new, (np.arange(self.lo, self.lo + len(self.counts)) // factor) - lo, self.counts)
        self.lo, self.counts = lo, new

    def _cover(self, lo: int, hi: int) -> None:
        """Grow the bins array to cover indices lo..hi."""
        if self.lo is None:
            self.lo, self.counts = lo, np.zeros(hi - lo + 1, dtype=np.int64)
            return
        if lo < self.lo:
            self.counts = np.concatenate([np.zeros(self.lo - lo, dtype=np.int64), self.counts])
            self.lo = lo
        if hi >= self.lo + len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(hi - self.lo - len(self.counts) + 1, dtype=np.int64)])

    def add(self, values: Iterable[float]) -> None:
        """Count a chunk of values (finite floats); cost per chunk, not per value, so pass thousands at once."""
        x = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64).ravel()
        if x.size == 0:
            return
        self.vmin, self.vmax = min(self.vmin, float(x.min())), max(self.vmax, float(x.max()))
        while (max(abs(self.vmin), abs(self.vmax)) / self.width >= MAX_BIN_INDEX
               or math.floor(self.vmax / self.width) - math.floor(self.vmin / self.width) + 1 > self.max_bins):
            self._coarsen()
        k = self._indices(x)
        lo, hi = int(k.min()), int(k.max())
        self._cover(lo, hi)
        self.counts += np.bincount(k - self.lo, minlength=len(self.counts))
        while len(self._trimmed()[1]) > self.max_bins:  # an edge correction moved a value one bin up
            self._coarsen()

    def _trimmed(self) -> tuple[int, np.ndarray]:
        nz = np.flatnonzero(self.counts)
        if nz.size == 0:
            return 0, self.counts[:0]
        return self.lo + int(nz[0]), self.counts[nz[0]: nz[-1] + 1]

    def result(self) -> Histogram:
        lo, counts = self._trimmed()
        w = self.width
        text = f"{w:.0e}" if w < 1e-4 else repr(float(_edge(1, w)))
        return Histogram(_edge(lo, w), w, text, tuple(int(c) for c in counts))


class Moments:
    """Count, mean, standard deviation, min and max, merged a chunk at a time (Chan et al.'s parallel update),
    so the per-row cost is numpy's, not Python's."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64)
        if x.size == 0:
            return
        n, mean = int(x.size), float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else math.nan


class Covariance:
    """Pearson correlation of two series over all rows, merged a chunk at a time."""

    def __init__(self) -> None:
        self.n, self.mx, self.my, self.sxx, self.syy, self.sxy = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.size == 0:
            return
        n, mx, my = int(x.size), float(x.mean()), float(y.mean())
        dx, dy = x - mx, y - my
        total = self.n + n
        ex, ey = mx - self.mx, my - self.my
        f = self.n * n / total
        self.sxx += float((dx * dx).sum()) + ex * ex * f
        self.syy += float((dy * dy).sum()) + ey * ey * f
        self.sxy += float((dx * dy).sum()) + ex * ey * f
        self.mx += ex * n / total
        self.my += ey * n / total
        self.n = total

    @property
    def pearson(self) -> float:
        den = math.sqrt(self.sxx * self.syy)
        return self.sxy / den if den > 0 else math.nan


class Extremes(Generic[T]):
    """The ``n`` lowest and ``n`` highest items by key, through two bounded heaps: O(n) memory, O(log n) a row.

    Ties keep the earlier row (``order``: its position)."""

    def __init__(self, n: int):
        self.n = n
        self._low: list = []  # max-heap by (-key, -order): the root is the worst kept among the lows
        self._high: list = []  # min-heap by (key, -order)

    def add(self, key: float, order: int, item: T) -> None:
        if self.n <= 0:
            return
        for heap, entry in ((self._low, (-key, -order, item)), (self._high, (key, -order, item))):
            if len(heap) < self.n:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)

    def lowest(self) -> list[T]:
        """Lowest first."""
        return [e[2] for e in sorted(self._low, key=lambda e: (-e[0], -e[1]))]

    def highest(self) -> list[T]:
        """Highest first."""
        return [e[2] for e in sorted(self._high, key=lambda e: (-e[0], -e[1]))]


class Reservoir(Generic[T]):
    """A uniform sample of ``size`` items of a stream of unknown length, seeded (same file, same sample).

    Li's Algorithm L: it draws random numbers only when an item enters the sample (O(k log(n/k)) draws), not
    for every item as Algorithm R does, so a long stream costs one comparison per item."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seen, self.items = size, 0, []
        self._rng = random.Random(seed)
        self._w = 1.0
        self._next = size  # 0-based position of the next item that enters the full sample

    def _skip(self) -> None:
        rng = self._rng
        self._w *= math.exp(math.log(1.0 - rng.random()) / self.size)
        gap = math.floor(math.log(1.0 - rng.random()) / math.log1p(-self._w)) if self._w < 1.0 else 0
        self._next += gap + 1

    def add(self, item: T) -> None:
        i = self.seen
        self.seen += 1
        if self.size <= 0:
            return
        if i < self.size:
            self.items.append(item)
            if self.seen == self.size:
                self._next = self.size - 1
                self._skip()
        elif i == self._next:
            self.items[self._rng.randrange(self.size)] = item
            self._skip()


@dataclass(frozen=True)
class PromptStats:
    """One prompt's images by the ranking score."""

    prompt: Optional[str]
    n: int
    mean: float
    std: float
    min: float
    max: float

    @property
    def spread(self) -> float:
        return self.max - self.min


class PromptSpread:
    """Per-prompt count, mean, spread of the ranking score, for at most ``max_prompts`` distinct prompts.

    Memory grows per distinct prompt (its text plus five numbers: about 0.5 KB with Python's object overhead,
    measured by benchmarks/report_bench.py), capped: rows of prompts first seen after the cap are counted in
    ``untracked_rows`` and left out of the spread."""

    def __init__(self, max_prompts: int = 200_000):
        self.max_prompts = max_prompts
        self._stats: dict[Hashable, list] = {}
        self.untracked_rows = 0

    def add(self, prompt: Optional[str], x: float) -> None:
        s = self._stats.get(prompt)
        if s is None:
            if len(self._stats) >= self.max_prompts:
                self.untracked_rows += 1
                return
            self._stats[prompt] = [1, x, 0.0, x, x]
            return
        s[0] += 1
        d = x - s[1]
        s[1] += d / s[0]
        s[2] += d * (x - s[1])
        s[3], s[4] = min(s[3], x), max(s[4], x)

    def __len__(self) -> int:
        return len(self._stats)

    def stats(self) -> Iterable[PromptStats]:
        for prompt, (n, mean, m2, lo, hi) in self._stats.items():
            yield PromptStats(prompt, n, mean, math.sqrt(m2 / n), lo, hi)

    def within_sum_squares(self) -> float:
        return sum(s[2] for s in self._stats.values())
