"""Scoring on a Ray cluster: decode in CPU tasks, score in an actor pool (one ``Scorer`` per GPU).

Same rows, row rules (``runtime.rows``) and output schema as the single-machine runtime. Rows stream: a
manifest is read by one Ray read task in blocks, and results come back to the driver in input order
(``preserve_order``) and are written as they arrive, so neither the driver nor the cluster holds the job.
Ray's actor restarts and task retries re-run a batch whose actor died; the driver checks that row indices
arrive exactly once, in order. Imported only with ``--ray``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from ipiqa.device import parse_device
from ipiqa.errors import IPIQAError

from .io import OutputLock, ResultWriter, RowSource, refuse_same_file, writable_rows
from .pipeline import RunSummary, decode_row, score_batch
from .rows import Row, check_prompt_source, finish

__all__ = ["score_with_ray"]

BLOCK_ROWS = 1024  # rows per Ray block read from the manifest
# Test hook, off the public API: a marker path; the first scoring actor that finds it absent creates it and
# dies mid-run (Ray must restart it and retry the batch). Actors run in other processes, so the driver's value
# travels to them in the actors' runtime_env.
FAIL_ONCE_ENV = "IPIQA_RAY_TEST_FAIL_ONCE"


def _table(rows: list[tuple[int, Row]]):
    import pyarrow as pa

    return pa.table({"index": pa.array([i for i, _ in rows], pa.int64()),
                     "image": pa.array([r.image for _, r in rows], pa.string()),
                     "prompt": pa.array([r.prompt for _, r in rows], pa.string()),
                     "row_error": pa.array([r.error for _, r in rows], pa.string())})


def _blocks(rows: Iterable[Row]) -> Iterator:
    block: list[tuple[int, Row]] = []
    for i, row in enumerate(rows):
        block.append((i, row))
        if len(block) == BLOCK_ROWS:
            yield _table(block)
            block = []
    if block:
        yield _table(block)


def _datasource(source: Union[str, Path], prompt: Optional[str]):
    """A Ray datasource with one streaming read task over a folder or manifest."""
    from ray.data import Datasource
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    class ManifestDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> Optional[int]:
            return None

        def get_read_tasks(self, parallelism: int, **kwargs) -> list:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(str(source),))
            return [ReadTask(lambda: _blocks(RowSource(source, prompt)), meta)]

    return ManifestDatasource()


def _row(batch: dict, i: int) -> Row:
    prompt, error = batch["prompt"][i], batch["row_error"][i]
    return Row(str(batch["image"][i]), None if prompt is None else str(prompt), None if error is None else str(error))


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
        return {**batch, "pixels": stacked, "error": np.array(errors, dtype=object)}


class _ScoreActor:
    """One per GPU (or CPU slot): a runtime Scorer with its own prompt cache."""

    def __init__(self, bundle: str, backend: str, device: str):
        from .scorer import Scorer

        self.scorer = Scorer(bundle, backend=backend, device=device)
        self.outputs = self.scorer.outputs

    def __call__(self, batch: dict) -> dict:
        fail_once = os.environ.get(FAIL_ONCE_ENV)
        if fail_once and not os.path.exists(fail_once):  # test hook: die once, mid-run
            Path(fail_once).touch()
            os._exit(1)
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


def score_with_ray(bundle: Union[str, Path], source: Union[str, Path, Iterable[Row]], output: Union[str, Path],
                   prompt: Optional[str] = None, address: Optional[str] = None, actors: Optional[int] = None,
                   batch_size: int = 8, backend: str = "auto", device: str = "auto",
                   fmt: Optional[str] = None) -> RunSummary:
    """Score every row on Ray into one CSV, JSONL or Parquet file, in input order."""
    import ray

    from ipiqa.bundle import read_bundle

    manifest = read_bundle(bundle)  # refuse a bad bundle before any cluster work
    refuse_same_file(source, output)
    cfg = manifest.config
    if isinstance(source, (str, Path)):
        stream = RowSource(source, prompt)  # checks columns before any cluster work
        check_prompt_source(cfg.text, stream.has_prompt_column, prompt, source)
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address, ignore_reinit_error=True,
                 include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if isinstance(source, (str, Path)):
        ds = ray.data.read_datasource(_datasource(source, prompt), override_num_blocks=1, num_cpus=0)  # light I/O: never starve the actors
    else:
        ds = ray.data.from_arrow(list(_blocks(writable_rows(source))))
    dev = parse_device(device)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if dev.index:
        raise IPIQAError(f"--device {dev}: on Ray each scoring actor gets one GPU from Ray; pass --device cuda or auto")
    if dev.kind == "cuda" and not gpus:
        raise IPIQAError(f"--device {dev}: the Ray cluster has no GPU; use --device cpu or auto")
    use_gpu = gpus > 0 and dev.kind != "cpu"
    actors = actors or (gpus if use_gpu else 1)
    start = time.perf_counter()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ds = ds.map_batches(_Decode, fn_constructor_kwargs={"resolution": cfg.resolution, "needs_prompt": cfg.text},
                        batch_size=batch_size, batch_format="numpy", concurrency=max(1, cpus - actors))
    hook = {"runtime_env": {"env_vars": {FAIL_ONCE_ENV: os.environ[FAIL_ONCE_ENV]}}} if FAIL_ONCE_ENV in os.environ else {}
    ds = ds.map_batches(_ScoreActor, fn_constructor_kwargs={"bundle": str(Path(bundle).resolve()), "backend": backend,
                                                            "device": "cuda:0" if use_gpu else "cpu"},
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
    if n == 0:
        raise IPIQAError(f"{source}: no rows to score")
    return RunSummary(rows=n, errors=errors, seconds=time.perf_counter() - start)
