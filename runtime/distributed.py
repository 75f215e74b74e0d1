"""Scoring on a Ray cluster: decode in CPU tasks, score in an actor pool (one ``Scorer`` per GPU).

Same rows, row rules (``runtime.rows``) and output schema as the single-machine runtime. Rows stream: a
manifest is read by one Ray read task in blocks, and results come back to the driver in input order
(``preserve_order``) and are written as they arrive, so neither the driver nor the cluster holds the job.
Ray's actor restarts and task retries re-run a batch whose actor died; the driver checks that row indices
arrive exactly once, in order. Shard and Parquet rows carry their encoded bytes through the blocks.

``per_partition`` (``--ray --output-dir``): one Ray actor task per shard or Parquet file instead, each actor a
``Scorer`` running ``io.partitions.score_partition``, the single-machine per-shard path itself (claim, write
aside, rename), so rows equal a local run's and a retried task resumes its shard's partial file. Imported
only with ``--ray``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np

from ipiqa.device import parse_device
from ipiqa.errors import IPIQAError

from .io import OutputLock, ResultWriter, RowSource, writable_rows
from .pipeline import RunSummary, decode_row, score_batch
from .rows import Result, Row, finish, image_bytes, image_file

__all__ = ["score_with_ray"]

BLOCK_ROWS = 1024  # rows per Ray block read from the manifest
# Test hook, off the public API: a marker path; the first scoring actor that finds it absent creates it and
# dies mid-run (Ray must restart it and retry the batch). Actors run in other processes, so the driver's value
# travels to them in the actors' runtime_env.
FAIL_ONCE_ENV = "IPIQA_RAY_TEST_FAIL_ONCE"


def _image_columns(row: Row) -> tuple[Optional[bytes], Optional[str], Optional[str]]:
    """(encoded bytes, file, error) of a row as its block carries it, read through ``rows.image_file`` /
    ``rows.image_bytes`` as every consumer reads it: a row whose image is in memory travels as bytes, one whose
    image is a file other than its label (a Parquet path cell) as that path; a decoded Python API image cannot
    travel to a Ray task and becomes the row's error."""
    if row.source is None or row.error is not None:
        return None, None, None
    path = image_file(row)
    if path is not None:
        return None, path, None
    try:
        return image_bytes(row), None, None
    except IPIQAError as exc:
        return None, None, str(exc)


def _table(rows: list[tuple[int, Row]]):
    import pyarrow as pa

    columns = [_image_columns(r) for _, r in rows]
    return pa.table({"index": pa.array([i for i, _ in rows], pa.int64()),
                     "image": pa.array([r.image for _, r in rows], pa.string()),
                     "prompt": pa.array([r.prompt for _, r in rows], pa.string()),
                     "row_error": pa.array([r.error or c[2] for (_, r), c in zip(rows, columns)], pa.string()),
                     "data": pa.array([c[0] for c in columns], pa.binary()),
                     "data_path": pa.array([c[1] for c in columns], pa.string())})


def _blocks(rows: Iterable[Row]) -> Iterator:
    block: list[tuple[int, Row]] = []
    for i, row in enumerate(rows):
        block.append((i, row))
        if len(block) == BLOCK_ROWS:
            yield _table(block)
            block = []
    if block:
        yield _table(block)


def _datasource(source: RowSource):
    """A Ray datasource with one streaming read task over a folder or manifest."""
    from ray.data import Datasource
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    class ManifestDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> Optional[int]:
            return None

        def get_read_tasks(self, parallelism: int, **kwargs) -> list:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(str(source.path),))
            return [ReadTask(lambda: _blocks(source), meta)]

    return ManifestDatasource()


def _row(batch: dict, i: int) -> Row:
    prompt, error = batch["prompt"][i], batch["row_error"][i]
    data = batch["data"][i] if "data" in batch else None
    if data is None and "data_path" in batch and batch["data_path"][i] is not None:
        data = Path(str(batch["data_path"][i]))
    return Row(str(batch["image"][i]), None if prompt is None else str(prompt), None if error is None else str(error),
               source=data)


