"""Datasets as they are stored: host rows/s from WebDataset shards and Parquet bytes against the same images as
loose files, and peak memory of a per-shard run against the number of shards, in one call (``section``).

- **Rates** run the runtime's own loop (``pipeline.score_rows``: read rows, row rules, decode + exact resize in
  the thread pool) with a model that returns zeros (``_NoModel``), so what is measured is the host side that
  must feed a GPU: for loose files one ``open`` + decode each, for shards a member read out of a tar stream and
  decoded from bytes, for Parquet a column batch and bytes. Same JPEGs, same resolution, same threads; medians
  over repeats, first pass (cold page cache aside) discarded as warm-up.
- **Memory**: one fresh process per shard count runs ``io.partitions.score_partitions`` (a real ``Scorer`` on a
  reduced-width bundle, one output file per shard) over N shards of the same samples; its peak RSS (VmHWM) must
  not grow with N (rows grow with N too: the job grows, the memory must not).

Entry point: ``section(workdir, ...) -> dict`` (``markdown`` inside), meant to be registered as the ``shards``
section of ``python -m benchmarks``; ``python -m benchmarks.shards`` runs it alone.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["SourceRate", "ShardMemory", "measure_rates", "measure_memory", "section", "markdown"]


@dataclass(frozen=True)
class SourceRate:
    source: str  # "loose files" | "tar shards" | "parquet bytes"
    rows: int
    rows_per_s: float  # median over repeats
    relative: float  # to loose files


@dataclass(frozen=True)
class ShardMemory:
    shards: int
    rows: int
    seconds: float
    peak_rss_mib: float


class _NoModel:
    """What ``score_rows`` needs of a backend, returning zeros: the host path alone is timed."""

    needs_prompt = True

    def __init__(self, resolution: int):
        self.resolution = resolution

    def score_arrays(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return np.zeros((len(images), 1))


def _write_shards(folder: Path, blobs: Sequence[bytes], shards: int, per_shard: int) -> str:
    """``shards`` tars of ``per_shard`` samples (KEY.jpg + KEY.txt), cycling through ``blobs``; returns the pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for _ in range(per_shard):
                for ext, data in (("jpg", blobs[k % len(blobs)]), ("txt", f"prompt {k // 10}".encode())):
                    info = tarfile.TarInfo(f"{k:08d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                k += 1
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def _rate(rows_of, resolution: int, workers: int, repeats: int) -> tuple[int, float]:
    from ipiqa.runtime.pipeline import score_rows

    rates, n = [], 0
    for _ in range(repeats + 1):
        start = time.perf_counter()
        summary = score_rows(rows_of(), _NoModel(resolution), batch_size=8, workers=workers)
        rates.append(summary.rows / (time.perf_counter() - start))
        assert summary.errors == 0, "a benchmark row failed to decode"
        n = summary.rows
    return n, statistics.median(rates[1:])


def measure_rates(workdir: Path, resolution: int = 512, side: int = 512, images: int = 64, shards: int = 4,
                  repeats: int = 3, workers: Optional[int] = None) -> list[SourceRate]:
    """Rows/s of the host path for the same ``images`` JPEGs as loose files, tar shards and Parquet bytes."""
    from ipiqa.runtime.cpu import usable_cores
    from ipiqa.runtime.io import RowSource

    from .host import make_jpegs

    workers = workers or usable_cores()
    files = make_jpegs(workdir / "loose", side, images)
    blobs = [p.read_bytes() for p in files]
    manifest = workdir / "loose.csv"
    manifest.write_text("image,prompt\n" + "".join(f"{p},prompt {i // 10}\n" for i, p in enumerate(files)))
    pattern = _write_shards(workdir / "shards", blobs, shards, images // shards)
    sources = {"loose files": lambda: iter(RowSource(manifest)), "tar shards": lambda: iter(RowSource(pattern))}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()),
                                 "prompt": [f"prompt {i // 10}" for i in range(len(blobs))]}),
                       workdir / "images.parquet", row_group_size=32)
        sources["parquet bytes"] = lambda: iter(RowSource(workdir / "images.parquet"))
    except ImportError:  # the [parquet] extra is absent: that row is left out
        pass
    measured = {name: _rate(rows_of, resolution, workers, repeats) for name, rows_of in sources.items()}
    base = measured["loose files"][1]
    return [SourceRate(name, n, rate, rate / base) for name, (n, rate) in measured.items()]


