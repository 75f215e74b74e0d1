"""Inputs and outputs of a scoring run: row sources, one codec per output format, the output lock.

``sources``: folders, images, CSV/TSV/JSONL manifests as rows. ``formats``: CSV, JSONL and Parquet outputs,
each writing and (for ``resume_point``) reading back its own layout. ``lock``: ``OutputLock`` and
``refuse_same_file``. The names below are the package's public surface, imported as ``ipiqa.runtime.io``.
"""
from ..rows import Result, Row
from .formats import OutputError, ResultWriter, output_columns, output_format, resume_point
from .lock import OutputLock, refuse_same_file
from .sources import IMAGE_SUFFIXES, RowSource, read_rows, writable_rows

__all__ = ["Row", "Result", "IMAGE_SUFFIXES", "RowSource", "read_rows", "writable_rows", "refuse_same_file", "output_columns", "output_format",
           "ResultWriter", "OutputError", "OutputLock", "resume_point"]
