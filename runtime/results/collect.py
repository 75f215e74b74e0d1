"""What the report shows, gathered from a scores set (one file or many) of any size in two streamed passes.

Pass 1 reads every row once: counts, errors by cause, one histogram per output over all rows, mean/std/min/max,
the quality-alignment correlation, the N worst and best rows (bounded heaps), uniform samples for the gallery
and the scatter (reservoirs), and each prompt's spread. Pass 2 reads the file again only to rank the images of
the few prompts chosen from pass 1's spread (a bounded heap each): holding every prompt's images in pass 1 would
grow with the file. Memory: the caps below, plus about 0.5 KB per distinct prompt (``PromptSpread``).
"""
from __future__ import annotations

import heapq
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ipiqa.errors import ConfigError

from .read import ScoreRow
from .sets import ScoresSet
from .stats import Covariance, DecimalHistogram, Extremes, Histogram, Moments, PromptSpread, PromptStats, Reservoir

__all__ = ["ReportOptions", "OutputSummary", "PromptGroup", "ReportData", "collect", "error_cause"]

CHUNK = 65536  # values buffered per output before the numpy accumulators take them
MAX_CAUSES = 50  # distinct error causes named; the rest are counted as "other"


@dataclass(frozen=True)
class ReportOptions:
    """How much the page shows. Every cap bounds memory and page size whatever the file's length."""

    by: Optional[str] = None  # the output that ranks images (default: the first, quality)
    n: int = 24  # worst and best images shown
    sample: int = 96  # images in the filterable gallery (a uniform sample of the scored rows)
    prompts: int = 12  # prompts shown ranked (those with the widest spread)
    per_prompt: int = 8  # images shown per prompt, best first
    errors: int = 100  # error rows listed (all are counted)
    bins: int = 100  # histogram bins at most
    scatter: int = 2000  # points in the quality-alignment scatter (a uniform sample)
    max_prompts: int = 200_000  # distinct prompts whose spread is tracked
    progress: Optional[Callable[[int], None]] = field(default=None, compare=False)  # called with rows read


@dataclass(frozen=True)
class OutputSummary:
    """One score column over all scored rows."""

    name: str
    mean: float
    std: float
    min: float
    max: float
    histogram: Histogram


@dataclass(frozen=True)
class PromptGroup:
    """One prompt's images, best first (at most ``per_prompt`` of its ``stats.n``)."""

    stats: PromptStats
    best: tuple[ScoreRow, ...]


@dataclass(frozen=True)
class ReportData:
    """Everything the page renders; built by ``collect``."""

    source: Path
    fmt: str
    outputs: tuple[str, ...]
    by: str
    rows: int
    scored: int
    errors: int
    complete: bool  # False: a file ends in a partial record (a killed run); rows before it are reported
    described: str  # the set as the summary names it: "scores.csv (csv)", "scores/ (12 files: csv)"
    single: bool  # one scores file (else a folder, list or pattern of them)
    incomplete: tuple[Path, ...]  # the files that end in a partial record
    causes: tuple[tuple[str, int], ...]  # most frequent first
    summaries: tuple[OutputSummary, ...]
    pearson: Optional[float]  # first two outputs, over all scored rows (two-output models)
    scatter: tuple[tuple[float, float], ...]
    worst: tuple[ScoreRow, ...]  # lowest first
    best: tuple[ScoreRow, ...]  # highest first
    sample: tuple[ScoreRow, ...]  # highest first
    error_rows: tuple[ScoreRow, ...]  # the first ``options.errors``, in file order
    prompts: int  # distinct prompts tracked among scored rows
    prompts_multi: int  # of which with two or more images
    within_share: Optional[float]  # share of the ranking score's variance that lies within prompts
    untracked_rows: int  # rows of prompts beyond ``max_prompts``
    spread: Optional[Histogram]  # per-prompt range (max - min), prompts with two or more images
    groups: tuple[PromptGroup, ...]
    options: ReportOptions

    def shown(self) -> list[ScoreRow]:
        """Every row the galleries show (each once), for thumbnails made ahead of the page."""
        rows = [*self.worst, *self.best, *self.sample, *(r for g in self.groups for r in g.best)]
        return list({r.index: r for r in rows}.values())


def error_cause(image: str, error: str) -> str:
    """The kind of an error, for counting: the message without its file name and details.

    "x.jpg: corrupt image (image file is truncated)" -> "corrupt image"; "missing prompt: ..." -> "missing prompt".
    """
    text = error[len(image) + 2:] if image and error.startswith(image + ": ") else error
    cause = re.split(r"[:(]", text, maxsplit=1)[0].strip()
    return (cause or text.strip())[:80] or "unknown"


