"""Runtime overhead at batch 1: a backend's image graph alone against ``Scorer.score_arrays`` (issue 30, item 4).

Each iteration times, in turn, the image graph alone (``embed_images``), ``score_arrays`` with a cached prompt
(image and fusion graphs) and ``score_arrays`` with a new prompt (text graph too). The three see the same
machine load, so their ratios hold where absolute rates drift (a shared machine); rates are 1 / median time.
What the runtime adds around the engines is the cached-prompt ratio's distance from 1 minus the fusion graph's
own share. ``python -m benchmarks --sections overhead`` runs it on the engine section's INT8 bundle.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["OverheadRow", "measure", "markdown", "section"]


@dataclass(frozen=True)
class OverheadRow:
    backend: str  # the Scorer's backend name, e.g. onnxruntime-cpu-int8
    iterations: int
    image_graph_per_s: float  # the image graph alone
    cached_prompt_per_s: float  # score_arrays, prompt cached: image + fusion
    new_prompt_per_s: float  # score_arrays, a prompt never seen: image + text + fusion

    @property
    def cached_ratio(self) -> float:
        return self.cached_prompt_per_s / self.image_graph_per_s

    @property
    def new_prompt_ratio(self) -> float:
        return self.new_prompt_per_s / self.image_graph_per_s


def measure(bundle: Path, runs: Sequence[tuple[str, str]] = (("onnxruntime", "int8"),), seconds: float = 6.0,
            warmup: int = 2) -> list[OverheadRow]:
    """One row per (backend, precision), batch 1, paired timings for ``seconds`` each."""
    from ipiqa.runtime.scorer import Scorer

    rows = []
    for backend, precision in runs:
        with Scorer(bundle, backend=backend, device="cpu", precision=precision) as scorer:
            x = np.random.default_rng(0).integers(0, 256, (1, scorer.resolution, scorer.resolution, 3), np.uint8)
            calls = (lambda: scorer.backend.embed_images(x), lambda: scorer.score_arrays(x, ["a cached prompt"]))
            for _ in range(warmup):
                for call in calls:
                    call()
            times: tuple[list, list, list] = ([], [], [])
            start, i = time.perf_counter(), 0
            while time.perf_counter() - start < seconds or len(times[0]) < 2:
                for lst, call in zip(times, (*calls, lambda: scorer.score_arrays(x, [f"new prompt {i}"]))):
                    t0 = time.perf_counter()
                    call()
                    lst.append(time.perf_counter() - t0)
                i += 1
            rates = [1.0 / statistics.median(t) for t in times]
            rows.append(OverheadRow(scorer.backend.name, len(times[0]), *rates))
    return rows


def markdown(rows: Sequence[OverheadRow]) -> str:
    lines = ["| backend | batch | image graph alone img/s | score_arrays, prompt cached | × | new prompt per image | × "
             "| iterations |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.backend} | 1 | {r.image_graph_per_s:.2f} | {r.cached_prompt_per_s:.2f} | {r.cached_ratio:.3f} | "
              f"{r.new_prompt_per_s:.2f} | {r.new_prompt_ratio:.3f} | {r.iterations} |" for r in rows]
    return "\n".join(lines)


def section(bundle: Path, runs: Sequence[tuple[str, str]], seconds: float) -> dict:
    rows = measure(bundle, runs, seconds)
    return {"rows": [{**asdict(r), "cached_ratio": r.cached_ratio, "new_prompt_ratio": r.new_prompt_ratio}
                     for r in rows], "markdown": markdown(rows)}
