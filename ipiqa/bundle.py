"""The export bundle's manifest: what the runtime needs to score, and what it must check before it does.

A bundle is one folder: ``manifest.json``, three ONNX graphs (weights in ``.onnx.data`` beside each, so
no 2 GB protobuf limit and a cheap metadata read), optional TensorRT engines, and the tokenizer files.
Torch-free: the runtime reads this module.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .config import IPIQAConfig
from .errors import BundleError

__all__ = ["BUNDLE_FORMAT", "GRAPHS", "PRECISIONS", "Manifest", "sha256_file", "read_bundle", "write_manifest",
           "check_graph_metadata", "check_engine_compat", "parse_batch_profile", "rebuild_command"]

# 2: the image graph takes uint8 (B, R, R, 3) and normalizes inside. Format 1 bundles (float32 NCHW input) are
# refused with the rebuild command rather than served: one input layout, one host path.
BUNDLE_FORMAT = "ipiqa-bundle/2"
GRAPHS = ("image_encoder", "text_encoder", "fusion")
METADATA_CONFIG_KEY = "ipiqa.config"
METADATA_PRECISION_KEY = "ipiqa.precision"  # written into FP16 and INT8 graphs (export.fp16, export.int8)
REBUILD = "rebuild it with: ipiqa-export MODEL.safetensors -o BUNDLE"
PRECISIONS = ("fp32", "fp16", "int8")


def rebuild_command(precision: str, engines: bool = False) -> str:
    """The export command that writes graphs (``engines``: TensorRT engines) of ``precision``."""
    if precision == "int8":
        tail = "--int8 --calibration IMAGES.csv|DIR"
    elif precision == "fp16":
        tail = "--fp16" if engines else "--onnx-only --fp16-onnx"
    else:
        tail = "--fp32"
    if precision == "int8" and not engines:
        tail = "--onnx-only " + tail
    return f"ipiqa-export MODEL.safetensors -o BUNDLE {tail}"


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
    if len(values) != 3:
        raise ValueError(f"batch profile must be three integers MIN,OPT,MAX, got {text!r}")
    lo, opt, hi = values
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch profile needs 1 <= MIN <= OPT <= MAX, got {text!r}")
    return lo, opt, hi


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: Mapping[str, Any]

    @property
    def config(self) -> IPIQAConfig:
        return IPIQAConfig.from_dict(self.data["config"])

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.data["config"]["outputs"])

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def onnx_precisions(self) -> tuple[str, ...]:
        """The ONNX graph sets this bundle holds: fp32 always; fp16 (``fp16/``) and int8 (the CPU INT8 image
        graph, served with the FP32 text and fusion graphs) when exported."""
        onnx = self.data["onnx"]
        return ("fp32", *(("fp16",) if onnx.get("fp16") else ()),
                *(("int8",) if (onnx.get("int8") or {}).get("cpu") else ()))

    @property
    def engine_precision(self) -> Optional[str]:
        engines = self.data.get("engines")
        return engines["precision"] if engines else None

    def graph_path(self, name: str, precision: str = "fp32") -> Path:
        """The ONNX graph ``name`` of the ``precision`` set (int8: the CPU INT8 image graph, FP32 otherwise)."""
        onnx = self.data["onnx"]
        if precision not in self.onnx_precisions:
            raise BundleError(f"{self.root}: this bundle has no {precision} ONNX graphs (it has "
                              f"{', '.join(self.onnx_precisions)}); rebuild it with: {rebuild_command(precision)}")
        if precision == "fp16":
            return self.root / onnx["fp16"]["graphs"][name]["file"]
        if precision == "int8" and name == "image_encoder":
            return self.root / onnx["int8"]["cpu"]["file"]
        return self.root / onnx["graphs"][name]["file"]

    def engine_path(self, name: str) -> Optional[Path]:
        engine = self.data.get("engines", {}).get("graphs", {}).get(name)
        return self.root / engine["file"] if engine else None


def write_manifest(root: Path, data: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` with the SHA-256 of every file it lists (computed here, never passed in)."""
    data = dict(data)
    data["format"] = BUNDLE_FORMAT
    data["files"] = {rel: sha256_file(root / rel) for rel in sorted(data["files"])}
    path = root / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a half-written manifest never looks valid
    return path


