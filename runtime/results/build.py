"""``write_report``: a scores set (one file or many) in, one HTML page out (what ``ipiqa report`` runs)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

from ipiqa.errors import IPIQAError

from .collect import ReportOptions, collect
from .page import render_page
from .runinfo import run_lines
from .sets import open_scores
from .thumbs import Thumbnails

__all__ = ["ReportResult", "write_report"]


@dataclass(frozen=True)
class ReportResult:
    """What was written: the page, its size, the rows read, the thumbnails embedded and the seconds taken."""

    path: Path
    bytes: int
    rows: int
    errors: int
    thumbnails: int
    seconds: float


def write_report(scores: Union[str, Path], output: Union[str, Path], options: ReportOptions = ReportOptions(),
                 images_root: Optional[Path] = None, bundle: Optional[Path] = None, title: Optional[str] = None,
                 thumb_size: int = 160, progress: Optional[Callable[[int], None]] = None,
                 shard_previews: bool = False) -> ReportResult:
    """Read ``scores`` (streamed, twice at most), write the page to ``output`` (replaced whole, never half-written).
    ``shard_previews``: read the shards holding shown ``SHARD::KEY`` rows for their thumbnails (each once)."""
    start = time.perf_counter()
    source = open_scores(scores)
    out = Path(output)
    source.refuse_output(out, "report.html")
    run = run_lines(source, bundle)
    data = collect(source, replace(options, progress=progress) if progress else options)
    thumbs = Thumbnails(thumb_size)
    if shard_previews:
        thumbs.prefetch_shards((r.image for r in data.shown()), images_root)
    html = render_page(data, thumbs, images_root, run, title).encode("utf-8")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(html)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise IPIQAError(f"{out}: cannot write the report ({exc.strerror or exc}); choose another -o") from None
    return ReportResult(out, len(html), data.rows, data.errors, thumbs.made, time.perf_counter() - start)
