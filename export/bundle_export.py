"""Model file -> bundle: three ONNX graphs, the parity gate, optional TensorRT engines, manifest.json.

Stages are reused when their inputs are unchanged (same model bytes, options, gate rule and library
versions) and the files still hash as recorded, so re-running an export is cheap and safe. The gate
(:mod:`.gate`) runs the bundle through the runtime's own backends before the manifest is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ipiqa import __version__
from ipiqa._optional import require
from ipiqa.bundle import BUNDLE_FORMAT, Manifest, read_bundle, sha256_file, write_manifest
from ipiqa.config import CLIP_MEAN, CLIP_STD
from ipiqa.errors import BundleError, IPIQAError
from ipiqa.model import IPIQA, pooling_mode
from ipiqa.preprocess import RESIZE_FILTER

from .gate import PARITY_PROMPTS, engine_parity, gate_inputs, onnx_parity
from .graphs import build_graphs, graph_specs
from .parity import ParityResult, ToleranceOverride, rule_record
from .to_onnx import DEFAULT_OPSET, export_onnx
from .trt import EngineSpec, build_engine, input_profiles

__all__ = ["ExportOptions", "ExportReport", "ParityGateError", "export_bundle", "onnx_parity", "engine_parity",
           "gate_inputs", "PARITY_PROMPTS"]
log = logging.getLogger(__name__)


class ParityGateError(IPIQAError):
    def __init__(self, results: Sequence[ParityResult]):
        self.results = list(results)
        failed = "\n".join(r.line() for r in self.results if not r)
        super().__init__(f"parity gate failed; the bundle was not written:\n{failed}")


@dataclass(frozen=True)
class ExportOptions:
    onnx_only: bool = False
    engine: EngineSpec = field(default_factory=lambda: EngineSpec("fp16", (1, 32, 128)))
    opset: int = DEFAULT_OPSET
    parity_images: int = 4  # FP32 gate inputs; the FP16 engine gate always uses 64
    single_query_pooling: bool = True  # the exact rewrite of both pools (issue 9); False exports the plain form
    tolerance_override: Optional[ToleranceOverride] = None  # --atol/--rtol: replaces the gate's rule; recorded


@dataclass
class ExportReport:
    bundle: Path
    parity: list[ParityResult]
    reused_onnx: bool = False
    reused_engines: bool = False


def _versions() -> dict[str, str]:
    out = {"ipiqa": __version__, "python": platform.python_version()}
    for dist in ("torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _tokenizer_files(root: Path) -> dict:
    from open_clip.tokenizer import default_bpe

    from ipiqa.runtime.tokenizer import ClipTokenizer

    src = Path(default_bpe())
    dst = root / "tokenizer" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    ClipTokenizer(dst).save(root / "tokenizer" / "tokenizer.json")  # HF tokenizers file: the runtime loads it as is
    return {"kind": "openai-clip-bpe", "files": {"bpe": f"tokenizer/{src.name}", "json": "tokenizer/tokenizer.json"},
            "context_length": 77,
            "sot_id": 49406, "eot_id": 49407, "pad_id": 0,
            "cleaning": "ftfy.fix_text, html.unescape twice, strip, collapse whitespace, lowercase",
            "reference": "open_clip.tokenizer.SimpleTokenizer"}


def _existing(root: Path) -> Optional[Manifest]:
    try:
        return read_bundle(root)
    except BundleError:
        return None


def export_bundle(model: IPIQA, source_files: Sequence[Path], out: Path, options: ExportOptions = ExportOptions(),
                  progress: Callable[[str], None] = log.info) -> ExportReport:
    """Write (or refresh) the bundle in ``out``; raises ParityGateError without writing a manifest on failure."""
    model = model.eval().float()
    cfg = model.cfg
    if not options.onnx_only:  # fail before minutes of ONNX work, not after
        try:
            require("tensorrt", extra="tensorrt")
        except IPIQAError as exc:
            raise IPIQAError(f"{exc}; or pass --onnx-only to write the ONNX bundle without engines") from None
        if not torch.cuda.is_available():
            raise IPIQAError("TensorRT engines need a CUDA GPU; on this machine export with --onnx-only")
    override = options.tolerance_override
    if override is not None:
        log.warning("parity tolerance overridden by %s: every check passes at atol + rtol x scale instead of "
                    "max(fixed, k x floor); the override is recorded in %s", override.describe(), out / "manifest.json")
    out.mkdir(parents=True, exist_ok=True)
    versions = _versions()
    rule = rule_record(override)  # a changed gate rule or override re-runs the gate
    onnx_key = _key([sha256_file(p) for p in source_files], options.opset, options.single_query_pooling, rule, versions)
    previous = _existing(out)
    specs = graph_specs(model)
    graphs = build_graphs(model)
    files = {name: f"{name}.onnx" for name in graphs}
    report = ExportReport(out, [])

    reuse = previous is not None and previous.data.get("source", {}).get("onnx_key") == onnx_key
    if reuse:
        progress("ONNX graphs unchanged (same model, options and versions): reused")
        report.reused_onnx = True
        report.parity = [ParityResult.from_dict(r) for r in previous.data["parity"]["onnx"]]
        tokenizer = previous.data["tokenizer"]
    else:
        (out / "manifest.json").unlink(missing_ok=True)  # the old manifest would describe files we overwrite
        x = gate_inputs(cfg, 2)
        with torch.no_grad():
            fmap, emb = model.encode_image(x.model_images)
            text = model.encode_text(x.model_tokens) if cfg.text else None
        examples = {"image_encoder": (torch.from_numpy(x.image),), "text_encoder": (torch.from_numpy(x.tokens),),
                    "fusion": (fmap, emb, text) if cfg.text else (emb,)}
        with pooling_mode(model, options.single_query_pooling):  # traced into the graphs; caller's mode kept
            for name, module in graphs.items():
                start = time.perf_counter()
                export_onnx(module, examples[name], out / files[name], specs[name].inputs, specs[name].outputs, cfg,
                            options.opset)
                progress(f"exported {name}.onnx ({time.perf_counter() - start:.1f}s)")
        tokenizer = _tokenizer_files(out)

    shapes = {"image": (None, cfg.resolution, cfg.resolution, 3), "tokens": (None, cfg.context_length),
              "feature_map": (None, cfg.feature_dim, cfg.grid, cfg.grid), "image_embedding": (None, cfg.embed_dim),
              "text_embedding": (None, cfg.embed_dim)}
    data: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "config": cfg.to_dict(),
        "outputs": list(cfg.outputs),
        "preprocess": {"resolution": cfg.resolution, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                       "resize": RESIZE_FILTER, "convert": "RGB", "layout": "NHWC", "dtype": "uint8",
                       "normalize": "in the image graph: x / 255, then (x - mean) / std, float32"},
        "tokenizer": tokenizer,
        "onnx": {"opset": options.opset, "precision": "fp32",
                 "pooling": "single_query" if options.single_query_pooling else "exact",
                 "graphs": {n: {"file": files[n], "inputs": list(specs[n].inputs), "outputs": list(specs[n].outputs)}
                            for n in files}},
        "shapes": {k: list(v) for k, v in shapes.items()},
        "precision": "fp32",
        "engines": None,
        "versions": versions,
        "source": {"files": [str(p) for p in source_files], "onnx_key": onnx_key},
    }
    if not reuse:  # the manifest about to be written, read by the runtime's own backend
        report.parity = _gate(onnx_parity(model, Manifest(out, data), options.parity_images, override), progress)

    if not options.onnx_only:
        data["engines"] = _engines(model, out, data, files, specs, shapes, options, onnx_key, previous, report,
                                   progress)
        data["precision"] = options.engine.precision

    listed = [*files.values()] + [f + ".data" for f in files.values()] + list(tokenizer["files"].values())
    if data["engines"]:
        listed += [g["file"] for g in data["engines"]["graphs"].values()]
    data["parity"] = {"onnx": [r.to_dict() for r in report.parity if not r.name.startswith("engines")],
                      "engines": [r.to_dict() for r in report.parity if r.name.startswith("engines")],
                      "rule": rule}
    data["files"] = listed
    write_manifest(out, data)
    return report


def _gate(results: list[ParityResult], progress: Callable[[str], None]) -> list[ParityResult]:
    """One line per check; any failure stops the export before a manifest exists."""
    for r in results:
        progress(r.line())
    if not all(results):
        raise ParityGateError(results)
    return results


def _engines(model: IPIQA, out: Path, data: dict[str, Any], files, specs, shapes, options: ExportOptions,
             onnx_key: str, previous: Optional[Manifest], report: ExportReport,
             progress: Callable[[str], None]) -> dict[str, Any]:
    trt = require("tensorrt", extra="tensorrt")
    spec = options.engine
    gpu = torch.cuda.get_device_name()
    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    engine_key = _key(onnx_key, spec.precision, spec.batch, spec.workspace_gib, trt.__version__, gpu, cc)
    old = previous.data.get("engines") if previous else None
    if old and old.get("key") == engine_key:
        progress("TensorRT engines unchanged: reused")
        report.reused_engines = True
        report.parity += [ParityResult.from_dict(r) for r in previous.data["parity"]["engines"]]
        return old
    (out / "engines").mkdir(exist_ok=True)
    entry = {"tensorrt": trt.__version__, "gpu": gpu, "compute_capability": cc, "precision": spec.precision,
             "batch": list(spec.batch), "workspace_gib": spec.workspace_gib, "key": engine_key, "graphs": {}}
    for name, onnx_file in files.items():
        start = time.perf_counter()
        profiles = input_profiles({i: shapes[i] for i in specs[name].inputs}, spec.batch)
        blob = build_engine(out / onnx_file, profiles, spec, timing_cache=out / "engines" / "timing.cache")
        rel = f"engines/{name}.{spec.precision}.plan"
        (out / rel).write_bytes(blob)
        entry["graphs"][name] = {"file": rel}
        progress(f"built {rel} ({time.perf_counter() - start:.1f}s)")
    manifest = Manifest(out, {**data, "engines": entry, "precision": spec.precision})
    report.parity += _gate(engine_parity(model, manifest, override=options.tolerance_override), progress)
    return entry
