"""Inputs and outputs of a scoring run: row sources, one codec per output format, the output lock.

``inputs``: what ``--images`` names (folders, list files, globs, brace patterns, suffix tables), found before any
file is read. ``sources``: folders, images, CSV/TSV/JSONL manifests, WebDataset shards (``shards``, which reads tars
only) and Parquet image columns (``parquet_source``) as rows; ``references``: manifest rows naming a shard sample
or a Parquet row (``SHARD::KEY``, ``FILE::ROW``), read from it. ``partitions``: one output file per shard or Parquet file, renamed into
place when complete and claimed by a lock, so reruns and several machines score each once. ``formats``: CSV,
JSONL and Parquet outputs, each writing and (for ``resume_point``) reading back its own layout. ``lock``: ``OutputLock``. The names below are the package's public surface, imported as ``ipiqa.runtime.io``.
"""
from ..rows import Result, Row
from .formats import OutputError, ResultWriter, output_columns, output_format, refuse_same_file, resume_point, scan_output
from .lock import OutputLock
from .partitions import PartitionResult, PartitionsSummary, score_partitions
from .inputs import IMAGE_SUFFIXES, expand_braces
from .sources import RowSource, read_rows, writable_rows

__all__ = ["Row", "Result", "IMAGE_SUFFIXES", "expand_braces", "RowSource", "read_rows", "writable_rows", "refuse_same_file", "output_columns", "output_format", "scan_output",
           "ResultWriter", "OutputError", "OutputLock", "resume_point", "score_partitions", "PartitionsSummary",
           "PartitionResult"]