class _Decode:
    """CPU task: rows -> pixels (zeros where the row is an error) + the row rules' error text ('' if none)."""

    def __init__(self, resolution: int, needs_prompt: bool):
        self.resolution, self.needs_prompt = resolution, needs_prompt

    def __call__(self, batch: dict) -> dict:
        pixels, errors = [], []
        for i in range(len(batch["index"])):
            x, err = decode_row(_row(batch, i), self.resolution, self.needs_prompt)
            pixels.append(x)
            errors.append(err or "")
        blank = np.zeros((self.resolution, self.resolution, 3), np.uint8)  # the slot of an error row
        stacked = np.stack([x if x is not None else blank for x in pixels])
        kept = {k: v for k, v in batch.items() if k not in ("data", "data_path")}  # decoded: the bytes stay here
        return {**kept, "pixels": stacked, "error": np.array(errors, dtype=object)}


class _ScoreActor:
    """One per GPU (or CPU slot): a runtime Scorer with its own prompt cache."""

    def __init__(self, bundle: str, backend: str, device: str, reproducible: bool = False):
        from .scorer import Scorer

        self.scorer = Scorer(bundle, backend=backend, device=device, reproducible=reproducible)
        self.outputs = self.scorer.outputs

    def __call__(self, batch: dict) -> dict:
        _fail_once()  # test hook: die once, mid-run
        rows = [_row(batch, i) for i in range(len(batch["index"]))]
        decoded = [(None, e) if e else (batch["pixels"][i], None) for i, e in enumerate(batch["error"])]
        scores = np.full((len(rows), len(self.outputs)), np.nan, dtype=np.float64)
        errors = []
        for i, result in enumerate(score_batch(self.scorer, rows, decoded)):  # the runtime's own batch rules
            if result.scores is not None:
                scores[i] = result.scores
            errors.append(result.error or "")
        result = {k: v for k, v in batch.items() if k != "pixels"}
        result["error"] = np.array(errors, dtype=object)
        result["scores"] = scores
        return result


def _fail_once() -> None:
    """The test hook (``FAIL_ONCE_ENV``): the first caller that finds the marker absent creates it and dies."""
    fail_once = os.environ.get(FAIL_ONCE_ENV)
    if fail_once and not os.path.exists(fail_once):
        Path(fail_once).touch()
        os._exit(1)


class _PartitionActor:
    """One per GPU (or CPU slot): scores whole partitions, each into its own file (``io.partitions``)."""

    def __init__(self, bundle: str, backend: str, device: str, source: RowSource, finals: list, batch_size: int,
                 reproducible: bool = False):
        from .scorer import Scorer

        self.scorer = Scorer(bundle, backend=backend, device=device, reproducible=reproducible)
        self.source, self.finals, self.batch_size = source, finals, batch_size

    def score(self, index: int):
        from .io.partitions import score_partition

        # the hook fires after a batch is written, so a retried task meets a partial file
        return score_partition(self.scorer, self.source, index, self.finals[index], self.batch_size,
                               on_results=lambda results: _fail_once())


def _score_partitions(ray, bundle: Union[str, Path], source: RowSource, output_dir: Union[str, Path],
                      fmt: Optional[str], actors: int, resources: dict, batch_size: int, backend: str, device: str,
                      hook: dict, on_partition: Callable[[Any], None], reproducible: bool = False):
    from ray.util import ActorPool

    from .io.partitions import PartitionsSummary, partition_outputs

    finals = partition_outputs(source, output_dir, fmt or "csv")
    start = time.perf_counter()
    remote = ray.remote(_PartitionActor).options(max_restarts=-1, max_task_retries=-1, **resources, **hook)
    pool = ActorPool([remote.remote(str(Path(bundle).resolve()), backend, device, source, finals, batch_size,
                                    reproducible)
                      for _ in range(max(1, min(actors, len(finals))))])
    results = []
    for result in pool.map_unordered(lambda actor, index: actor.score.remote(index), range(len(finals))):
        results.append(result)
        on_partition(result)
    return PartitionsSummary.of(results, time.perf_counter() - start)