def read_bundle(root: Union[str, Path], verify_hashes: bool = True, ipiqa_version: Optional[str] = None) -> Manifest:
    """Read and check a bundle: format, config, every file's hash, and the ipiqa version that wrote it."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{root}: no manifest.json; not an ipiqa bundle ({REBUILD})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc}); {REBUILD}") from None
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: bundle format {data.get('format')!r}, this ipiqa reads {BUNDLE_FORMAT!r}; {REBUILD}")
    try:
        IPIQAConfig.from_dict(data["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: invalid model config ({exc}); {REBUILD}") from None
    if ipiqa_version is None:
        from . import __version__ as ipiqa_version
    built = data.get("versions", {}).get("ipiqa", "")
    if built.split(".")[:2] != ipiqa_version.split(".")[:2]:
        raise BundleError(f"{path}: built by ipiqa {built or '?'}, this is ipiqa {ipiqa_version}; {REBUILD}")
    needed = GRAPHS if data["config"].get("text", True) else ("image_encoder", "fusion")
    missing = [g for g in needed if g not in data.get("onnx", {}).get("graphs", {})]
    if missing:
        raise BundleError(f"{path}: graphs {missing} not listed; {REBUILD}")
    if verify_hashes:
        for rel, digest in data.get("files", {}).items():
            f = root / rel
            if not f.is_file():
                raise BundleError(f"{f}: listed in the manifest but missing; {REBUILD}")
            if sha256_file(f) != digest:
                raise BundleError(f"{f}: SHA-256 does not match the manifest (file changed or corrupt); {REBUILD}")
    return Manifest(root, data)


def check_graph_metadata(manifest: Manifest, name: str, metadata: Mapping[str, str],
                         input_shapes: Mapping[str, Sequence[Any]], precision: str = "fp32") -> None:
    """Refuse a graph whose embedded config, precision or input shape disagrees with the manifest.

    ``precision``: the graph set it was loaded from (``Manifest.graph_path``); the graph's own
    ``ipiqa.precision`` metadata (absent: fp32) must agree, so a swapped file cannot pass as another set.
    """
    path = manifest.graph_path(name, precision)
    embedded = metadata.get(METADATA_CONFIG_KEY)
    if embedded is None:
        raise BundleError(f"{path}: graph carries no ipiqa config; {REBUILD}")
    if IPIQAConfig.from_json(embedded) != manifest.config:
        raise BundleError(f"{path}: graph was exported for another config than the "
                          f"manifest says ({embedded} vs {manifest.config.to_json()}); {REBUILD}")
    expected = precision if precision != "int8" or name == "image_encoder" else "fp32"
    if metadata.get(METADATA_PRECISION_KEY, "fp32") != expected:
        raise BundleError(f"{path}: graph is {metadata.get(METADATA_PRECISION_KEY, 'fp32')}, the manifest lists it "
                          f"as {expected}; {REBUILD}")
    if name == "image_encoder":
        r = manifest.config.resolution
        shape = list(input_shapes.get("image", []))
        if shape[1:] != [r, r, 3]:
            raise BundleError(f"{path}: image input is {shape}, expected (batch, {r}, {r}, 3) uint8; {REBUILD}")


def check_engine_compat(manifest: Manifest, tensorrt_version: str, gpu_name: str, compute_capability: str) -> None:
    """TensorRT engines only run with the TensorRT version and GPU architecture that built them."""
    engines = manifest.data.get("engines")
    if not engines:
        raise BundleError(f"{manifest.root}: bundle has no TensorRT engines (exported with --onnx-only); "
                          f"rebuild with: {rebuild_command('fp16', engines=True)}")
    if engines.get("tensorrt") != tensorrt_version:
        raise BundleError(f"{manifest.root}: engines built with TensorRT {engines.get('tensorrt')}, this machine "
                          f"has {tensorrt_version}; {REBUILD}")
    if engines.get("compute_capability") != compute_capability:
        raise BundleError(f"{manifest.root}: engines built for {engines.get('gpu')} (sm {engines.get('compute_capability')}), "
                          f"this GPU is {gpu_name} (sm {compute_capability}); {REBUILD} on this machine")
