"""Jobs of any size: peak memory, per-row overhead and ``--resume`` time of ``Scorer.score_files`` against rows.

Each size runs in a fresh process (so peak RSS belongs to that job alone) through the public API: a CSV
manifest of N rows is streamed through ``score_files`` into a CSV output, then the same command is run again
with ``resume=True`` on the finished output (the resume scan reads all N rows and scores none). Rows point to
files that do not exist, so no model work is done: what is measured is the runtime's own cost per row (read,
row rules, pool, write) — the part that must stay flat in memory and linear in time.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["JobResult", "ApiResult", "measure_jobs", "jobs_table", "measure_api", "api_table"]


@dataclass(frozen=True)
class JobResult:
    rows: int
    seconds: float  # the whole score_files run
    rows_per_s: float  # per-row overhead, one decoding thread per core
    peak_rss_mib: float  # the process's peak resident memory, interpreter and onnxruntime included
    resume_seconds: float  # resume scan of the finished N-row output


def _write_manifest(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("image,prompt\n")
        for i in range(rows):
            fh.write(f"missing/img{i:08d}.jpg,a generated image of prompt number {i // 10}\n")


def _child(bundle: str, manifest: str, output: str) -> dict:
    from ipiqa.runtime.scorer import Scorer

    with Scorer(bundle, backend="onnxruntime", device="cpu") as scorer:
        summary = scorer.score_files(manifest, output, batch_size=32, workers=2)
        start = time.perf_counter()
        again = scorer.score_files(manifest, output, batch_size=32, workers=2, resume=True)
        resume = time.perf_counter() - start
    assert again.skipped == summary.rows and again.rows == 0, "resume did not find every row"
    return {"rows": summary.rows, "seconds": summary.seconds, "resume_seconds": resume,
            "peak_rss_mib": _peak_rss_mib()}


@dataclass(frozen=True)
class ApiResult:
    images: int  # length of the list given to Scorer.score
    seconds: float
    images_per_s: float
    peak_rss_mib: float


def _api_child(bundle: str, folder: str, n: str) -> dict:
    """``Scorer.score`` on a list of ``n`` real image paths (the folder's files, cycled), batch 8."""
    from ipiqa.runtime.scorer import Scorer

    files = sorted(str(p) for p in Path(folder).iterdir())
    paths = [files[i % len(files)] for i in range(int(n))]
    with Scorer(bundle, backend="onnxruntime", device="cpu") as scorer:
        start = time.perf_counter()
        records = scorer.score(paths, [f"prompt {i // 10}" for i in range(len(paths))], batch_size=8, workers=2)
        seconds = time.perf_counter() - start
    assert len(records) == len(paths) and all(r["error"] is None for r in records), "API run lost or failed rows"
    return {"images": len(records), "seconds": seconds, "peak_rss_mib": _peak_rss_mib()}


def measure_api(bundle: Path, resolution: int, sizes: Sequence[int], workdir: Path) -> list[ApiResult]:
    """One fresh process per list length: peak RSS of ``Scorer.score`` must not grow with the list."""
    import numpy as np
    from PIL import Image

    folder = workdir / "api-images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = []
    for n in sizes:
        r = _child_run(f"API run of {n} images", "api", bundle, folder, n)
        out.append(ApiResult(r["images"], r["seconds"], r["images"] / r["seconds"], r["peak_rss_mib"]))
        print(f"  Scorer.score of {n} images: {out[-1].images_per_s:.1f} img/s, peak {out[-1].peak_rss_mib:.0f} MiB",
              file=sys.stderr)
    return out


def api_table(results: Sequence[ApiResult]) -> str:
    base = results[0]
    return _markdown(["images in the list", "run (s)", "img/s", "peak RSS (MiB)", "list ratio", "peak RSS ratio"],
                     [[f"{r.images:,}", f"{r.seconds:.1f}", f"{r.images_per_s:.1f}", f"{r.peak_rss_mib:.0f}",
                       f"{r.images / base.images:.1f}x", f"{r.peak_rss_mib / base.peak_rss_mib:.2f}x"] for r in results])


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A right-aligned markdown table."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def _child_run(what: str, *args: object) -> dict:
    """``python -m benchmarks.jobs ARGS`` in a fresh process (its own peak RSS); its last line is JSON."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.jobs", *map(str, args)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_rss_mib() -> float:
    """This process's peak resident set. Linux's VmHWM belongs to the process image (reset by exec), while
    ru_maxrss keeps the parent's peak across fork + exec and would report the benchmark's own memory."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_jobs(bundle: Path, sizes: Sequence[int], workdir: Path) -> list[JobResult]:
    """One fresh process per size; the bundle's model size does not matter (no image is decoded)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = []
    for n in sizes:
        manifest, output = workdir / f"rows-{n}.csv", workdir / f"scores-{n}.csv"
        _write_manifest(manifest, n)
        output.unlink(missing_ok=True)
        r = _child_run(f"job of {n} rows", bundle, manifest, output)
        out.append(JobResult(r["rows"], r["seconds"], r["rows"] / r["seconds"], r["peak_rss_mib"], r["resume_seconds"]))
        print(f"  job {n} rows: {out[-1].rows_per_s:,.0f} rows/s, peak {out[-1].peak_rss_mib:.0f} MiB, "
              f"resume {out[-1].resume_seconds:.2f} s", file=sys.stderr)
        output.unlink(missing_ok=True)
        manifest.unlink(missing_ok=True)
    return out


def jobs_table(results: Sequence[JobResult]) -> str:
    """Markdown: each size with its ratios to the smallest, so growth is read off directly."""
    base = results[0]
    return _markdown(["rows", "run (s)", "rows/s", "peak RSS (MiB)", "resume scan (s)", "rows ratio", "resume time ratio"],
                     [[f"{r.rows:,}", f"{r.seconds:.1f}", f"{r.rows_per_s:,.0f}", f"{r.peak_rss_mib:.0f}",
                       f"{r.resume_seconds:.2f}", f"{r.rows / base.rows:.1f}x",
                       f"{r.resume_seconds / base.resume_seconds:.1f}x"] for r in results])


def as_dicts(results: Sequence[JobResult]) -> list[dict]:
    return [asdict(r) for r in results]


if __name__ == "__main__":
    print(json.dumps(_api_child(*sys.argv[2:5]) if sys.argv[1] == "api" else _child(*sys.argv[1:4])))
