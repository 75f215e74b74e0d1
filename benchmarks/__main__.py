"""``python -m benchmarks``: latency and throughput of every backend against the PyTorch reference, in one run.

The anchor, ``reference-eager-fp32``, runs the model the way the authors' code does: FP32, one eager
graph, straightforward pooling, and the prompt tokenized and encoded again for every image. Every
other row is measured on the same inputs in the same process, and its speedup is a ratio to the
anchor at the same batch. Backends that cannot run here are listed with the reason, never estimated.
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ipiqa.demo import SMOKE_ARCH
from ipiqa.errors import IPIQAError
from ipiqa.runtime.cpu import usable_cores

from .auto_check import AUTO_ROW, auto_reason, check_auto
from .auto_check import markdown as auto_markdown
from .flops import graph_flops
from .machine import machine_info, machine_slug, measured_peak_flops
from .prompt_mix import DEFAULT_MIXES, parse_mixes, prompt_for, prompt_source, text_share
from .report import write_report

IMAGES_PER_PROMPT = 10  # AGIQA-3k: 2,982 images of 300 prompts (the default mix; --images-per-prompt)
# Every row the benchmark cannot measure says why, starting with one of these (the spec's guarantee).
NOT_AVAILABLE, SKIPPED = "not available on this machine: ", "skipped"
NOTE_PREFIXES = (NOT_AVAILABLE, SKIPPED)


def _args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batches", default=None, help="comma list (default: 1,4,8 on CPU; 1,8,32,64,128 on GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per backend and batch")
    p.add_argument("--iters", type=int, default=5, help="minimum timed iterations")
    p.add_argument("--min-seconds", type=float, default=3.0, help="keep timing until this much time has passed")
    p.add_argument("--e2e-images", type=int, default=40, help="JPEG files (1024x1024) for the end-to-end run")
    p.add_argument("--e2e-batch", type=int, default=4)
    p.add_argument("--images-per-prompt", default=DEFAULT_MIXES,
                   help="comma list of prompt mixes for the engine and end-to-end rows, each measured in full "
                        "(default 10, AGIQA-3k's mix; 1,4,10 adds AIGCQA-20k's every-prompt-new case and best-of-N, "
                        "at 3x the engine section's time): a new prompt every N images, so at 1 the text encoder "
                        "runs for every image")
    p.add_argument("--skip", default="", help="comma list of backends to leave out (e.g. torch-compile)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--workdir", type=Path, default=Path(__file__).parent / ".work", help="exported bundles are cached here")
    p.add_argument("--sections", default="engine,host,jobs",
                   help="comma list: engine (every backend engine-only, then end to end), host (decode + resize per "
                        "core, thread vs process pools, the fast path), jobs (memory and resume time against rows), "
                        "export (INT8 export peak memory against calibration images; opt-in), report (ipiqa report "
                        "and select on --report-rows; opt-in), shards (host rows/s from WebDataset shards and Parquet "
                        "against loose files, memory against shard count; opt-in), serve (ipiqa serve requests/s, "
                        "p50/p99 at 1/4/16 clients vs the same backend locally; needs ipiqa[serve]; opt-in), "
                        "overhead (batch 1: the image graph alone against Scorer.score_arrays, paired; opt-in), "
                        "fixed_batch (one engine batch against free batches, engine and end to end; opt-in)")
    p.add_argument("--report-rows", default="200000", help="scores-file sizes (rows) for the report section")
    p.add_argument("--host-sources", default="512,1024,2048", help="JPEG sides for the host section")
    p.add_argument("--host-images", type=int, default=16, help="JPEGs per source size in the host section")
    p.add_argument("--jobs-rows", default="50000,200000", help="job sizes (rows) for the jobs section")
    p.add_argument("--api-images", default="16,64,256", help="list lengths for Scorer.score in the jobs section")
    p.add_argument("--export-sizes", default="8,16,32,64",
                   help="calibration sizes for the export section (INT8 export peak RSS; ~8 min at RN50-512 on 2 "
                        "cores, so not a default section): quantize at each, the exclusion path at the smallest and "
                        "largest, the whole export with its gate forced to fail at the largest")
    p.add_argument("--export-bundle", type=Path, default=None,
                   help="FP32 bundle for the export section (default: the seeded model exported at --resolution)")
    p.add_argument("--smoke", action="store_true", help="CI: reduced-width model, 224 px, batch 1-2, 2 iterations")
    args = p.parse_args(argv)
    try:
        args.mixes = parse_mixes(args.images_per_prompt)
    except IPIQAError as exc:
        p.error(str(exc))
    if args.smoke:
        args.resolution, args.batches, args.warmup, args.iters, args.min_seconds = 224, "1,2", 1, 2, 0.0
        args.e2e_images, args.e2e_batch = 4, 2
        args.host_sources, args.host_images, args.jobs_rows, args.api_images = "256,512", 2, "500,2000", "8,32"
        args.export_sizes, args.report_rows = "2,4", "2000"
        args.skip = ",".join(filter(None, [args.skip, "torch-compile"]))
    return args


def _timed(fn: Callable, images: np.ndarray, prompts_for: Callable[[int], list], warmup: int, iters: int,
           min_seconds: float) -> list[float]:
    for i in range(warmup):
        fn(images, prompts_for(i))
    times: list[float] = []
    start = time.perf_counter()
    i = warmup
    while len(times) < iters or time.perf_counter() - start < min_seconds:
        prompts = prompts_for(i)
        t0 = time.perf_counter()
        fn(images, prompts)
        times.append(time.perf_counter() - t0)
        i += 1
    return times


def _setup(args, cuda: bool):
    """Seeded model at the real architecture (reduced in smoke) and its two bundles (rewrite on / off)."""

    from ipiqa.checkpoint import save_model
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import demo_model
    from ipiqa.export.bundle_export import ExportOptions, Int8Options, export_bundle

    from .host import make_jpegs

    cfg = IPIQAConfig(resolution=args.resolution, **(SMOKE_ARCH if args.smoke else {}))
    work = args.workdir / f"{'smoke' if args.smoke else 'rn50'}-{args.resolution}"
    model = demo_model(cfg)
    model_path = save_model(work / "model.safetensors", model.state_dict(), cfg)
    calibration = work / "calibration"
    make_jpegs(calibration, 512, 16 if args.smoke else 48, seed=11)  # smooth generated images, never the timed ones
    int8 = Int8Options(calibration, size=8 if args.smoke else 32)
    bundles = {}
    bf16 = _bf16_available() is None  # the BF16 gate runs (and BF16 rows exist) only where BF16 runs natively
    for name, single in (("single_query", True), ("straightforward", False)):
        # The text graphs' gates read every dataset prompt (minutes at full size): not in the smoke run.
        options = ExportOptions(onnx_only=True, single_query_pooling=single, int8=int8 if single else None,
                                bf16=bf16 and single, int8_text=single and not args.smoke,
                                bf16_text=bf16 and single and not args.smoke)
        export_bundle(model, [model_path], work / f"bundle-{name}", options, progress=lambda m: print(f"  {m}", file=sys.stderr))
        bundles[name] = work / f"bundle-{name}"
    return cfg, model, model_path, bundles


def _bf16_available() -> Optional[str]:
    """None where the OpenVINO BF16 rows can run, else why not (the row's note)."""
    import importlib.util

    from ipiqa.runtime.cpu import BF16_FLAGS, bf16_flags, describe

    if importlib.util.find_spec("openvino") is None:
        return NOT_AVAILABLE + "openvino not installed (pip install 'ipiqa[openvino]')"
    if bf16_flags():
        return None
    return NOT_AVAILABLE + f"no BF16 on this CPU ({describe()}: none of {', '.join(BF16_FLAGS)})"


def _openvino_int8_quantizer(bundle) -> str:
    """Which INT8 image graph OpenVINO serves, from the manifest: NNCF's IR, or the QDQ graph (and why)."""
    from ipiqa.bundle import read_bundle
    from ipiqa.errors import IPIQAError

    try:
        int8 = read_bundle(bundle, verify_hashes=False).onnx.int8.get("cpu")
    except IPIQAError as exc:
        return f"bundle unreadable: {exc}"
    record = (int8.openvino or {}) if int8 else {}
    if int8 is None or not int8.openvino_passed:
        return "no passing OpenVINO INT8 gate"
    if int8.openvino_file:
        return f"{record.get('quantizer', 'nncf')} IR, {len(record.get('settings', {}).get('ignored', ()))} layers FP32"
    return f"the QDQ graph; NNCF: {record.get('nncf', 'not recorded')}"


def _runners(args, cfg, model, model_path, bundles, cuda: bool) -> dict[str, tuple[Optional[Callable], str, Optional[object]]]:
    """name -> (fn(images, prompts), note, owner with cache/close) ; fn None = not available, note says why."""
    import torch

    from ipiqa.model import straightforward_pooling, normalize_pixels, tokenize
    from ipiqa.runtime.scorer import Scorer

    device = "cuda" if cuda else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    out: dict = {}
    ref_model = model.to(device).eval()

    def reference(images, prompts):
        with torch.inference_mode(), straightforward_pooling(ref_model):  # authors' way: prompt re-encoded per image
            pixels = normalize_pixels(torch.from_numpy(images).to(device))  # the host's float work, on the device
            return ref_model(pixels, tokenize(prompts).to(device)).cpu()

    out["reference-eager-fp32"] = (reference, "FP32 eager, straightforward pools, prompt encoded per image", None)

    def scorer_runner(name, source, note, **kw):
        if name in skip:
            out[name] = (None, SKIPPED + " (--skip)", None)
            return
        try:
            s = Scorer(source, **kw)
        except Exception as exc:  # noqa: BLE001 - the reason goes into the table
            out[name] = (None, (NOT_AVAILABLE + str(exc)).split("; ")[0][:120], None)
            return
        out[name] = (s.score_arrays, f"{note}; backend {s.backend.name}", s)

    if cuda:
        scorer_runner("torch-fp16", model_path, "FP16 channels-last, single-query pools, prompt cache",
                      backend="torch", device="cuda", fp16=True)
        scorer_runner("torch-compile", model_path, "FP16, torch.compile reduce-overhead (CUDA graphs)",
                      backend="torch", device="cuda", fp16=True, compile=True)
    else:
        out["torch-fp16"] = (None, NOT_AVAILABLE + "FP16 needs CUDA", None)
        scorer_runner("torch-compile", model_path, "FP32 torch.compile, single-query pools, prompt cache",
                      backend="torch", device="cpu", compile=True)
    scorer_runner("runtime-torch-fp32", model_path, "runtime torch backend, single-query pools, prompt cache",
                  backend="torch", device=device)
    scorer_runner("onnxruntime-cpu", bundles["single_query"], "single-query pools, prompt cache",
                  backend="onnxruntime", device="cpu")
    scorer_runner("onnxruntime-cpu-int8", bundles["single_query"], "INT8 image graph (QDQ U8S8 per-channel, "
                  "reduce_range, calibrated and gated at export), INT8 text graph where its per-prompt gate passed (the "
                  "backend name says +text-int8), FP32 fusion, prompt cache",
                  backend="onnxruntime", device="cpu", precision="int8")
    scorer_runner("openvino-cpu", bundles["single_query"], "OpenVINO FP32 (f32 hint), single-query pools, prompt cache",
                  backend="openvino", device="cpu", precision="fp32")
    bf16_missing = _bf16_available()
    if bf16_missing:
        out["openvino-cpu-bf16"] = (None, bf16_missing, None)
    else:
        scorer_runner("openvino-cpu-bf16", bundles["single_query"], "OpenVINO BF16 image + fusion graphs, BF16 "
                      "gate passed at export; text graph BF16 where its per-prompt gate passed (the backend name says "
                      "+text-bf16), else FP32; prompt cache", backend="openvino", device="cpu",
                      precision="bf16")
    scorer_runner("openvino-cpu-int8", bundles["single_query"], f"OpenVINO INT8 image graph ({_openvino_int8_quantizer(bundles['single_query'])}), "
                  "FP32 fusion, text graph BF16 where its per-prompt gate passed and the CPU has BF16 (+text-bf16), "
                  "else FP32; prompt cache", backend="openvino", device="cpu", precision="int8")
    if cuda:
        out[AUTO_ROW] = (None, SKIPPED + " (the CPU auto rule is measured on CPU runs)", None)
    else:
        scorer_runner(AUTO_ROW, bundles["single_query"], "Scorer(bundle, precision='auto') on CPU: "
                      "cpu_auto_choice's pick", device="cpu", precision="auto")
    scorer_runner("onnxruntime-cpu-straightforward-pools", bundles["straightforward"], "pools as written (before issue 9), prompt cache",
                  backend="onnxruntime", device="cpu")
    if cuda:
        scorer_runner("onnxruntime-gpu", bundles["single_query"], "CUDA/TensorRT EP", backend="onnxruntime", device="cuda")
        scorer_runner("tensorrt", bundles["single_query"], "TensorRT engines", backend="tensorrt", device="cuda")
    else:
        out["onnxruntime-gpu"] = (None, NOT_AVAILABLE + "no GPU", None)
        out["tensorrt"] = (None, NOT_AVAILABLE + "no GPU, tensorrt not installable here", None)
    return out


def _flops(bundles) -> dict:
    table = {}
    for graph in ("image_encoder", "text_encoder", "fusion"):
        table[graph] = {"single_query": graph_flops(bundles["single_query"] / f"{graph}.onnx"),
                        "straightforward": graph_flops(bundles["straightforward"] / f"{graph}.onnx")}
    return table


def _per_image_flops(flops: dict, backend: str, images_per_prompt: int) -> float:
    if backend == "reference-eager-fp32":
        return sum(v["straightforward"] for v in flops.values())  # text encoded for every image
    pools = "straightforward" if "straightforward" in backend else "single_query"
    return (flops["image_encoder"][pools] + flops["fusion"][pools]
            + flops["text_encoder"][pools] * text_share(images_per_prompt))  # one text pass per prompt


def _end_to_end(args, runners, engine_rate: dict, workdir: Path) -> list[dict]:
    """JPEG files (1024x1024, like AGIQA-3k) -> scores through the runtime pipeline, prompt cache on and off,
    at each prompt mix (``--images-per-prompt``)."""
    results = []
    for mix in args.mixes:
        results += _end_to_end_mix(args, runners, engine_rate, workdir, mix)
    return results


def _end_to_end_mix(args, runners, engine_rate: dict, workdir: Path, mix: int) -> list[dict]:
    from PIL import Image

    from ipiqa.runtime.cache import PromptCache
    from ipiqa.runtime.io import Row

    folder = workdir / f"jpegs-{args.e2e_images}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(args.e2e_images):
        p = folder / f"img{i:05d}.jpg"
        if not p.exists():
            base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # smooth-ish content, realistic JPEG size
            Image.fromarray(base).resize((1024, 1024), Image.BICUBIC).save(p, quality=90)
        paths.append(p)
    rows = [Row(str(p), prompt_for(i, mix, f"e2e {mix} per prompt")) for i, p in enumerate(paths)]
    results = []
    for name in (AUTO_ROW, "onnxruntime-cpu", "onnxruntime-cpu-int8", "openvino-cpu", "openvino-cpu-bf16",
                 "openvino-cpu-int8", "onnxruntime-gpu", "tensorrt", "torch-fp16"):
        fn, _, scorer = runners.get(name, (None, "", None))
        if fn is None:
            continue
        for label, cache in (("prompt cache on", None), ("prompt cache off", 1)):
            scorer.cache = PromptCache(cache or 16384)
            ordered = rows if cache is None else [rows[i] for i in rng.permutation(len(rows))]
            summary = scorer.score_files(ordered, output=workdir / "e2e.csv", batch_size=args.e2e_batch,
                                         workers=usable_cores())
            rate = summary.rows / summary.seconds
            engine = engine_rate.get((name, args.e2e_batch, mix))
            results.append({"name": f"{name}, {label}", "backend": name, "picked": scorer.backend.name,
                            "images_per_prompt": mix, "batch": args.e2e_batch, "images": summary.rows,
                            "images_per_s": rate, "fraction_of_engine": rate / engine if engine else None,
                            "cache_hits": scorer.cache.hits, "cache_misses": scorer.cache.misses})
            print(f"  e2e {results[-1]['name']}, {mix}/prompt: {rate:.2f} img/s", file=sys.stderr)
    return results


def _engine_section(args, cuda: bool, info: dict) -> dict:
    """Every backend engine-only against the reference, then end to end and the fast path's score deviation."""
    import torch

    batches = [int(b) for b in (args.batches or ("1,8,32,64,128" if cuda else "1,4,8")).split(",")]
    cfg, model, model_path, bundles = _setup(args, cuda)
    flops = _flops(bundles)
    peak = measured_peak_flops("cuda" if cuda else "cpu", 8192 if cuda else 2048, "float16" if cuda else "float32")
    runners = _runners(args, cfg, model, model_path, bundles, cuda)
    rng = np.random.default_rng(0)
    runs, engine_rate = [], {}
    for mix, batch in ((m, b) for m in args.mixes for b in batches):
        images = rng.integers(0, 256, (batch, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
        anchor = None
        for name, (fn, note, owner) in runners.items():
            row = {"backend": name, "batch": batch, "images_per_prompt": mix, "note": note}
            if name == AUTO_ROW and owner is not None:
                row["picked"] = owner.backend.name
            if fn is not None:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                counter = iter(range(10**9))

                def prompts_for(_i, batch=batch, counter=counter, run=f"{mix} per prompt, batch {batch}"):
                    return [prompt_for(next(counter), mix, run) for _ in range(batch)]

                cache = getattr(owner, "cache", None)
                before = (cache.hits, cache.misses) if cache is not None else None
                times = _timed(fn, images, prompts_for, args.warmup, args.iters, args.min_seconds)
                if before is not None:  # what the mix did to the prompt cache (warmup included)
                    row.update(prompt_cache_hits=cache.hits - before[0], prompt_cache_misses=cache.misses - before[1])
                p50 = float(np.median(times))
                row.update(p50_ms=p50 * 1e3, p99_ms=float(np.percentile(times, 99)) * 1e3, iterations=len(times),
                           images_per_s=batch / p50, gflop_per_image=_per_image_flops(flops, name, mix) / 1e9)
                row["peak_fraction_pct"] = 100 * row["gflop_per_image"] * 1e9 * row["images_per_s"] / peak
                row["peak_memory_mib"] = (torch.cuda.max_memory_allocated() / 2**20 if cuda and name.startswith(("torch", "reference", "runtime-torch"))
                                          else None if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                if name == "reference-eager-fp32":
                    anchor = row["images_per_s"]
                row["speedup"] = row["images_per_s"] / anchor if anchor else None
                engine_rate[(name, batch, mix)] = row["images_per_s"]
                print(f"  {name:<28} {mix:>2}/prompt batch {batch:>4}: {row['images_per_s']:8.2f} img/s  p50 {row['p50_ms']:8.1f} ms"
                      f"  x{row['speedup'] or 0:.2f}", file=sys.stderr)
            runs.append(row)
            gc.collect()
    if args.e2e_batch not in batches:
        print(f"  note: --e2e-batch {args.e2e_batch} was not timed engine-only; no ratio", file=sys.stderr)
    e2e = _end_to_end(args, runners, engine_rate, args.workdir)
    fast = _fast_path_scores(args, runners)
    checks = check_auto(runs)
    reason = _auto_reason(bundles["single_query"]) if runners[AUTO_ROW][0] is not None else ""
    print(auto_markdown(checks, reason), file=sys.stderr)
    for _, _, owner in runners.values():
        if owner is not None:
            owner.close()
    best = max((v for (name, _, _), v in engine_rate.items() if name != "reference-eager-fp32"), default=None)
    return {"resolution": cfg.resolution, "runs": runs, "end_to_end": e2e, "flops": flops, "peak_gflops": peak / 1e9,
            "peak_note": f"torch {'FP16 8192^3 on GPU' if cuda else 'FP32 2048^3 on CPU'}, best of 5",
            "fast_path_scores": fast, "best_engine_images_per_s": best,
            "auto_check": [asdict(c) for c in checks], "auto_reason": reason}


def _auto_reason(bundle: Path) -> str:
    from ipiqa.bundle import read_bundle
    from ipiqa.runtime.cpu import cpu_flags

    return auto_reason(read_bundle(bundle), cpu_flags())


def _fast_path_scores(args, runners) -> Optional[dict]:
    """Scores of the opt-in fast decode (``load_resized(fast=True)``) against the exact path, same model."""
    from ipiqa.export.parity import spearman
    from ipiqa.preprocess import load_resized

    from .host import make_jpegs

    fn, _, scorer = runners.get("onnxruntime-cpu", (None, "", None))
    if fn is None:
        return None
    sides = [int(v) for v in args.host_sources.split(",")]
    paths = make_jpegs(args.workdir / "fast-jpegs", max(sides), max(8, args.e2e_images // 2))
    r = scorer.resolution
    prompts = [f"a generated image, prompt #{i // IMAGES_PER_PROMPT}" for i in range(len(paths))]
    exact = fn(np.stack([load_resized(p, r) for p in paths]), prompts)
    fast = fn(np.stack([load_resized(p, r, fast=True) for p in paths]), prompts)
    rho = [spearman(exact[:, j], fast[:, j]) for j in range(exact.shape[1])]
    spread = float(np.ptp(exact))
    return {"source": max(sides), "images": len(paths), "max_abs_score_diff": float(np.abs(exact - fast).max()),
            "spearman_min": float(min(rho)), "score_spread": spread,
            "note": "untrained weights: scores barely spread, so the Spearman here says little; max |d| is the figure"}


def _host_section(args, best_engine: Optional[float]) -> dict:
    from . import host

    sources = tuple(int(v) for v in args.host_sources.split(","))
    report = host.run(resolution=args.resolution, sources=sources, images=args.host_images,
                      repeats=2 if args.smoke else 5, scaling_source=sources[len(sources) // 2])
    print(host.markdown(report), file=sys.stderr)
    rate = {s: report.rate(s, "uint8 exact") for s in sources}
    targets = {"this run's fastest backend (engine-only)": best_engine,
               "H100 FP16 engines, planning figure (issue 13; not measured here)": 4500.0}
    cores = [{"engine": label, "engine_images_per_s": v, "source": s, "per_core": rate[s],
              "cores_needed": v / rate[s] if v and rate[s] else None} for label, v in targets.items() for s in sources]
    return {"report": asdict(report), "markdown": host.markdown(report), "cores_needed": cores}


def _jobs_section(args) -> dict:
    from ipiqa.checkpoint import save_model
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import demo_model
    from ipiqa.export.bundle_export import ExportOptions, export_bundle

    from .jobs import api_table, jobs_table, measure_api, measure_jobs

    cfg = IPIQAConfig(resolution=64, **SMOKE_ARCH)  # no image is decoded: the model's size does not matter
    work = args.workdir / "jobs"
    model = demo_model(cfg)
    path = save_model(work / "model.safetensors", model.state_dict(), cfg)
    export_bundle(model, [path], work / "bundle", ExportOptions(onnx_only=True), progress=lambda m: None)
    results = measure_jobs(work / "bundle", [int(v) for v in args.jobs_rows.split(",")], work)
    # Scorer.score on lists of real images: a reduced-width model at the real resolution, so a whole-list forward
    # (what the API did before it ran in batches) would show as memory growing with the list.
    api_cfg = IPIQAConfig(resolution=args.resolution, **SMOKE_ARCH)
    api_model = demo_model(api_cfg)
    api_path = save_model(work / "api-model.safetensors", api_model.state_dict(), api_cfg)
    export_bundle(api_model, [api_path], work / "api-bundle", ExportOptions(onnx_only=True), progress=lambda m: None)
    api = measure_api(work / "api-bundle", api_cfg.resolution, [int(v) for v in args.api_images.split(",")], work)
    return {"rows": [asdict(r) for r in results], "markdown": jobs_table(results),
            "api": [asdict(r) for r in api], "api_markdown": api_table(api), "api_resolution": api_cfg.resolution}


def _export_section(args) -> dict:
    from .export_memory import runs_for, section

    sizes = sorted(int(v) for v in args.export_sizes.split(","))
    work = args.workdir / f"export-{'smoke' if args.smoke else 'rn50'}-{args.resolution}"
    bundle = args.export_bundle
    if bundle is None:
        from ipiqa.checkpoint import save_model
        from ipiqa.config import IPIQAConfig
        from ipiqa.demo import demo_model
        from ipiqa.export.bundle_export import ExportOptions, export_bundle

        cfg = IPIQAConfig(resolution=args.resolution, **(SMOKE_ARCH if args.smoke else {}))
        model = demo_model(cfg)
        path = save_model(work / "model.safetensors", model.state_dict(), cfg)
        bundle = work / "bundle"
        export_bundle(model, [path], bundle, ExportOptions(onnx_only=True), progress=lambda m: None)
    runs = runs_for(sizes, sorted({sizes[0], sizes[-1]}), [sizes[-1]])
    return section(bundle, runs, work, held_out=4 if args.smoke else 16)


def _overhead_section(args) -> dict:
    """Batch 1: each CPU backend's image graph alone against ``Scorer.score_arrays`` (``benchmarks/overhead.py``),
    on the engine section's single-query bundle (exported once, then reused)."""
    from ipiqa.bundle import read_bundle

    from .overhead import section

    bundle = _setup(args, cuda=False)[3]["single_query"]
    runs = [("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    if read_bundle(bundle).onnx.int8["cpu"].openvino_passed:
        runs.append(("openvino", "int8"))
    return section(bundle, runs, seconds=0.5 if args.smoke else 6.0)


def main(argv=None) -> int:
    args = _args(argv)
    import torch

    sections = set(filter(None, args.sections.split(",")))
    known = ("engine", "host", "jobs", "export", "report", "shards", "serve", "overhead", "fixed_batch")
    unknown = sections - set(known)
    if unknown:
        raise SystemExit(f"unknown --sections {sorted(unknown)}; choose from {', '.join(known)}")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    torch.set_num_threads(usable_cores())
    info = machine_info()
    print(f"machine: {info['cpu']} x{info['cores']}, GPU: {info['gpu'].get('name', 'none')}", file=sys.stderr)
    results: dict = {"resolution": args.resolution, "images_per_prompt": list(args.mixes), "runs": [],
                     "sections": sorted(sections)}
    if "engine" in sections:
        results.update(_engine_section(args, cuda, info))
    if "host" in sections:
        results["host"] = _host_section(args, results.get("best_engine_images_per_s"))
    if "jobs" in sections:
        results["jobs"] = _jobs_section(args)
    if "export" in sections:
        results["export"] = _export_section(args)
    if "shards" in sections:
        from .shards import section as shards_section

        results["shards"] = shards_section(args.workdir / "shards", resolution=args.resolution,
                                           images=16 if args.smoke else 64, repeats=1 if args.smoke else 3,
                                           shard_counts=(1, 2) if args.smoke else (2, 8, 32))
        print(results["shards"]["markdown"], file=sys.stderr)
    if "serve" in sections:
        from .serve import section as serve_section

        results["serve"] = serve_section(args.workdir / "serve", requests_per_client=4 if args.smoke else 16)
        print(results["serve"]["markdown"], file=sys.stderr)
    if "overhead" in sections:
        results["overhead"] = _overhead_section(args)
        print(results["overhead"]["markdown"], file=sys.stderr)
    if "fixed_batch" in sections:
        from .fixed_batch import section as fixed_batch_section

        results["fixed_batch"] = fixed_batch_section(args.workdir / "fixed_batch", resolution=args.resolution,
                                                     e2e_images=4 if args.smoke else 8, rounds=1 if args.smoke else 2,
                                                     smoke=args.smoke)
        print(results["fixed_batch"]["markdown"], file=sys.stderr)
    if "report" in sections:
        from .report_bench import measure_report

        results["report"] = measure_report(args.workdir, [int(v) for v in args.report_rows.split(",")])
    info["slug"] = slug = machine_slug(info) + ("-smoke" if args.smoke else "")
    results.update(slug=slug, machine=info, timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   smoke=args.smoke, command=" ".join(["python -m benchmarks", *(argv or sys.argv[1:])]),
                   prompt_source=prompt_source())
    written = write_report(results, args.out / slug)
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