class _Pass1:
    def __init__(self, scores: ScoresSet, by: int, o: ReportOptions):
        self.scores, self.by, self.o = scores, by, o
        k = len(scores.outputs)
        self.hists = [DecimalHistogram(o.bins) for _ in range(k)]
        self.moments = [Moments() for _ in range(k)]
        self.cov = Covariance() if k >= 2 else None
        self.buffers: list[list[float]] = [[] for _ in range(k)]
        self.extremes: Extremes[ScoreRow] = Extremes(o.n)
        self.sample: Reservoir[ScoreRow] = Reservoir(o.sample, seed=0)
        self.points: Reservoir[tuple[float, float]] = Reservoir(o.scatter if k >= 2 else 0, seed=1)
        self.spread = PromptSpread(o.max_prompts)
        self.causes: Counter = Counter()
        self.error_rows: list[ScoreRow] = []
        self.rows = self.errors = 0

    def flush(self) -> None:
        arrays = [np.asarray(b, dtype=np.float64) for b in self.buffers]
        for h, m, a in zip(self.hists, self.moments, arrays):
            h.add(a)
            m.add(a)
        if self.cov is not None:
            self.cov.add(arrays[0], arrays[1])
        for b in self.buffers:
            b.clear()  # in place: ``run`` holds these lists

    def run(self) -> None:
        by, buffers, o = self.by, self.buffers, self.o
        for row in self.scores:
            self.rows += 1
            if o.progress is not None and self.rows % 10000 == 0:
                o.progress(self.rows)
            if row.scores is None:
                self.errors += 1
                cause = error_cause(row.image, row.error or "")
                self.causes[cause if cause in self.causes or len(self.causes) < MAX_CAUSES else "other"] += 1
                if len(self.error_rows) < o.errors:
                    self.error_rows.append(row)
                continue
            for buf, x in zip(buffers, row.scores):
                buf.append(x)
            key = row.scores[by]
            self.extremes.add(key, row.index, row)
            self.sample.add(row)
            if len(row.scores) >= 2:
                self.points.add((row.scores[0], row.scores[1]))
            self.spread.add(row.prompt, key)
            if len(buffers[0]) >= CHUNK:
                self.flush()
        self.flush()
        if o.progress is not None:
            o.progress(self.rows)


def _pass2(scores: ScoresSet, by: int, chosen: list[PromptStats], per_prompt: int) -> list[PromptGroup]:
    """Each chosen prompt's ``per_prompt`` best images (a bounded min-heap each; ties keep the earlier row)."""
    heaps: dict[Optional[str], list] = {s.prompt: [] for s in chosen}
    for row in scores.rows(prompts=heaps.keys()):
        heap = heaps.get(row.prompt) if row.scores is not None else None
        if heap is None:
            continue
        entry = (row.scores[by], -row.index, row)
        if len(heap) < per_prompt:
            heapq.heappush(heap, entry)
        elif entry[:2] > heap[0][:2]:
            heapq.heapreplace(heap, entry)
    return [PromptGroup(s, tuple(e[2] for e in sorted(heaps[s.prompt], key=lambda e: (-e[0], -e[1]))))
            for s in chosen]


def collect(scores: ScoresSet, options: ReportOptions = ReportOptions()) -> ReportData:
    """Read ``scores`` (twice at most, streamed) into what the page shows."""
    by_name = options.by or scores.outputs[0]
    if by_name not in scores.outputs:
        raise ConfigError(f"--by {by_name!r}: {scores.path} has the outputs {list(scores.outputs)}; choose one of them")
    by = scores.outputs.index(by_name)
    p1 = _Pass1(scores, by, options)
    p1.run()
    complete = scores.complete
    stats = list(p1.spread.stats())
    multi = [s for s in stats if s.n >= 2]
    chosen = sorted(multi, key=lambda s: -s.spread)[: options.prompts]  # stable: ties keep first-seen order
    groups = _pass2(scores, by, chosen, options.per_prompt) if chosen and options.per_prompt > 0 else []
    spread_hist = None
    if multi:
        h = DecimalHistogram(min(options.bins, 50))
        h.add(np.array([s.spread for s in multi]))
        spread_hist = h.result()
    total_m2 = p1.moments[by].m2
    within = p1.spread.within_sum_squares() / total_m2 if multi and total_m2 > 0 and not p1.spread.untracked_rows else None
    summaries = tuple(OutputSummary(name, m.mean, m.std, m.min, m.max, h.result())
                      for name, m, h in zip(scores.outputs, p1.moments, p1.hists))
    key = lambda r: (-r.scores[by], r.index)  # noqa: E731 - highest first, ties in file order
    return ReportData(
        source=scores.path, fmt=scores.fmt, outputs=scores.outputs, by=by_name, rows=p1.rows,
        scored=p1.rows - p1.errors, errors=p1.errors, complete=complete,
        described=scores.describe(), single=scores.single, incomplete=scores.incomplete, causes=tuple(p1.causes.most_common()),
        summaries=summaries, pearson=p1.cov.pearson if p1.cov is not None and p1.cov.n >= 2 else None,
        scatter=tuple(p1.points.items), worst=tuple(p1.extremes.lowest()), best=tuple(p1.extremes.highest()),
        sample=tuple(sorted(p1.sample.items, key=key)), error_rows=tuple(p1.error_rows), prompts=len(p1.spread),
        prompts_multi=len(multi), within_share=within, untracked_rows=p1.spread.untracked_rows,
        spread=spread_hist, groups=tuple(groups), options=options)
