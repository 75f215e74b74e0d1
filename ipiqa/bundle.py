"""The export bundle's manifest: what the runtime needs to score, and what it must check before it does.

A bundle is one folder: ``manifest.json``, three ONNX graphs (weights in ``.onnx.data`` beside each, so
no 2 GB protobuf limit and a cheap metadata read), optional TensorRT engines, and the tokenizer files.
The manifest itself is the typed ``ipiqa.manifest.Manifest``; this module reads, writes and checks it.
Torch-free: the runtime reads this module.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .config import IPIQAConfig
from .errors import BundleError
from .manifest import (BUNDLE_FORMAT, FORMAT_CHANGES, GRAPHS, PRECISIONS, Manifest, ManifestError,
                       check_batch_profile, io_shapes)
from .rebuild import REBUILD, rebuild_command

__all__ = ["BUNDLE_FORMAT", "GRAPHS", "PRECISIONS", "Manifest", "sha256_file", "read_bundle", "write_manifest",
           "check_graph_metadata", "embedded_config", "check_engine_compat", "parse_batch_profile", "rebuild_command"]

METADATA_CONFIG_KEY = "ipiqa.config"
METADATA_PRECISION_KEY = "ipiqa.precision"  # written into FP16 and INT8 graphs (export.fp16, export.int8)


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_batch_profile(text: str) -> tuple[int, int, int]:
    """'1,32,128' -> (1, 32, 128): the (min, opt, max) batch of TensorRT optimization profiles."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"batch profile must be three integers MIN,OPT,MAX, got {text!r}") from None
    return check_batch_profile(values)


def write_manifest(manifest: Manifest) -> Path:
    """Write ``manifest.json`` with the SHA-256 of every file it lists (computed here, never passed in)."""
    root = manifest.root
    manifest = manifest.replace(files={rel: sha256_file(root / rel) for rel in sorted(manifest.files)})
    path = root / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    tmp.replace(path)  # atomic: a half-written manifest never looks valid
    return path


def read_bundle(root: Union[str, Path], verify_hashes: bool = True, ipiqa_version: Optional[str] = None) -> Manifest:
    """Read and check a bundle: format, every key of the manifest, every file's hash, and the ipiqa version."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{root}: no manifest.json; not an ipiqa bundle ({REBUILD})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc}); {REBUILD}") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt != BUNDLE_FORMAT:
        change = f" ({FORMAT_CHANGES[fmt]})" if fmt in FORMAT_CHANGES else ""
        raise BundleError(f"{path}: bundle format {fmt!r}, this ipiqa reads {BUNDLE_FORMAT!r}{change}; {REBUILD}")
    try:
        manifest = Manifest.from_dict(data, root)
    except ManifestError as exc:
        what = "invalid model config" if exc.key.split(".")[0] == "config" else "invalid manifest"
        raise BundleError(f"{path}: {what}: key {exc.key!r} {exc.problem}; {REBUILD}") from None
    if ipiqa_version is None:
        from . import __version__ as ipiqa_version
    built = manifest.versions["ipiqa"]
    if built.split(".")[:2] != ipiqa_version.split(".")[:2]:
        raise BundleError(f"{path}: built by ipiqa {built or '?'}, this is ipiqa {ipiqa_version}; {REBUILD}")
    if verify_hashes:
        for rel, digest in manifest.files.items():
            f = root / rel
            if not f.is_file():
                raise BundleError(f"{f}: listed in the manifest but missing; {REBUILD}")
            if sha256_file(f) != digest:
                raise BundleError(f"{f}: SHA-256 does not match the manifest (file changed or corrupt); {REBUILD}")
    return manifest


def embedded_config(metadata: Mapping[str, Mapping[str, str]]) -> IPIQAConfig:
    """The config a graph set embeds (``{graph: metadata}``): each graph carries it, and all must agree.

    What a backend reads when no manifest describes the set yet (the export's gates)."""
    configs = {name: m.get(METADATA_CONFIG_KEY) for name, m in metadata.items()}
    missing = sorted(name for name, c in configs.items() if c is None)
    if missing:
        raise BundleError(f"graphs {missing} carry no ipiqa config (not exported by ipiqa-export)")
    distinct = {IPIQAConfig.from_json(c) for c in configs.values()}
    if len(distinct) != 1:
        raise BundleError(f"the graphs were exported for different configs: {sorted(set(configs.values()))}")
    return distinct.pop()


def check_graph_metadata(manifest: Manifest, name: str, metadata: Mapping[str, str],
                         input_shapes: Mapping[str, Sequence[Any]], precision: str = "fp32",
                         int8_text: bool = False, runtime: str = "onnxruntime") -> None:
    """Refuse a graph whose embedded config, precision or input shape disagrees with the manifest.

    ``precision``: the graph set it was loaded from (``Manifest.graph_path``); the graph's own
    ``ipiqa.precision`` metadata (absent: fp32) must agree, so a swapped file cannot pass as another set.
    ``int8_text``: the caller serves the gated INT8 text graph (``Manifest.graph_precision``); ``runtime``: whose
    graph set (OpenVINO may serve its own INT8 image graph).
    """
    path = manifest.graph_path(name, precision, int8_text, runtime)
    embedded = metadata.get(METADATA_CONFIG_KEY)
    if embedded is None:
        raise BundleError(f"{path}: graph carries no ipiqa config; {REBUILD}")
    if IPIQAConfig.from_json(embedded) != manifest.config:
        raise BundleError(f"{path}: graph was exported for another config than the "
                          f"manifest says ({embedded} vs {manifest.config.to_json()}); {REBUILD}")
    expected = manifest.graph_precision(name, precision, int8_text)
    if metadata.get(METADATA_PRECISION_KEY, "fp32") != expected:
        raise BundleError(f"{path}: graph is {metadata.get(METADATA_PRECISION_KEY, 'fp32')}, the manifest lists it "
                          f"as {expected}; {REBUILD}")
    if name == "image_encoder":
        r = manifest.config.resolution
        shape = list(input_shapes.get("image", []))
        if shape[1:] != list(io_shapes(manifest.config)["image"][0][1:]):
            raise BundleError(f"{path}: image input is {shape}, expected (batch, {r}, {r}, 3) uint8; {REBUILD}")


def check_engine_compat(manifest: Manifest, tensorrt_version: str, gpu_name: str, compute_capability: str) -> None:
    """TensorRT engines only run with the TensorRT version and GPU architecture that built them."""
    engines = manifest.engines
    if engines is None:
        raise BundleError(f"{manifest.root}: bundle has no TensorRT engines (exported with --onnx-only); "
                          f"rebuild with: {rebuild_command('fp16', engines=True)}")
    if engines.tensorrt != tensorrt_version:
        raise BundleError(f"{manifest.root}: engines built with TensorRT {engines.tensorrt}, this machine "
                          f"has {tensorrt_version}; {REBUILD}")
    if engines.compute_capability != compute_capability:
        raise BundleError(f"{manifest.root}: engines built for {engines.gpu} (sm {engines.compute_capability}), "
                          f"this GPU is {gpu_name} (sm {compute_capability}); {REBUILD} on this machine")
