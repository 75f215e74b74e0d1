"""``ipiqa report`` and ``ipiqa select`` on large scores files and sets: time, peak memory and the page's size;
``ipiqa select --to-shards``: samples and MB per second.

A scores file of N rows is written by the real codec (``ResultWriter``, as ``ipiqa score`` writes it): two
outputs, N/4 distinct prompts of four images each (best of 4), 1% error rows, image paths cycling over a few
real PNGs (so thumbnails are decoded, as in a real report). The same rows are also written as a scores set (a
folder of ``SET_FILES`` files, as ``--output-dir`` writes them) and read by the same commands. ``--to-shards``
copies the kept half of ``SHARD_SAMPLES`` samples (a JPEG, a .txt and a .json each) of 16 shards. Each
measurement runs in a fresh process, so the peak RSS is that command's alone (interpreter and numpy included).
Public API only.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["measure_report", "report_table", "measure_to_shards"]

SET_FILES = 64  # files of the scores set (one per shard of a run)
SHARD_SAMPLES = 8000  # samples of the --to-shards measurement (16 shards)


from .jobs import _peak_rss_mib  # noqa: E402 (VmHWM: ru_maxrss would carry the benchmark's own peak into the child)


def write_scores(path: Path, rows: int, images: Sequence[str]) -> None:
    """A scores file of ``rows`` rows in the layout of ``ipiqa score`` (by its own writer)."""
    import numpy as np

    from ipiqa.runtime.io import Result, ResultWriter, Row

    rng = np.random.default_rng(0)
    prompt_quality = rng.normal(0.5, 0.12, size=rows // 4 + 1)
    noise = rng.normal(0.0, 0.08, size=(rows, 2))
    with ResultWriter(path, ("quality", "alignment")) as writer:
        batch = []
        for i in range(rows):
            row = Row(images[i % len(images)], f"a generated scene, prompt number {i // 4}")
            if i % 100 == 99:
                batch.append(Result(row, None, f"{row.image}: corrupt image (synthetic error)"))
            else:
                q = float(prompt_quality[i // 4] + noise[i, 0])
                batch.append(Result(row, (q, float(0.6 * q + 0.2 + noise[i, 1]))))
            if len(batch) == 8192:
                writer.write(batch)
                batch = []
        writer.write(batch)


def write_set(folder: Path, whole: Path, rows: int, files: int = SET_FILES) -> None:
    """``whole``'s ``rows`` rows as ``files`` score files in ``folder`` (00000.csv, ...), as ``--output-dir``
    writes them; streamed, a batch at a time."""
    from ipiqa.runtime.io import Result, ResultWriter, Row
    from ipiqa.runtime.results.sets import open_scores

    source = open_scores(whole)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    writer, batch = None, []
    for r in source:
        if r.index % per == 0:
            if writer is not None:
                writer.write(batch)
                writer.close()
            writer, batch = ResultWriter(folder / f"{r.index // per:05d}.csv", source.outputs), []
        batch.append(Result(Row(r.image, r.prompt), r.scores, r.error))
        if len(batch) == 8192:
            writer.write(batch)
            batch = []
    writer.write(batch)
    writer.close()


def _child(kind: str, scores: str, output: str) -> dict:
    if kind == "to_shards":
        from ipiqa.runtime.results.select import Bound, Selection, write_selection  # noqa: F401

        s = write_selection(scores, None, Selection((Bound("quality", 0.5),)), to_shards=Path(output), shard_size=1000)
        return {"seconds": s.seconds, "kept": s.kept, "shards": s.shards.shards, "peak_rss_mib": _peak_rss_mib()}
    if kind == "report":
        from ipiqa.runtime.results.build import write_report

        r = write_report(scores, output)
        return {"seconds": r.seconds, "bytes": r.bytes, "rows": r.rows, "thumbnails": r.thumbnails,
                "peak_rss_mib": _peak_rss_mib()}
    from ipiqa.runtime.results.select import Selection, write_selection

    s = write_selection(scores, output, Selection(top_k=1, per="prompt"))
    return {"seconds": s.seconds, "rows": s.rows, "kept": s.kept, "peak_rss_mib": _peak_rss_mib()}


def _run_child(kind: str, scores: Path, output: Path) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); "
            "from benchmarks.report_bench import _child; print(json.dumps(_child(*sys.argv[1:])))")
    out = subprocess.run([sys.executable, "-c", code, kind, str(scores), str(output)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_report(workdir: Path, sizes: Sequence[int] = (200_000,), images: int = 32,
                   shard_samples: Optional[int] = None) -> dict:
    """For each size: the scores file's size, then ``write_report`` (time, page size, peak RSS) and
    ``write_selection --top-k 1 --per prompt`` (time, rows kept, peak RSS), each in a fresh process."""
    import numpy as np
    from PIL import Image

    workdir = Path(workdir)
    folder = workdir / "report-images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(images):
        p = folder / f"img{i:03d}.png"
        if not p.exists():
            arr = np.random.default_rng(i).integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
            Image.fromarray(arr).save(p)
        paths.append(str(p))
    results = []
    for n in sizes:
        scores = workdir / f"scores-{n}.csv"
        start = time.perf_counter()
        write_scores(scores, n, paths)
        written = time.perf_counter() - start
        folder = workdir / f"scores-{n}"
        if not folder.is_dir():
            write_set(folder, scores, n)
        for label, spec in (("one file", scores), (f"{SET_FILES} files", folder)):
            report = _run_child("report", spec, workdir / f"report-{n}.html")
            select = _run_child("select", spec, workdir / f"keep-{n}.csv")
            results.append({"rows": n, "input": label, "scores_mb": scores.stat().st_size / 1e6,
                            "write_scores_seconds": written,
                            "report_seconds": report["seconds"], "report_mb": report["bytes"] / 1e6,
                            "report_thumbnails": report["thumbnails"], "report_peak_rss_mib": report["peak_rss_mib"],
                            "select_seconds": select["seconds"], "select_kept": select["kept"],
                            "select_peak_rss_mib": select["peak_rss_mib"]})
    if shard_samples is None:  # scaled with the scores (the smoke run's 2,000 rows: 80 samples)
        shard_samples = max(16, min(SHARD_SAMPLES, max(sizes) // 25) // 16 * 16)
    shards = measure_to_shards(workdir / "to-shards", shard_samples)
    return {"sizes": results, "to_shards": shards, "markdown": report_table(results) + "\n\n" + to_shards_table(shards)}


def measure_to_shards(workdir: Path, samples: int = SHARD_SAMPLES, shards: int = 16) -> dict:
    """``select --min quality=0.5 --to-shards``: half of ``samples`` copied, every member plus KEY.scores.json."""
    import io
    import json
    import shutil
    import tarfile

    import numpy as np
    from PIL import Image

    from ipiqa.runtime.io import Result, ResultWriter, Row

    workdir = Path(workdir)
    src = workdir / "shards"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
    image = buf.getvalue()  # ~50 KB: a web image's size
    rows, per = [], samples // shards
    for s in range(shards):
        path = src / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(per):
                key = f"{s:05d}{i:05d}"
                for ext, data in (("jpg", image), ("txt", f"prompt {i}".encode()), ("json", json.dumps({"k": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                rows.append(Result(Row(f"{path}::{key}", f"prompt {i}"), (float(rng.random()), 0.5)))
    scores = workdir / "scores.csv"
    with ResultWriter(scores, ("quality", "alignment")) as writer:
        writer.write(rows)
    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    r = _run_child("to_shards", scores, out)
    source_mb = sum(p.stat().st_size for p in src.iterdir()) / 1e6
    written_mb = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    return {"samples": samples, "source_mb": source_mb, "kept": r["kept"], "written_mb": written_mb,
            "shards": r["shards"], "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"]}


def to_shards_table(r: dict) -> str:
    return "\n".join([
        "| select --to-shards | source shards | kept | written | time | read | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {r['samples']:,} samples, 16 shards, --min quality=0.5 | {r['source_mb']:.0f} MB | {r['kept']:,} "
        f"| {r['written_mb']:.0f} MB in {r['shards']} shards | {r['seconds']:.1f} s "
        f"| {r['source_mb'] / r['seconds']:.0f} MB/s | {r['peak_rss_mib']:.0f} MiB |"])


def report_table(results: Sequence[dict]) -> str:
    lines = ["| rows | read as | scores | report: time | page | peak RSS | select top-1 per prompt: time | kept | peak RSS |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r.get('input', 'one file')} | {r['scores_mb']:.1f} MB | {r['report_seconds']:.1f} s | {r['report_mb']:.2f} MB "
                     f"| {r['report_peak_rss_mib']:.0f} MiB | {r['select_seconds']:.1f} s | {r['select_kept']:,} "
                     f"| {r['select_peak_rss_mib']:.0f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - python -m benchmarks.report_bench [ROWS...]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = measure_report(Path(tmp), [int(a) for a in sys.argv[1:]] or (200_000,))
    print(out["markdown"])
