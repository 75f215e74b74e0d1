"""Scoring on a Ray cluster: decode in CPU tasks, score in an actor pool (one ``Scorer`` per GPU).

Same rows and output schema as the single-machine runtime. Ray's actor restarts and task retries
re-run a batch whose actor died, and each block's output is kept once, so a killed actor loses and
duplicates no row; bad inputs become error rows exactly as in the runtime. Imported only with ``--ray``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ipiqa.errors import IPIQAError

from .io import Result, ResultWriter, Row, read_rows
from .pipeline import RunSummary, _prepare

__all__ = ["score_with_ray"]
log = logging.getLogger(__name__)


class _Decode:
    """CPU task: rows -> normalized pixels (zeros where the row is an error) + error text."""

    def __init__(self, resolution: int, needs_prompt: bool):
        self.resolution, self.needs_prompt = resolution, needs_prompt

    def __call__(self, batch: dict) -> dict:
        pixels, errors = [], []
        for image, prompt in zip(batch["image"], batch["prompt"]):
            _, x, err = _prepare(Row(str(image), str(prompt) if prompt else None), self.resolution, self.needs_prompt)
            pixels.append(x if x is not None else np.zeros((3, self.resolution, self.resolution), np.float32))
            errors.append(err or "")
        return {**batch, "pixels": np.stack(pixels), "error": np.array(errors, dtype=object)}


class _ScoreActor:
    """One per GPU (or CPU slot): a runtime Scorer with its own prompt cache."""

    def __init__(self, bundle: str, backend: str, device: str, fail_once: Optional[str] = None):
        from .scorer import Scorer

        self.scorer = Scorer(bundle, backend=backend, device=device)
        self.outputs = self.scorer.outputs
        self.fail_once = fail_once

    def __call__(self, batch: dict) -> dict:
        if self.fail_once and not os.path.exists(self.fail_once):  # test hook: die once, mid-run
            Path(self.fail_once).touch()
            os._exit(1)
        errors = list(batch["error"])
        ok = [i for i, e in enumerate(errors) if not e]
        scores = np.full((len(errors), len(self.outputs)), np.nan, dtype=np.float64)
        if ok:
            try:
                out = self.scorer.score_arrays(batch["pixels"][ok], [str(batch["prompt"][i]) for i in ok])
                scores[ok] = out
            except Exception as exc:  # noqa: BLE001 - recorded per row like the runtime does
                for i in ok:
                    errors[i] = f"scoring failed: {type(exc).__name__}: {exc}"
        for i in ok:
            if not errors[i] and not np.all(np.isfinite(scores[i])):
                errors[i] = f"non-finite score {tuple(scores[i])}"
        result = {k: v for k, v in batch.items() if k != "pixels"}
        result["error"] = np.array(errors, dtype=object)
        for j, name in enumerate(self.outputs):
            result[name] = scores[:, j]
        return result


def score_with_ray(bundle: Union[str, Path], source: Union[str, Path, Sequence[Row]], output: Union[str, Path],
                   prompt: Optional[str] = None, address: Optional[str] = None, actors: Optional[int] = None,
                   batch_size: int = 8, backend: str = "auto", device: str = "auto", fmt: Optional[str] = None,
                   fail_once: Optional[str] = None) -> RunSummary:
    """Score every row on Ray; writes one CSV/JSONL file in input order, or Parquet shards for a ``.parquet`` dir."""
    import ray

    from ipiqa.bundle import read_bundle

    manifest = read_bundle(bundle)  # refuse a bad bundle before any cluster work
    cfg = manifest.config
    rows = list(source) if not isinstance(source, (str, Path)) else read_rows(source, prompt)
    if not rows:
        raise IPIQAError(f"{source}: no rows to score")
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address, ignore_reinit_error=True,
                 include_dashboard=False, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and device != "cpu"
    actors = actors or (gpus if use_gpu else 1)
    start = time.perf_counter()
    items = [{"index": i, "image": r.image, "prompt": r.prompt or ""} for i, r in enumerate(rows)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 200)))
    ds = ds.map_batches(_Decode, fn_constructor_kwargs={"resolution": cfg.resolution, "needs_prompt": cfg.text},
                        batch_size=batch_size, batch_format="numpy", concurrency=max(1, int(ray.cluster_resources().get("CPU", 1)) - actors))
    ds = ds.map_batches(_ScoreActor, fn_constructor_kwargs={"bundle": str(Path(bundle).resolve()), "backend": backend,
                                                            "device": "cuda" if use_gpu else "cpu", "fail_once": fail_once},
                        batch_size=batch_size, batch_format="numpy", concurrency=actors, num_gpus=1 if use_gpu else 0,
                        max_restarts=-1, max_task_retries=-1)
    out = Path(output)
    if out.suffix == ".parquet":
        ds.write_parquet(str(out))
        records = ds.select_columns(["index", "error"]).take_all()
    else:
        records = sorted(ds.take_all(), key=lambda r: int(r["index"]))
    seen = [int(r["index"]) for r in records]
    if sorted(seen) != list(range(len(rows))):
        raise IPIQAError(f"Ray returned {len(seen)} rows for {len(rows)} inputs (duplicates or losses); output not written")
    summary = RunSummary(rows=len(records), errors=sum(bool(r["error"]) for r in records))
    if out.suffix != ".parquet":
        with ResultWriter(out, cfg.outputs, fmt) as writer:
            writer.write(Result(rows[int(r["index"])],
                                None if r["error"] else tuple(float(r[o]) for o in cfg.outputs),
                                r["error"] or None) for r in records)
    summary.seconds = time.perf_counter() - start
    return summary
