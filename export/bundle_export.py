"""Model file -> bundle: three ONNX graphs, the parity gate, optional TensorRT engines, manifest.json.

Stages are reused when their inputs are unchanged (same model bytes, options and library versions) and
the files still hash as recorded, so re-running an export is cheap and safe.
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
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ipiqa import __version__
from ipiqa._optional import require
from ipiqa.bundle import BUNDLE_FORMAT, Manifest, read_bundle, sha256_file, write_manifest
from ipiqa.config import CLIP_MEAN, CLIP_STD
from ipiqa.errors import BundleError, IPIQAError
from ipiqa.model import IPIQA, exact_pooling, pooling_mode, tokenize
from ipiqa.preprocess import RESIZE_FILTER

from .graphs import build_graphs, graph_specs
from .parity import ParityResult, compare
from .to_onnx import DEFAULT_OPSET, export_onnx
from .trt import EngineSpec, TorchEngineRunner, build_engine, input_profiles

__all__ = ["ExportOptions", "ExportReport", "ParityGateError", "export_bundle", "onnx_parity", "engine_parity",
           "gate_inputs", "PARITY_PROMPTS"]
log = logging.getLogger(__name__)

PARITY_PROMPTS = (
    "",  # empty prompt: [SOT, EOT]
    "a photo of a cat wearing a tiny hat",
    " ".join(["highly detailed fantasy landscape with castles"] * 30),  # ~200 words: truncation at 77
    "日本の桜、水彩画 — café &amp; émoji 🎨",  # CJK, HTML entity, emoji
)


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


def gate_inputs(model: IPIQA, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded images (already normalized scale) and tokens cycling through the adversarial prompts."""
    r = model.cfg.resolution
    images = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, r, r), dtype=np.float32))
    prompts = [PARITY_PROMPTS[i % len(PARITY_PROMPTS)] + ("" if i < len(PARITY_PROMPTS) else f" {i}") for i in range(n)]
    return images, tokenize(prompts, model.cfg.context_length)


def _ort_session(path: Path):
    ort = require("onnxruntime", extra="export")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@torch.no_grad()
def onnx_parity(model: IPIQA, graph_paths: dict[str, Path], n: int = 4) -> list[ParityResult]:
    """Each graph against the PyTorch module on the same inputs, then the three composed end to end."""
    model = model.eval()
    images, tokens = gate_inputs(model, n)
    with exact_pooling(model):  # the reference is always the straightforward (authors') computation
        fmap, emb = model.encode_image(images)
        text = model.encode_text(tokens) if model.cfg.text else None  # open_clip's forward: checks the wrapper
        scores = model.fuse(fmap, emb, text)
        e2e = model(images, tokens if model.cfg.text else None)
    run = {name: _ort_session(p) for name, p in graph_paths.items()}
    fmap_o, emb_o = run["image_encoder"].run(None, {"image": images.numpy()})
    results = [compare("image_encoder/feature_map", fmap.numpy(), fmap_o),
               compare("image_encoder/image_embedding", emb.numpy(), emb_o)]
    feeds, composed = {"image_embedding": emb.numpy()}, {"image_embedding": emb_o}
    if model.cfg.text:
        (text_o,) = run["text_encoder"].run(None, {"tokens": tokens.numpy()})
        results.append(compare("text_encoder/text_embedding", text.numpy(), text_o))
        feeds.update(feature_map=fmap.numpy(), text_embedding=text.numpy())
        composed.update(feature_map=fmap_o, text_embedding=text_o)
    (scores_o,) = run["fusion"].run(None, feeds)
    results.append(compare("fusion/scores", scores.numpy(), scores_o, scores=True))
    (e2e_o,) = run["fusion"].run(None, composed)
    results.append(compare("end_to_end/scores", e2e.numpy(), e2e_o, scores=True))
    return results