def score_with_ray(bundle: Union[str, Path], source: Union[str, Path, RowSource, Iterable[Row]],
                   output: Union[str, Path], prompt: Optional[str] = None, address: Optional[str] = None,
                   actors: Optional[int] = None, batch_size: int = 8, backend: str = "auto", device: str = "auto",
                   fmt: Optional[str] = None, per_partition: bool = False,
                   on_results: Callable[[list[Result]], None] = lambda results: None,
                   on_partition: Callable[[Any], None] = lambda partition: None, reproducible: bool = False):
    """Score every row on Ray into one CSV, JSONL or Parquet file, in input order (a ``RunSummary``).

    ``on_results`` gets each batch's results as the driver writes them (the CLI's bar); ``on_partition`` each
    partition's ``PartitionResult`` as its task ends (``per_partition``). ``reproducible``: every worker's
    ``Scorer(reproducible=True)`` (one engine batch on GPUs too; on CPUs it always is).

    ``per_partition``: ``output`` is a folder and every shard or Parquet file gets its own output in it, one Ray
    task each (a ``PartitionsSummary``; see ``io.partitions``). ``source`` may be a ``RowSource`` built with its
    options (``prompt_field``, ``image_column``, ``prompt_column``).
    """
    import ray

    from ipiqa.bundle import read_bundle

    manifest = read_bundle(bundle)  # refuse a bad bundle before any cluster work
    cfg = manifest.config
    if isinstance(source, (str, Path)):
        source = RowSource(source, prompt)  # checks columns before any cluster work
    elif isinstance(source, RowSource) and prompt is not None:
        raise IPIQAError("a RowSource carries its own prompt: pass RowSource(..., prompt=TEXT), not prompt=")
    if isinstance(source, RowSource):
        source.refuse_run(cfg.text, None if per_partition else output)
    elif per_partition:
        raise IPIQAError("one output per partition needs a RowSource (shards or Parquet files), not a list of rows")
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address, ignore_reinit_error=True,
                 include_dashboard=False, log_to_driver=False)
    dev = parse_device(device)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if dev.index:
        raise IPIQAError(f"--device {dev}: on Ray each scoring actor gets one GPU from Ray; pass --device cuda or auto")
    if dev.kind == "cuda" and not gpus:
        raise IPIQAError(f"--device {dev}: the Ray cluster has no GPU; use --device cpu or auto")
    use_gpu = gpus > 0 and dev.kind != "cpu"
    actors = actors or (gpus if use_gpu else 1)
    hook = {"runtime_env": {"env_vars": {FAIL_ONCE_ENV: os.environ[FAIL_ONCE_ENV]}}} if FAIL_ONCE_ENV in os.environ else {}
    if per_partition:
        resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
        return _score_partitions(ray, bundle, source, output, fmt, actors, resources, batch_size, backend,
                                 "cuda:0" if use_gpu else "cpu", hook, on_partition, reproducible)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if isinstance(source, RowSource):
        ds = ray.data.read_datasource(_datasource(source), override_num_blocks=1, num_cpus=0)  # light I/O: never starve the actors
    else:
        ds = ray.data.from_arrow(list(_blocks(writable_rows(source))))
    start = time.perf_counter()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ds = ds.map_batches(_Decode, fn_constructor_kwargs={"resolution": cfg.resolution, "needs_prompt": cfg.text},
                        batch_size=batch_size, batch_format="numpy", concurrency=max(1, cpus - actors))
    ds = ds.map_batches(_ScoreActor, fn_constructor_kwargs={"bundle": str(Path(bundle).resolve()), "backend": backend,
                                                            "device": "cuda:0" if use_gpu else "cpu",
                                                            "reproducible": reproducible},
                        batch_size=batch_size, batch_format="numpy", concurrency=actors, num_gpus=1 if use_gpu else 0,
                        max_restarts=-1, max_task_retries=-1, **hook)
    n = errors = 0
    with OutputLock(output), ResultWriter(output, cfg.outputs, fmt) as writer:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            results = []
            for i, index in enumerate(batch["index"]):
                if int(index) != n:
                    raise IPIQAError(f"Ray returned row {int(index)} where row {n} was due (a lost or duplicated "
                                     f"row); {writer.rows_written} rows written to {output} are correct")
                results.append(finish(_row(batch, i), None if batch["error"][i] else batch["scores"][i],
                                      batch["error"][i] or None))
                n += 1
            errors += sum(r.error is not None for r in results)
            writer.write(results)
            on_results(results)
    if n == 0:
        raise IPIQAError(f"{source}: no rows to score")
    return RunSummary(rows=n, errors=errors, seconds=time.perf_counter() - start)
