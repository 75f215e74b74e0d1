"""Part 3: throughput of the torch backend at FP16 (channels-last), batch 32 / 64 / 128, prompt cache on.

Engine-only: ``Scorer.score_arrays`` on decoded uint8 batches (host to device copy included), as
``python -m benchmarks`` times its rows. End to end: 1024 x 1024 JPEG files through ``Scorer.score_files``,
the CLI's own pipeline (``ipiqa score``: row rules, decode threads or ``--decode device``, writer), host and
device decode. Each rate is also given as a share of the GPU's FP16 dense peak (FLOPs per image counted from the
ONNX graphs, as the CPU benchmark counts them), and end to end as a share of engine-only at the same batch.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .context import Context
from .parts import FAIL, MEASURED, PartResult, progress

__all__ = ["DATASHEET_FP16_DENSE", "datasheet_peak", "e2e_files", "engine_rate", "part"]

PLANNING_FIGURE = 4500.0  # img/s, H100 FP16 engines: the README's planning figure (issue 13), never measured
# Dense FP16 tensor-core peaks from NVIDIA's datasheets (FLOP/s, no sparsity), by a piece of the device name.
DATASHEET_FP16_DENSE = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100 NVL", 835.0e12), ("H100", 989.4e12),
                        ("A100", 312.0e12), ("L40S", 362.05e12))


def datasheet_peak(name: str) -> Optional[float]:
    for key, peak in DATASHEET_FP16_DENSE:
        if key in name:
            return peak
    return None


def e2e_files(folder: Path, count: int, unique: int) -> list[Path]:
    """``count`` 1024 x 1024 JPEGs: ``unique`` generated ones (``benchmarks.host.make_jpegs``), the rest hard
    links to them (regular files, the same decode work; generating 1024 would take longer than scoring them)."""
    from ..host import make_jpegs

    sources = make_jpegs(folder / "src", 1024, unique)
    paths = []
    for i in range(count):
        p = folder / f"e2e-{i:05d}.jpg"
        if not p.exists():
            try:
                os.link(sources[i % unique], p)
            except OSError:
                p.write_bytes(sources[i % unique].read_bytes())
        paths.append(p)
    return paths


def _prompts(start: int, n: int) -> list[str]:
    from ..__main__ import IMAGES_PER_PROMPT

    return [f"a generated image, prompt #{(start + i) // IMAGES_PER_PROMPT}" for i in range(n)]


def engine_rate(scorer, batch: int, resolution: int, min_seconds: float, warmup: int = 2, iters: int = 5) -> dict:
    """Median seconds per ``score_arrays`` call on one random batch; new prompts every call (10 images each)."""
    images = np.random.default_rng(batch).integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    done = 0
    for _ in range(warmup):
        scorer.score_arrays(images, _prompts(done, batch))
        done += batch
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_seconds:
        prompts = _prompts(done, batch)
        t0 = time.perf_counter()
        scorer.score_arrays(images, prompts)  # returns host arrays: the device work is finished
        times.append(time.perf_counter() - t0)
        done += batch
    p50 = float(np.median(times))
    return {"p50_ms": p50 * 1e3, "iterations": len(times), "images_per_s": batch / p50}


def _e2e(scorer, paths: list[Path], batch: int, decode: str, workers: int, out: Path) -> dict:
    from ipiqa.runtime.cache import PromptCache
    from ipiqa.runtime.io import Row

    rows = [Row(str(p), prompt) for p, prompt in zip(paths, _prompts(0, len(paths)))]
    scorer.cache = PromptCache(16384)  # on, and cold: one text pass per 10 images
    summary = scorer.score_files(rows, output=out, batch_size=batch, workers=workers, decode=decode)
    return {"images_per_s": summary.rows / summary.seconds, "rows": summary.rows, "errors": summary.errors,
            "seconds": summary.seconds, "cache_hits": scorer.cache.hits, "cache_misses": scorer.cache.misses}


def part(ctx: Context) -> PartResult:
    import torch

    from ipiqa.runtime.scorer import Scorer

    from ..machine import measured_peak_flops

    s = ctx.settings
    cuda = s.device == "cuda"
    notes: list[str] = []
    try:
        flops = ctx.flops_per_image
    except Exception as exc:  # noqa: BLE001 - the rates stand without it; say why the shares are missing
        flops = None
        notes.append(f"FLOPs not counted ({type(exc).__name__}: {exc}): no % of peak")
    progress("throughput: measuring the matmul peak")
    measured = measured_peak_flops(s.device, 8192 if cuda else 1024, "float16" if cuda else "float32")
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    sheet = datasheet_peak(name) if cuda else None
    scorer = Scorer(ctx.model_path, backend="torch", device=s.device, fp16=s.fp16)
    rows: list[dict] = []
    engine: dict[int, float] = {}
    try:
        for batch in s.batches:
            r = engine_rate(scorer, batch, s.resolution, s.min_seconds)
            engine[batch] = r["images_per_s"]
            rows.append({"kind": "engine-only", "batch": batch, "decode": "-", **r, **_shares(r, flops, measured, sheet)})
            progress(f"throughput: engine-only batch {batch}: {r['images_per_s']:.1f} img/s")
        paths = e2e_files(s.workdir / "e2e-jpegs", s.e2e_images, s.e2e_unique)
        for decode in ("host", "device"):
            _e2e(scorer, paths[: 2 * max(s.batches)], max(s.batches), decode, s.workers, s.workdir / "warm.csv")
            for batch in s.batches:
                r = _e2e(scorer, paths, batch, decode, s.workers, s.workdir / f"e2e-{decode}-{batch}.csv")
                r["share_of_engine"] = r["images_per_s"] / engine[batch]
                rows.append({"kind": "end-to-end", "batch": batch, "decode": decode, **r,
                             **_shares(r, flops, measured, sheet)})
                progress(f"throughput: e2e {decode} decode batch {batch}: {r['images_per_s']:.1f} img/s "
                         f"({100 * r['share_of_engine']:.0f}% of engine-only)")
    finally:
        scorer.close()
    best_engine = max(rows[: len(s.batches)], key=lambda x: x["images_per_s"])
    best = {d: max((x for x in rows if x["decode"] == d), key=lambda x: x["images_per_s"]) for d in ("host", "device")}
    pct = (f", {best_engine['pct_measured_peak']:.1f}% of the measured {'FP16' if cuda else 'FP32 CPU'} matmul peak"
           + (f", {best_engine['pct_datasheet_peak']:.1f}% of the datasheet dense FP16 peak" if sheet else "")
           if flops else "")
    failed = [x for x in rows if x.get("errors")]
    figure = ("ERROR ROWS in " + ", ".join(f"e2e {x['decode']} batch {x['batch']} ({x['errors']})" for x in failed)
              + ": rates not valid; " if failed else "") + (f"engine-only {best_engine['images_per_s']:.0f} img/s at batch {best_engine['batch']}{pct}; e2e host "
              f"decode {best['host']['images_per_s']:.0f} img/s ({100 * best['host']['share_of_engine']:.0f}% of "
              f"engine), device decode {best['device']['images_per_s']:.0f} img/s "
              f"({100 * best['device']['share_of_engine']:.0f}%) ({s.workers} decode threads)")
    if not s.fp16:
        notes.append("dry run: FP32 on the CPU (FP16 needs CUDA); the figures only show that the code runs")
    notes.append(f"peak: measured {measured / 1e12:.3g} TFLOP/s ({'8192^3 FP16' if cuda else '1024^3 FP32'} torch matmul, "
                 f"best of 5)" + (f"; datasheet dense FP16 {sheet / 1e12:.1f} TFLOP/s ({name})" if sheet else ""))
    if flops:
        notes.append(f"FLOPs per image {flops['per_image'] / 1e9:.2f} G (image {flops['image_encoder'] / 1e9:.2f} + fusion "
                     f"{flops['fusion'] / 1e9:.3f} + text {flops['text_encoder'] / 1e9:.2f} / {flops['images_per_prompt']})")
    return PartResult("throughput", FAIL if failed else MEASURED,
                      f"none: a measurement (planning figure {PLANNING_FIGURE:.0f} img/s for H100 FP16 engines, "
                      "issue 13; never measured before)", figure, tuple(rows), tuple(notes),
                      extra={"flops": flops, "measured_peak_flops": measured, "datasheet_peak_flops": sheet,
                             "device_name": name})


def _shares(r: dict, flops: Optional[dict], measured: float, sheet: Optional[float]) -> dict:
    if not flops:
        return {}
    rate = flops["per_image"] * r["images_per_s"]
    return {"tflops": rate / 1e12, "pct_measured_peak": 100 * rate / measured,
            "pct_datasheet_peak": None if sheet is None else 100 * rate / sheet}
