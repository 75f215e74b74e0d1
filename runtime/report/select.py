"""``ipiqa select``: the rows worth keeping, as a manifest ``ipiqa score``, training or any tool reads.

Thresholds (``--min quality=0.6``, ``--max``) stream: a row is written or dropped as it is read, memory is
constant. Best-of-N (``--top-k K``) keeps a bounded heap: one of K rows for ``--per all``, one per distinct
prompt for ``--per prompt``, so memory grows with (distinct prompts x K) rows, about 0.8 KB each (measured
by benchmarks/report_bench.py: 1M rows, 250k prompts, top 1 each: ~150 MiB above the interpreter's), never with
the file's length; the chosen rows are written at the end, in the scores file's order. Error rows are never chosen.

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
from typing import Iterator, Optional, Union

from ipiqa.errors import ConfigError, IPIQAError

from ..io import OutputError, Result, ResultWriter, Row, output_format, refuse_same_file
from .read import ScoreRow, ScoresFile, open_scores, resolve_image

__all__ = ["Bound", "Selection", "SelectResult", "parse_bound", "chosen_rows", "write_selection"]

LAYOUTS = ("manifest", "train")
WRITE_BATCH = 4096  # rows per write (the writer flushes each)


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

    def check(self, scores: ScoresFile) -> str:
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

    path: Path
    rows: int
    scored: int
    within: int
    kept: int
    seconds: float


class _Counts:
    rows = scored = within = 0


def chosen_rows(scores: ScoresFile, selection: Selection, counts: Optional[_Counts] = None) -> Iterator[ScoreRow]:
    """The chosen rows, in the file's order (streamed when there is no ``top_k``)."""
    by = scores.outputs.index(selection.check(scores))
    counts = counts if counts is not None else _Counts()
    heaps: dict[object, list] = {}
    k = selection.top_k
    for row in scores:
        counts.rows += 1
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


def write_selection(scores: Union[str, Path], output: Union[str, Path], selection: Selection = Selection(),
                    images_root: Optional[Path] = None, layout: str = "manifest") -> SelectResult:
    """Write the chosen rows of ``scores`` to ``output`` (.csv or .jsonl; replaced whole once complete).

    ``layout="train"``: ``image, prompt, score[, score2]`` (CSV), the generic labels ``ipiqa train --dataset csv``
    reads, with ``--images`` the manifest's folder."""
    start = time.perf_counter()
    source = open_scores(scores)
    out = Path(output)
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: choose {' or '.join(LAYOUTS)}")
    fmt = output_format(out)
    if fmt == "parquet" or (layout == "train" and fmt != "csv"):
        raise ConfigError(f"{out}: {'a train layout is a .csv' if layout == 'train' else 'a manifest is .csv or .jsonl'}"
                          " (what ipiqa score and training read); choose e.g. -o keep.csv")
    if layout == "train" and len(source.outputs) > 2:
        raise ConfigError(f"--layout train: {source.path} has {len(source.outputs)} outputs; training's CSV labels "
                          "hold score and score2")
    refuse_same_file(source.path, out)
    selection.check(source)
    counts = _Counts()
    folder = out.parent
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
    kept = 0
    try:
        folder.mkdir(parents=True, exist_ok=True)
        rows = chosen_rows(source, selection, counts)
        if layout == "train":
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["image", "prompt", "score", "score2"][: 2 + len(source.outputs)])
                for row in rows:
                    writer.writerow([_manifest_path(row.image, images_root, folder), row.prompt or "",
                                     *(repr(s) for s in row.scores or ())])
                    kept += 1
        else:
            with ResultWriter(tmp, source.outputs) as writer:
                batch: list[Result] = []
                for row in rows:
                    batch.append(Result(Row(_manifest_path(row.image, images_root, folder), row.prompt), row.scores))
                    if len(batch) >= WRITE_BATCH:
                        writer.write(batch)
                        kept, batch = kept + len(batch), []
                writer.write(batch)
                kept += len(batch)
        os.replace(tmp, out)
    except (OSError, OutputError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise IPIQAError(f"{out}: cannot write the selection ({why}); choose another -o") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return SelectResult(out, counts.rows, counts.scored, counts.within, kept, time.perf_counter() - start)
