"""What the fixed engine batch costs (issue 28): the same backend with every engine call at ``CPU_ENGINE_BATCH``
(reproducible: a row's bits never depend on its batch) against the same backend running each requested batch
as one engine call (the variable batch of before), in one run, on the same inputs.

- engine: ``backend.score`` on a requested batch of 1 / 4 / 8 pre-decoded images (text embeddings given);
- end to end: ``Scorer.score_files`` over JPEG files at ``--batch`` 1 / 4 / 8 (decode, prompt cache, writer).

Each mode has its own backend on the same bundle (a session that alternated shapes would re-plan its memory at
every switch, a cost neither mode has in a real run); rounds alternate the two, so a shared machine's load
changes both alike, and each figure is the median round. Ratios are fixed / variable images per second (1.0:
free; below 1: what reproducibility costs). At requested batch 1 the two modes make identical calls: that row is
an A/A control, and its distance from 1.00 is the run's noise (on a shared 2-core machine, tens of percent).

Entry point: ``section(workdir, ...) -> dict`` (``markdown`` inside), meant to be registered as the
``fixed_batch`` section of ``python -m benchmarks``; ``python -m benchmarks.fixed_batch`` runs it alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

__all__ = ["section", "bundle_for"]

IMAGES_PER_PROMPT = 10


def bundle_for(workdir: Path, resolution: int, smoke: bool = False) -> Path:
    """An FP32 ONNX bundle of the seeded model at the real architecture (reduced in smoke): the main benchmark's
    when it is there, else exported once into ``workdir``."""
    for candidate in (Path(__file__).parent / ".work" / f"{'smoke' if smoke else 'rn50'}-{resolution}" / "bundle-single_query",
                      workdir / "bundle"):
        if (candidate / "manifest.json").is_file():
            return candidate
    from ipiqa.checkpoint import save_model
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import SMOKE_ARCH, demo_model
    from ipiqa.export.bundle_export import ExportOptions, export_bundle

    cfg = IPIQAConfig(resolution=resolution, **(SMOKE_ARCH if smoke else {}))
    model = demo_model(cfg)
    path = save_model(workdir / "model.safetensors", model.state_dict(), cfg)
    export_bundle(model, [path], workdir / "bundle", ExportOptions(onnx_only=True),
                  progress=lambda m: print(f"  {m}", file=sys.stderr))
    return workdir / "bundle"


def _alternating(run: Callable[[Any], float], scorers: dict[str, Any], rounds: int,
                 warm: Optional[Callable[[Any], Any]] = None) -> dict[str, float]:
    """Median seconds of ``run(scorer)`` for each mode's scorer, rounds interleaved, after one untimed ``warm``
    call each (default ``run``)."""
    for scorer in scorers.values():
        (warm or run)(scorer)  # a session's first call at a shape allocates
    times: dict[str, list[float]] = {mode: [] for mode in scorers}
    for _ in range(rounds):
        for mode, scorer in scorers.items():
            times[mode].append(run(scorer))
    return {mode: float(np.median(t)) for mode, t in times.items()}


def measure_engine(scorers: dict[str, Any], batches: Sequence[int], rounds: int) -> list[dict]:
    one = scorers["fixed"]
    cfg, rng = one.cfg, np.random.default_rng(0)
    text = one.cache.lookup(one.tokenizer(["a generated image"]), one.backend.encode_text) if cfg.text else None
    rows = []
    for batch in batches:
        images = rng.integers(0, 256, (batch, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
        emb = None if text is None else np.repeat(text, batch, axis=0)

        def run(scorer) -> float:
            t0 = time.perf_counter()
            scorer.backend.score(images, emb)
            return time.perf_counter() - t0

        sec = _alternating(run, scorers, rounds)
        rows.append(_row("engine", batch, sec, batch, one.backend.engine_batch))
        print(f"  engine batch {batch}: variable {batch / sec['variable']:.2f} img/s, fixed "
              f"{batch / sec['fixed']:.2f} img/s", file=sys.stderr)
    return rows


def _jpegs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i:05d}.jpg"
        if not p.exists():
            base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(base).resize((1024, 1024), Image.BICUBIC).save(p, quality=90)
        paths.append(p)
    return paths


def measure_end_to_end(scorers: dict[str, Any], workdir: Path, batches: Sequence[int], images: int,
                       rounds: int) -> list[dict]:
    from ipiqa.runtime.cpu import usable_cores
    from ipiqa.runtime.rows import Row

    paths = _jpegs(workdir / f"jpegs-{images}", images)
    rows = [Row(str(p), f"a generated image, prompt #{i // IMAGES_PER_PROMPT}") for i, p in enumerate(paths)]
    out = []
    for batch in batches:
        def run(scorer, rows=rows) -> float:
            summary = scorer.score_files(rows, output=workdir / "e2e.csv", batch_size=batch, workers=usable_cores())
            return summary.seconds

        sec = _alternating(run, scorers, rounds, warm=lambda scorer: run(scorer, rows[:batch]))
        out.append(_row("end to end", batch, sec, len(rows), scorers["fixed"].backend.engine_batch))
        print(f"  end to end --batch {batch}: variable {len(rows) / sec['variable']:.2f} img/s, fixed "
              f"{len(rows) / sec['fixed']:.2f} img/s", file=sys.stderr)
    return out


def _row(kind: str, batch: int, seconds: dict[str, float], images: int, fixed: int) -> dict:
    variable, fixed_rate = images / seconds["variable"], images / seconds["fixed"]
    return {"measure": kind, "requested_batch": batch, "engine_batch_fixed": fixed, "images": images,
            "variable_images_per_s": variable, "fixed_images_per_s": fixed_rate, "ratio": fixed_rate / variable}


def _markdown(info: dict, rows: list[dict]) -> str:
    lines = [f"### Fixed engine batch (reproducible scores): {info['backend']}, {info['machine']}",
             "", f"Every engine call at batch {rows[0]['engine_batch_fixed'] if rows else '?'} against each requested "
             "batch as one call; rounds interleaved, median round. At requested batch 1 both modes make the same "
             "calls: that row's distance from 1.00 is this run's noise.", "",
             "| measure | requested batch | variable img/s | fixed img/s | fixed / variable |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['measure']} | {r['requested_batch']} | {r['variable_images_per_s']:.2f} | "
                     f"{r['fixed_images_per_s']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def section(workdir: Path, resolution: int = 512, batches: Sequence[int] = (1, 4, 8), e2e_images: int = 8,
            rounds: int = 2, smoke: bool = False) -> dict:
    """Engine and end-to-end figures, fixed against variable, on ONNX Runtime FP32 on the CPU."""
    from ipiqa.runtime.cpu import cpu_flags, cpu_model
    from ipiqa.runtime.scorer import Scorer

    workdir.mkdir(parents=True, exist_ok=True)
    bundle = bundle_for(workdir, resolution, smoke)
    flags = sorted(cpu_flags() & {"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx2"})
    with Scorer(bundle, backend="onnxruntime", device="cpu") as fixed, \
            Scorer(bundle, backend="onnxruntime", device="cpu") as variable:
        variable.backend.fix_engine_batch(None)  # each requested batch as one engine call, as before issue 28
        scorers = {"variable": variable, "fixed": fixed}
        info = {"backend": fixed.backend.name, "machine": f"{cpu_model()} ({', '.join(flags)})",
                "resolution": fixed.resolution, "bundle": str(bundle)}
        rows = measure_engine(scorers, batches, rounds) + measure_end_to_end(scorers, workdir, batches, e2e_images,
                                                                             rounds)
    return {**info, "runs": rows, "markdown": _markdown(info, rows)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fixed_batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--e2e-images", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="reduced-width model, 224 px, 1 round, 4 images")
    p.add_argument("--workdir", type=Path, default=Path(__file__).parent / ".work" / "fixed_batch")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.resolution, args.rounds, args.e2e_images = 224, 1, 4
    result = section(args.workdir / f"{'smoke' if args.smoke else 'rn50'}-{args.resolution}", args.resolution,
                     [int(b) for b in args.batches.split(",")], args.e2e_images, args.rounds, args.smoke)
    print(result["markdown"])
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
