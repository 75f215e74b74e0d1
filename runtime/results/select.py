"""``ipiqa select``: the rows worth keeping, as a manifest ``ipiqa score``, training or any tool reads.

Thresholds (``--min quality=0.6``, ``--max``) stream: a row is written or dropped as it is read, memory is
constant. Best-of-N (``--top-k K``) keeps a bounded heap: one of K rows for ``--per all``, one per distinct
prompt for ``--per prompt``, so memory grows with (distinct prompts x K) rows, about 0.8 KB each (measured
by benchmarks/report_bench.py: 1M rows, 250k prompts, top 1 each: ~150 MiB above the interpreter's), never with
the file's length; the chosen rows are written at the end, in the scores file's order. Error rows are never chosen.
A scores set (a folder, list or pattern of score files, ``sets``) is read as one file: the same memory.
``--to-shards DIR`` writes the chosen rows' samples as new WebDataset shards (``to_shards``), beside or instead
of the manifest, in the same pass.

The manifest's columns are the scores file's (``image, prompt, <outputs>, error``, written by the same codec),
so it is also a scores file ``ipiqa report`` reads. Image paths are rewritten so they resolve from the
manifest's own folder, as ``ipiqa score`` resolves a manifest's relative paths.
"""
from __future__ import annotations

import csv
import heapq
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from ipiqa.errors import ConfigError, IPIQAError

from ..io import OutputError, Result, ResultWriter, Row, output_format
from .read import ScoreRow, resolve_image
from .sets import ScoresSet, open_scores
from .to_shards import DEFAULT_SHARD_SIZE, ShardsResult, ShardsWriter

__all__ = ["Bound", "Selection", "SelectResult", "parse_bound", "chosen_rows", "write_selection"]

LAYOUTS = ("manifest", "train")
WRITE_BATCH = 4096  # rows per write (the writer flushes each)
PROGRESS_EVERY = 10_000  # rows between progress calls


@dataclass(frozen=True)
class Bound:
    """``output >= value`` (a ``--min``) or ``output <= value`` (a ``--max``)."""

    output: str
    value: float
    upper: bool = False

    def passes(self, scores: tuple[float, ...], outputs: tuple[str, ...]) -> bool:
        x = scores[outputs.index(self.output)]
        return x <= self.value if self.upper else x >= self.value


def parse_bound(text: str, upper: bool = False) -> Bound:
    """``"quality=0.6"`` -> Bound; a malformed one names the option and the form."""
    option = "--max" if upper else "--min"
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not sep or not name.strip() or number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{option} {text!r}: write OUTPUT=NUMBER, e.g. {option} quality=0.6")
    return Bound(name.strip(), number, upper)


@dataclass(frozen=True)
class Selection:
    """What to keep: rows within every bound, then (``top_k``) the K best by ``by`` overall or per prompt."""

    bounds: tuple[Bound, ...] = ()
    top_k: Optional[int] = None
    per: str = "prompt"  # "prompt" | "all"
    by: Optional[str] = None  # default: the first output (quality)

    def check(self, scores: ScoresSet) -> str:
        """The ranking output, once the file's outputs are known; refuses names the file does not have."""
        by = self.by or scores.outputs[0]
        for name, option in [(by, "--by")] + [(b.output, "--max" if b.upper else "--min") for b in self.bounds]:
            if name not in scores.outputs:
                raise ConfigError(f"{option} {name!r}: {scores.path} has the outputs {list(scores.outputs)}")
        if self.per not in ("prompt", "all"):
            raise ConfigError(f"--per {self.per!r}: choose prompt or all")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k {self.top_k}: keep at least 1")
        return by


@dataclass(frozen=True)
class SelectResult:
    """rows read, of which scored, of which within the bounds, of which kept (written)."""

    path: Optional[Path]  # the manifest (None: --to-shards only)
    rows: int
    scored: int
    within: int
    kept: int
    seconds: float
    shards: Optional[ShardsResult] = None  # what --to-shards wrote
    files: int = 1  # score files read

class _Counts:
    rows = scored = within = 0
    progress: Optional[Callable[[int], None]] = None  # called with the rows read, every PROGRESS_EVERY


def chosen_rows(scores: ScoresSet, selection: Selection, counts: Optional[_Counts] = None) -> Iterator[ScoreRow]:
    """The chosen rows, in the file's order (streamed when there is no ``top_k``)."""
    by = scores.outputs.index(selection.check(scores))
    counts = counts if counts is not None else _Counts()
    heaps: dict[object, list] = {}
    k = selection.top_k
    for row in scores:
        counts.rows += 1
        if counts.progress is not None and counts.rows % PROGRESS_EVERY == 0:
            counts.progress(counts.rows)
        if row.scores is None:
            continue
        counts.scored += 1
        if not all(b.passes(row.scores, scores.outputs) for b in selection.bounds):
            continue
        counts.within += 1
        if k is None:
            yield row
            continue
        heap = heaps.setdefault(row.prompt if selection.per == "prompt" else None, [])
        entry = (row.scores[by], -row.index, row)  # ties keep the earlier row
        if len(heap) < k:
            heapq.heappush(heap, entry)
        elif entry[:2] > heap[0][:2]:
            heapq.heapreplace(heap, entry)
    if k is not None:
        kept = [e[2] for heap in heaps.values() for e in heap]
        heaps.clear()
        yield from sorted(kept, key=lambda r: r.index)


