"""One output of a scoring run opened as every run opens it: the lock, the resume point, the writer.

``Scorer.score_files`` and ``RemoteScorer.score_files`` (``ipiqa score --server``) both run through it, so a
resumed output is read back, appended to and locked the same way whichever side scores."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from ipiqa.errors import IPIQAError

from ..rows import Row
from .formats import ResultWriter, resume_point
from .lock import OutputLock

__all__ = ["open_output"]


@contextmanager
def open_output(output: Union[str, Path], rows: Iterator[Row], outputs: Sequence[str], fmt: Optional[str],
                resume: bool) -> Iterator[tuple[ResultWriter, int]]:
    """(writer, rows skipped): with ``resume``, the rows the output already holds are consumed from ``rows``
    (one scan of the output) and the writer appends; the output is locked for the whole run."""
    out_path = None if str(output) == "-" else Path(output)
    if resume and out_path is None:
        raise IPIQAError("--resume needs an --output file")
    with OutputLock(out_path):
        skipped = resume_point(out_path, rows, outputs, fmt) if resume and out_path is not None else 0
        append = bool(resume and out_path is not None and out_path.is_file() and out_path.stat().st_size > 0)
        with ResultWriter(output, outputs, fmt, append=append, rows_before=skipped) as writer:
            yield writer, skipped
