"""One output of a scoring run opened as every run opens it: the lock, the run record, the resume point, the writer.

``Scorer.score_files`` and ``RemoteScorer.score_files`` (``ipiqa score --server``) both run through it, so a
resumed output is read back, appended to, locked and recorded the same way whichever side scores. The run's
``Provenance`` (what made its numbers) goes to ``<output>.run.json`` (and a Parquet file's metadata) once per
run; a resume by a run that would score with another bundle, backend, precision or engine batch is refused
before a row is read."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from ipiqa.errors import IPIQAError

from ..rows import Row
from .formats import ResultWriter, refuse_same_file, resume_point
from .lock import OutputLock
from .provenance import PARQUET_KEY, Provenance, check_resume, write_provenance

__all__ = ["open_output", "refuse_same_file"]


def _recordable(path: Optional[Path]) -> bool:
    """A regular file (or one to be created): not stdout, /dev/null or a pipe."""
    return path is not None and (not path.exists() or path.is_file())


@contextmanager
def open_output(output: Union[str, Path], rows: Iterator[Row], outputs: Sequence[str], fmt: Optional[str],
                resume: bool, provenance: Optional[Provenance] = None) -> Iterator[tuple[ResultWriter, int]]:
    """(writer, rows skipped): with ``resume``, the rows the output already holds are consumed from ``rows``
    (one scan of the output) and the writer appends; the output is locked for the whole run. ``provenance``:
    this run's record, written beside the output and compared with the recorded one on resume (None: neither)."""
    out_path = None if str(output) == "-" else Path(output)
    if resume and out_path is None:
        raise IPIQAError("--resume needs an --output file")
    with OutputLock(out_path):
        recorded = provenance is not None and _recordable(out_path)
        has_rows = bool(out_path is not None and out_path.is_file() and out_path.stat().st_size > 0)
        if resume and recorded and has_rows:
            check_resume(out_path, provenance)  # type: ignore[arg-type]
        skipped = resume_point(out_path, rows, outputs, fmt) if resume and out_path is not None else 0
        append = bool(resume and out_path is not None and out_path.is_file() and out_path.stat().st_size > 0)
        if recorded:
            write_provenance(out_path, provenance, skipped if append else 0)  # type: ignore[arg-type]
        metadata = {PARQUET_KEY: provenance.to_json()} if provenance is not None else None
        with ResultWriter(output, outputs, fmt, append=append, rows_before=skipped, metadata=metadata) as writer:
            yield writer, skipped