def _manifest_path(image: str, root: Optional[Path], folder: Path) -> str:
    """The image's path as the manifest in ``folder`` must name it: absolute stays absolute; a relative one
    becomes relative to the manifest's folder (RowSource joins it back)."""
    path = resolve_image(image, root)
    if path.is_absolute():
        return str(path)
    try:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    except ValueError:  # another drive (Windows): no relative path
        return os.path.abspath(path)


class _Manifest:
    """The manifest sink: rows written in batches to a temporary file, renamed over ``out`` by ``close``."""

    def __init__(self, out: Path, outputs: tuple[str, ...], images_root: Optional[Path], layout: str):
        self.out, self.root, self.layout, self.folder = out, images_root, layout, out.parent
        self.tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.batch: list[Result] = []
        if layout == "train":
            self.fh = open(self.tmp, "w", encoding="utf-8", newline="")
            self.csv = csv.writer(self.fh)
            self.csv.writerow(["image", "prompt", "score", "score2"][: 2 + len(outputs)])
        else:
            self.writer = ResultWriter(self.tmp, outputs)

    def add(self, row: ScoreRow) -> None:
        image = _manifest_path(row.image, self.root, self.folder)
        if self.layout == "train":
            self.csv.writerow([image, row.prompt or "", *(repr(s) for s in row.scores or ())])
            return
        self.batch.append(Result(Row(image, row.prompt), row.scores))
        if len(self.batch) >= WRITE_BATCH:
            self.writer.write(self.batch)
            self.batch = []

    def close(self) -> None:
        if self.layout == "train":
            self.fh.close()
        else:
            self.writer.write(self.batch)
            self.writer.close()
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        try:
            (self.fh if self.layout == "train" else self.writer).close()
        except (OSError, OutputError):
            pass
        self.tmp.unlink(missing_ok=True)


def _check_output(out: Path, layout: str, outputs: tuple[str, ...], source: ScoresSet) -> None:
    fmt = output_format(out)
    if fmt == "parquet" or (layout == "train" and fmt != "csv"):
        raise ConfigError(f"{out}: {'a train layout is a .csv' if layout == 'train' else 'a manifest is .csv or .jsonl'}"
                          " (what ipiqa score and training read); choose e.g. -o keep.csv")
    if layout == "train" and len(outputs) > 2:
        raise ConfigError(f"--layout train: {source.path} has {len(outputs)} outputs; training's CSV labels "
                          "hold score and score2")
    source.refuse_output(out, "keep.csv")


def write_selection(scores: Union[str, Path], output: Optional[Union[str, Path]], selection: Selection = Selection(),
                    images_root: Optional[Path] = None, layout: str = "manifest", to_shards: Optional[Path] = None,
                    shard_size: int = DEFAULT_SHARD_SIZE, progress: Optional[Callable[[int], None]] = None) -> SelectResult:
    """Write the chosen rows of ``scores`` (a scores set) to ``output`` (.csv or .jsonl; replaced whole once
    complete) and/or, with ``to_shards``, their samples as new WebDataset shards (``to_shards.ShardsWriter``),
    in one pass over the set.

    ``layout="train"``: ``image, prompt, score[, score2]`` (CSV), the generic labels ``ipiqa train --dataset csv``
    reads, with ``--images`` the manifest's folder. ``progress``: called with the rows read so far."""
    start = time.perf_counter()
    source = open_scores(scores)
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: choose {' or '.join(LAYOUTS)}")
    if output is None and to_shards is None:
        raise ConfigError("nowhere to write the selection: give -o keep.csv and/or --to-shards DIR")
    out = Path(output) if output is not None else None
    if out is not None:
        _check_output(out, layout, source.outputs, source)
    selection.check(source)
    counts = _Counts()
    counts.progress = progress
    sinks: list = []
    kept = 0
    try:
        if to_shards is not None:
            sinks.append(ShardsWriter(Path(to_shards), source.outputs, shard_size, images_root))
        if out is not None:
            sinks.append(_Manifest(out, source.outputs, images_root, layout))
        for row in chosen_rows(source, selection, counts):
            for sink in sinks:
                sink.add(row)
            kept += 1
        results = [sink.close() for sink in sinks]
        if progress is not None:
            progress(counts.rows)
    except BaseException as exc:
        for sink in sinks:
            sink.abort()
        if isinstance(exc, (OSError, OutputError)):
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            where = out if out is not None else to_shards
            raise IPIQAError(f"{where}: cannot write the selection ({why}); choose another "
                             f"{'-o' if out is not None else '--to-shards folder'}") from None
        raise
    shards = next((r for r in results if isinstance(r, ShardsResult)), None)
    return SelectResult(out, counts.rows, counts.scored, counts.within, kept, time.perf_counter() - start, shards,
                        len(source.files))
