"""One output file per input partition (a tar shard, a Parquet file), visible only once it is complete.

``--output-dir OUT``: partition ``DIR/00042.tar`` is written to ``OUT/.00042.csv.partial`` and renamed to
``OUT/00042.csv`` (``os.replace``: atomic on one filesystem) after its last row, so a file under its final
name is always whole; its run record (``.00042.csv.partial.run.json``, ``io.provenance``) is renamed to
``OUT/00042.csv.run.json`` just before. Before writing, a run claims the partition with an advisory lock on
``OUT/.00042.csv.lock`` (``fcntl.flock``, released by the kernel when the process dies); a partition whose
final file exists is skipped, and one claimed by another process (another machine sharing the shard list
and the folder) is left to it. A partial file left by a killed run is resumed (CSV/JSONL) or rewritten
(Parquet) by the next run that claims it. Nothing here scores: ``score_partitions`` hands each partition's
rows to ``Scorer.score_files``, so the rows are the same as a single-output run's.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union

from ipiqa.errors import IPIQAError

from ..rows import Result
from .formats import CODECS, OutputError
from .lock import try_flock, write_holder
from .provenance import sidecar_path
from .inputs import PARQUET_SUFFIXES, SHARD_SUFFIXES
from .sources import RowSource

__all__ = ["PartitionResult", "PartitionsSummary", "partition_outputs", "score_partition", "score_partitions"]


@dataclass(frozen=True)
class PartitionResult:
    """What happened to one partition in this run."""

    name: str  # output file name, e.g. 00042.csv
    state: str  # "scored" (written now) | "complete" (already there) | "busy" (claimed by another run) | "stopped"
    rows: int = 0  # rows in the output (resumed ones included) when scored
    errors: int = 0  # error rows written by this run
    skipped: int = 0  # rows found in a partial file and kept


@dataclass(frozen=True)
class PartitionsSummary:
    partitions: int
    scored: int
    complete: int
    busy: int
    rows: int
    errors: int
    seconds: float
    stopped: bool = False

    @classmethod
    def of(cls, results: list[PartitionResult], seconds: float) -> "PartitionsSummary":
        count = lambda state: sum(r.state == state for r in results)  # noqa: E731
        return cls(len(results), count("scored"), count("complete"), count("busy"), sum(r.rows for r in results),
                   sum(r.errors for r in results), seconds, stopped=count("stopped") > 0)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in SHARD_SUFFIXES + PARQUET_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return path.stem or name


def partition_outputs(source: RowSource, output_dir: Union[str, Path], fmt: str = "csv") -> list[Path]:
    """The final output file of each partition: ``OUT/<input file's name without suffix>.<fmt>``. Two inputs of
    one name (``a/00000.tar``, ``b/00000.tar``) are refused: they would share an output."""
    if fmt not in CODECS:
        raise IPIQAError(f"unknown output format {fmt!r}; use csv, jsonl or parquet")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: --output-dir must be a folder; it is a file")
    seen: dict[str, Path] = {}
    finals = []
    for p in source.partitions:
        name = f"{_stem(p)}.{fmt}"
        if name in seen:
            raise IPIQAError(f"{seen[name]} and {p} would both write {out / name}; give each run inputs of distinct "
                             "names (or one --output-dir per folder)")
        seen[name] = p
        finals.append(out / name)
    return finals


def _claim(final: Path) -> Optional[IO[str]]:
    """The lock on ``.NAME.lock`` beside ``final``, or None when another process holds it."""
    fh = try_flock(final.with_name(f".{final.name}.lock"), "choose a writable --output-dir")
    if fh is not None:
        write_holder(fh)
    return fh


def _release(final: Path, fh: IO[str]) -> None:
    # Unlinked only after the final file exists: whoever locks a stale inode then finds the final file and skips.
    if final.exists():
        try:
            os.unlink(final.with_name(f".{final.name}.lock"))
        except OSError:
            pass
    fh.close()


def _commit(partial: Path, final: Path) -> None:
    """fsync, then rename: after a crash the final name holds either nothing or every row. The run record
    (``<output>.run.json``) goes first, so a final file never appears without it."""
    with open(partial, "rb") as fh:
        os.fsync(fh.fileno())
    if sidecar_path(partial).is_file():
        os.replace(sidecar_path(partial), sidecar_path(final))
    os.replace(partial, final)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # a filesystem without directory fsync: the rename itself is still atomic


def score_partition(scorer: Any, source: RowSource, index: int, final: Path, batch_size: int = 8, workers: int = 4,
                    fail_fast: bool = False, on_results: Callable[[list[Result]], None] = lambda r: None,
                    **score_options: Any) -> PartitionResult:
    """Score ``source.partitions[index]`` into ``final`` unless it is complete or claimed elsewhere.

    ``scorer``: a ``Scorer`` (anything with its ``score_files``); ``score_options`` go to it (decode, fast_decode).
    """
    if final.is_file():
        return PartitionResult(final.name, "complete")
    final.parent.mkdir(parents=True, exist_ok=True)
    claim = _claim(final)
    if claim is None:
        return PartitionResult(final.name, "busy")
    try:
        if final.is_file():  # finished by another run between the check and the claim
            return PartitionResult(final.name, "complete")
        fmt = final.suffix[1:]
        partial = final.with_name(f".{final.name}.partial")
        resume = CODECS[fmt].refusal is None and partial.is_file()
        summary = scorer.score_files(source.partition_rows(index), partial, fmt=fmt, batch_size=batch_size,
                                     workers=workers, resume=resume, fail_fast=fail_fast, on_results=on_results,
                                     **score_options)
        if summary.stopped:
            return PartitionResult(final.name, "stopped", summary.rows + summary.skipped, summary.errors,
                                   summary.skipped)
        _commit(partial, final)
        return PartitionResult(final.name, "scored", summary.rows + summary.skipped, summary.errors, summary.skipped)
    finally:
        _release(final, claim)


def score_partitions(scorer: Any, source: RowSource, output_dir: Union[str, Path], fmt: Optional[str] = None,
                     batch_size: int = 8, workers: int = 4, fail_fast: bool = False,
                     on_results: Callable[[list[Result]], None] = lambda r: None,
                     on_partition: Callable[[PartitionResult], None] = lambda p: None,
                     **score_options: Any) -> PartitionsSummary:
    """Every partition of ``source`` into its own file under ``output_dir`` (see the module docstring).

    A rerun, or several machines given the same list and folder, score each partition once.
    """
    fmt = fmt or "csv"
    finals = partition_outputs(source, output_dir, fmt)
    source.refuse_run(scorer.needs_prompt, None, score_options.get("decode") == "device")
    start = time.perf_counter()
    results = []
    for index, final in enumerate(finals):
        result = score_partition(scorer, source, index, final, batch_size, workers, fail_fast, on_results,
                                 **score_options)
        results.append(result)
        on_partition(result)
        if result.state == "stopped":
            break
    return PartitionsSummary.of(results, time.perf_counter() - start)
