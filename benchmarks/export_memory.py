"""INT8 export memory: peak resident memory against the number of calibration images.

Each (path, size) runs in a fresh process (so its peak RSS is that run's alone, read from VmHWM) on the
bundle's FP32 image graph, with generated calibration images preprocessed exactly as at scoring time
(``calibration_batches``, batches of 8 as the bundle export reads them):

- ``quantize``: ``quantize_image_graph`` (calibration, then the QDQ graph written), the first step of every
  ``--int8`` export;
- ``exclusion``: the same, then the layer ranking the gate falls back on when it fails (``_sensitive_nodes``
  on the same images): the step that kept every activation of every image before;
- ``export``: ``quantize_and_gate`` end to end with held-out images, its first gate forced to fail (a
  failing row is added to the real gate's table), so it ranks, excludes the worst layer, re-quantizes
  and re-gates: the whole exclusion path of an export.

``python -m benchmarks.export_memory [--bundle DIR]`` writes ``export.md`` and ``export.json`` under
``benchmarks/results/<machine>/``; ``python -m benchmarks --sections export`` puts the same rows in the
combined results.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["ExportMemoryResult", "measure_export", "export_table", "PATHS"]

PATHS = ("quantize", "exclusion", "export")


@dataclass(frozen=True)
class ExportMemoryResult:
    path: str  # quantize | exclusion | export
    images: int  # calibration images actually used
    peak_rss_mib: float  # the process's peak resident memory, interpreter, models and onnxruntime included
    seconds: float  # the measured steps, image decoding excluded
    phases: dict = field(default_factory=dict)  # step -> seconds
    note: str = ""


def _child(spec: dict) -> dict:
    import numpy as np

    from ipiqa.export import int8

    from .jobs import _peak_rss_mib

    fp32, work, r, size = spec["graphs"], Path(spec["work"]), spec["resolution"], spec["size"]
    files = sorted(Path(spec["calibration"]).glob("*.jpg"))
    batches = list(int8.calibration_batches(files, r, size))
    n = sum(len(b) for b in batches)
    out, phases, note = work / f"{spec['path']}-{size}" / "image_encoder.int8.onnx", {}, ""
    start = time.perf_counter()
    if spec["path"] in ("quantize", "exclusion"):
        settings = int8.quantize_image_graph(Path(fp32["image_encoder"]), out, batches, "cpu", calibration_size=size)
        phases["quantize"] = time.perf_counter() - start
        if spec["path"] == "exclusion":
            t = time.perf_counter()
            ranked = int8._sensitive_nodes(Path(fp32["image_encoder"]), out, batches, settings.op_types)
            phases["rank layers"] = time.perf_counter() - t
            note = f"{len(ranked)} layers ranked, worst {ranked[0]}"
    else:
        from ipiqa.model import tokenize

        held = np.stack([int8.image_input(p, r) for p in sorted(Path(spec["held_out"]).glob("*.jpg"))])
        tokens = tokenize([f"a generated image, prompt #{i}" for i in range(len(held))], spec["context_length"]).numpy()
        real_gate, calls = int8.int8_gate, []

        def gate(*a, **k):  # the first gate fails (a failing row added to the real table); the rest are real
            t = time.perf_counter()
            g = real_gate(*a, **k)
            calls.append(time.perf_counter() - t)
            if len(calls) == 1:
                forced = int8.RankResult("benchmark: gate forced to fail", float("inf"), None, int8.INT8_SPEARMAN)
                g = int8.Int8Gate(g.settings, (forced, *g.results), g.held_out)
            return g

        int8.int8_gate = gate
        result = int8.quantize_and_gate({k: Path(v) for k, v in fp32.items()}, out, batches, held, tokens, "cpu",
                                        spec["columns"], calibration_size=size)
        phases["gates"] = sum(calls)
        note = (f"{len(held)} held out; gate forced to fail once, then: "
                f"{'; '.join(result.attempts[1:])}")
    seconds = time.perf_counter() - start
    return {"path": spec["path"], "images": n, "peak_rss_mib": _peak_rss_mib(), "seconds": seconds,
            "phases": {k: round(v, 1) for k, v in phases.items()}, "note": note}


def measure_export(graphs: Mapping[str, Path], resolution: int, runs: Sequence[tuple[str, int]], workdir: Path,
                   context_length: int = 77, columns: Sequence[str] = (), held_out: int = 16) -> list[ExportMemoryResult]:
    """One fresh process per (path, size), run one after another (never two large exports at once)."""
    from .host import make_jpegs

    workdir.mkdir(parents=True, exist_ok=True)
    calibration, held = workdir / "calibration", workdir / "held-out"
    make_jpegs(calibration, 512, max(n for _, n in runs), seed=11)
    make_jpegs(held, 512, held_out, seed=12)  # other seed: never calibration images
    results = []
    for path, size in runs:
        if path not in PATHS:
            raise ValueError(f"export memory path must be one of {', '.join(PATHS)}, got {path!r}")
        spec = {"path": path, "size": size, "graphs": {k: str(v) for k, v in graphs.items()}, "resolution": resolution,
                "calibration": str(calibration), "held_out": str(held), "work": str(workdir / "out"),
                "context_length": context_length, "columns": list(columns)}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.export_memory", "--child", json.dumps(spec)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"export memory run {path} x{size} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        results.append(ExportMemoryResult(**json.loads(proc.stdout.strip().splitlines()[-1])))
        r = results[-1]
        print(f"  export {path:<9} {r.images:>3} images: peak {r.peak_rss_mib:,.0f} MiB, {r.seconds:.0f} s", file=sys.stderr)
    return results


def export_table(results: Sequence[ExportMemoryResult]) -> str:
    """Markdown: one row per run, with the growth over the same path's smallest calibration set."""
    base: dict[str, ExportMemoryResult] = {}
    for r in results:
        if r.path not in base or r.images < base[r.path].images:
            base[r.path] = r
    lines = ["| path | calibration images | peak RSS (MiB) | growth over fewest images (MiB) | seconds | steps (s) | note |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in results:
        steps = ", ".join(f"{k} {v:.1f}" for k, v in r.phases.items())
        lines.append(f"| {r.path} | {r.images} | {r.peak_rss_mib:,.0f} | {r.peak_rss_mib - base[r.path].peak_rss_mib:+,.0f} | "
                     f"{r.seconds:.1f} | {steps} | {r.note} |")
    return "\n".join(lines)


def runs_for(sizes: Sequence[int], exclusion: Sequence[int], export: Sequence[int]) -> list[tuple[str, int]]:
    return [("quantize", n) for n in sizes] + [("exclusion", n) for n in exclusion] + [("export", n) for n in export]


def section(bundle: Path, runs: Sequence[tuple[str, int]], workdir: Path, held_out: int = 16) -> dict:
    """The ``export`` section's results: rows and their table, for a bundle's FP32 graphs at its resolution."""
    cfg = json.loads((bundle / "manifest.json").read_text())["config"]
    resolution = cfg["resolution"]
    graphs = {g: bundle / f"{g}.onnx" for g in ("image_encoder", "text_encoder", "fusion") if (bundle / f"{g}.onnx").exists()}
    results = measure_export(graphs, resolution, runs, workdir, cfg.get("context_length", 77), cfg.get("outputs", ()),
                             held_out)
    return {"resolution": resolution, "bundle": str(bundle), "rows": [asdict(r) for r in results],
            "markdown": export_table(results)}


def _markdown(report: dict) -> str:
    info = report["machine"]
    return "\n".join([
        f"# INT8 export memory: {report['slug']}", "",
        f"CPU: {info['cpu']} ({info['cores']} cores) · onnxruntime {info['versions'].get('onnxruntime', '?')} · "
        f"image graph {report['export']['bundle']} at {report['export']['resolution']} px · {report['timestamp']}", "",
        report["export"]["markdown"], "",
        "Peak RSS per run, each in a fresh process (VmHWM). quantize: calibration (one image per run, ranges merged "
        "run by run) and the QDQ graph written. exclusion: the same, then every quantized layer ranked by the SQNR "
        "of the activation it reads (one image per run, two sums per activation). export: quantize_and_gate end to "
        "end, first gate forced to fail: ranking, one layer excluded, re-quantized, re-gated.", "",
        f"Command: `{report['command']}`", ""])


def main(argv=None) -> int:
    from .machine import machine_info, machine_slug

    p = argparse.ArgumentParser(prog="python -m benchmarks.export_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path, default=Path("ipiqa-demo/bundle"), help="an FP32 ONNX bundle (ipiqa demo)")
    p.add_argument("--sizes", default="8,16,32,64", help="calibration sizes for the quantize path")
    p.add_argument("--exclusion-sizes", default="8,64", help="calibration sizes for the exclusion path")
    p.add_argument("--export-sizes", default="64", help="calibration sizes for the whole export, gate forced to fail")
    p.add_argument("--held-out", type=int, default=16, help="held-out images for the export path's gates")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--workdir", type=Path, default=Path(__file__).parent / ".work" / "export-memory")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    runs = runs_for(ints(args.sizes), ints(args.exclusion_sizes), ints(args.export_sizes))
    info = machine_info()
    report = {"export": section(args.bundle, runs, args.workdir, args.held_out),
              "machine": info, "slug": machine_slug(info),
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m benchmarks.export_memory", *(argv if argv is not None else sys.argv[1:])])}
    out = args.out / report["slug"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "export.md").write_text(_markdown(report))
    print(out / "export.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