@torch.no_grad()
def engine_parity(model: IPIQA, engines: dict[str, bytes], precision: str, n: int = 64, batch: int = 16) -> list[ParityResult]:
    """The engines composed on the GPU against the FP32 PyTorch reference, over ``n`` generated inputs."""
    model = model.eval().cuda()
    runners = {name: TorchEngineRunner(blob) for name, blob in engines.items()}
    images, tokens = gate_inputs(model, n, seed=1)
    ref, out = [], []
    for i in range(0, n, batch):
        x, t = images[i:i + batch].cuda(), tokens[i:i + batch].cuda()
        with exact_pooling(model):
            ref.append(model(x, t if model.cfg.text else None).float().cpu())
        img = runners["image_encoder"](image=x)
        feeds = {"image_embedding": img["image_embedding"]}
        if model.cfg.text:
            feeds.update(feature_map=img["feature_map"], **runners["text_encoder"](tokens=t))
        out.append(runners["fusion"](**feeds)["scores"].float().cpu())
    fp16 = precision == "fp16"
    return [compare(f"engines[{precision}]/scores", torch.cat(ref).numpy(), torch.cat(out).numpy(), scores=True, fp16=fp16)]


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
    out.mkdir(parents=True, exist_ok=True)
    versions = _versions()
    onnx_key = _key([sha256_file(p) for p in source_files], options.opset, options.single_query_pooling, versions)
    previous = _existing(out)
    specs = graph_specs(model)
    graphs = build_graphs(model)
    files = {name: f"{name}.onnx" for name in graphs}
    report = ExportReport(out, [])

    if previous and previous.data.get("source", {}).get("onnx_key") == onnx_key:
        progress("ONNX graphs unchanged (same model, options and versions): reused")
        report.reused_onnx = True
        report.parity = [ParityResult(**{k: v for k, v in r.items() if k != "passed"}) for r in previous.data["parity"]["onnx"]]
        tokenizer = previous.data["tokenizer"]
    else:
        (out / "manifest.json").unlink(missing_ok=True)  # the old manifest would describe files we overwrite
        images, tokens = gate_inputs(model, 2)
        with torch.no_grad():
            fmap, emb = model.encode_image(images)
            text = model.encode_text(tokens) if cfg.text else None
        examples = {"image_encoder": (images,), "text_encoder": (tokens,),
                    "fusion": (fmap, emb, text) if cfg.text else (emb,)}
        with pooling_mode(model, options.single_query_pooling):  # traced into the graphs; caller's mode kept
            for name, module in graphs.items():
                start = time.perf_counter()
                export_onnx(module, examples[name], out / files[name], specs[name].inputs, specs[name].outputs, cfg,
                            options.opset)
                progress(f"exported {name}.onnx ({time.perf_counter() - start:.1f}s)")
        tokenizer = _tokenizer_files(out)
        report.parity = onnx_parity(model, {n: out / f for n, f in files.items()}, options.parity_images)
        for r in report.parity:
            progress(r.line())
        if not all(report.parity):
            raise ParityGateError(report.parity)

    shapes = {"image": (None, 3, cfg.resolution, cfg.resolution), "tokens": (None, cfg.context_length),
              "feature_map": (None, cfg.feature_dim, cfg.grid, cfg.grid), "image_embedding": (None, cfg.embed_dim),
              "text_embedding": (None, cfg.embed_dim)}
    engines_entry = None
    if not options.onnx_only:
        engines_entry = _engines(model, out, files, specs, shapes, options.engine, onnx_key, previous, report, progress)

    listed = [*files.values()] + [f + ".data" for f in files.values()] + list(tokenizer["files"].values())
    if engines_entry:
        listed += [g["file"] for g in engines_entry["graphs"].values()]
    manifest = {
        "format": BUNDLE_FORMAT,
        "config": cfg.to_dict(),
        "outputs": list(cfg.outputs),
        "preprocess": {"resolution": cfg.resolution, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                       "resize": RESIZE_FILTER, "convert": "RGB", "layout": "NCHW", "scale": "1/255"},
        "tokenizer": tokenizer,
        "onnx": {"opset": options.opset, "precision": "fp32",
                 "pooling": "single_query" if options.single_query_pooling else "exact",
                 "graphs": {n: {"file": files[n], "inputs": list(specs[n].inputs), "outputs": list(specs[n].outputs)}
                            for n in files}},
        "shapes": {k: list(v) for k, v in shapes.items()},
        "precision": options.engine.precision if engines_entry else "fp32",
        "engines": engines_entry,
        "versions": versions,
        "source": {"files": [str(p) for p in source_files], "onnx_key": onnx_key},
        "parity": {"onnx": [r.to_dict() for r in report.parity if not r.name.startswith("engines")],
                   "engines": [r.to_dict() for r in report.parity if r.name.startswith("engines")]},
        "files": listed,
    }
    write_manifest(out, manifest)
    return report


def _engines(model, out, files, specs, shapes, spec: EngineSpec, onnx_key, previous, report, progress):
    trt = require("tensorrt", extra="tensorrt")
    gpu = torch.cuda.get_device_name()
    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    engine_key = _key(onnx_key, spec.precision, spec.batch, spec.workspace_gib, trt.__version__, gpu, cc)
    old = previous.data.get("engines") if previous else None
    if old and old.get("key") == engine_key:
        progress("TensorRT engines unchanged: reused")
        report.reused_engines = True
        report.parity += [ParityResult(**{k: v for k, v in r.items() if k != "passed"}) for r in previous.data["parity"]["engines"]]
        return old
    (out / "engines").mkdir(exist_ok=True)
    blobs, entry = {}, {"tensorrt": trt.__version__, "gpu": gpu, "compute_capability": cc, "precision": spec.precision,
                        "batch": list(spec.batch), "workspace_gib": spec.workspace_gib, "key": engine_key, "graphs": {}}
    for name, onnx_file in files.items():
        start = time.perf_counter()
        profiles = input_profiles({i: shapes[i] for i in specs[name].inputs}, spec.batch)
        blob, pinned = build_engine(out / onnx_file, profiles, spec, timing_cache=out / "engines" / "timing.cache")
        rel = f"engines/{name}.{spec.precision}.plan"
        (out / rel).write_bytes(blob)
        blobs[name] = blob
        entry["graphs"][name] = {"file": rel, "fp32_layers": pinned}
        progress(f"built {rel} ({time.perf_counter() - start:.1f}s, {len(pinned)} layers pinned to FP32)")
    results = engine_parity(model, blobs, spec.precision)
    for r in results:
        progress(r.line())
    report.parity += results
    if not all(results):
        raise ParityGateError(results)
    return entry