def _memory_child(bundle: str, pattern: str, output_dir: str) -> dict:
    from ipiqa.runtime.io import RowSource
    from ipiqa.runtime.io.partitions import score_partitions
    from ipiqa.runtime.scorer import Scorer

    from .jobs import _peak_rss_mib

    with Scorer(bundle, backend="onnxruntime", device="cpu") as scorer:
        summary = score_partitions(scorer, RowSource(pattern), output_dir, batch_size=8, workers=2)
    assert summary.errors == 0 and summary.scored == summary.partitions, "a shard was not scored whole"
    return {"rows": summary.rows, "seconds": summary.seconds, "peak_rss_mib": _peak_rss_mib()}


def _tiny_bundle(workdir: Path) -> Path:
    """A reduced-width model at 64 px exported to ONNX (as the jobs section does): the model's cost is not what
    the memory run measures."""
    from ipiqa.checkpoint import save_model
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import SMOKE_ARCH, demo_model
    from ipiqa.export.bundle_export import ExportOptions, export_bundle

    cfg = IPIQAConfig(resolution=64, **SMOKE_ARCH)
    model = demo_model(cfg)
    path = save_model(workdir / "model.safetensors", model.state_dict(), cfg)
    export_bundle(model, [path], workdir / "bundle", ExportOptions(onnx_only=True), progress=lambda m: None)
    return workdir / "bundle"


def measure_memory(workdir: Path, shard_counts: Sequence[int] = (2, 8, 32), per_shard: int = 32, side: int = 256,
                   bundle: Optional[Path] = None) -> list[ShardMemory]:
    """Peak RSS of one fresh process per shard count, each scoring N shards of ``per_shard`` samples into
    one file per shard."""
    from .host import make_jpegs

    bundle = bundle or _tiny_bundle(workdir)
    blobs = [p.read_bytes() for p in make_jpegs(workdir / "mem-jpegs", side, 16, seed=1)]
    out = []
    for n in shard_counts:
        pattern = _write_shards(workdir / f"mem-{n}", blobs, n, per_shard)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.shards", "child", str(bundle), pattern,
                               str(workdir / f"mem-{n}-out")], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run of {n} shards failed: {proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append(ShardMemory(n, r["rows"], r["seconds"], r["peak_rss_mib"]))
        print(f"  {n} shards ({r['rows']} rows): peak {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    return out


def markdown(rates: Sequence[SourceRate], memory: Sequence[ShardMemory]) -> str:
    from .jobs import _markdown

    base = memory[0]
    return "\n\n".join([
        _markdown(["source (same JPEGs)", "rows", "host rows/s", "x loose files"],
                  [[r.source, f"{r.rows}", f"{r.rows_per_s:.1f}", f"{r.relative:.2f}x"] for r in rates]),
        _markdown(["shards", "rows", "run (s)", "peak RSS (MiB)", "shards ratio", "peak RSS ratio"],
                  [[f"{m.shards}", f"{m.rows:,}", f"{m.seconds:.1f}", f"{m.peak_rss_mib:.0f}",
                    f"{m.shards / base.shards:.0f}x", f"{m.peak_rss_mib / base.peak_rss_mib:.2f}x"] for m in memory])])


def section(workdir: Path, resolution: int = 512, side: int = 512, images: int = 64, shards: int = 4,
            repeats: int = 3, shard_counts: Sequence[int] = (2, 8, 32), per_shard: int = 32,
            bundle: Optional[Path] = None) -> dict:
    """Rates and memory in one run; the dict holds both tables' data and their ``markdown``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rates = measure_rates(workdir / "rates", resolution, side, images, shards, repeats)
    memory = measure_memory(workdir / "memory", shard_counts, per_shard, bundle=bundle)
    from ipiqa.runtime.cpu import usable_cores

    return {"resolution": resolution, "source_side": side, "workers": usable_cores(),
            "rates": [asdict(r) for r in rates], "memory": [asdict(m) for m in memory],
            "markdown": markdown(rates, memory)}


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(_memory_child(*sys.argv[2:5])))
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result = section(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp))
        print(result["markdown"])
        print(json.dumps({k: v for k, v in result.items() if k != "markdown"}))
