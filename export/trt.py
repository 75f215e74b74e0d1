"""TensorRT engines from the bundle's ONNX graphs, as strongly typed networks (TensorRT 10.x and 11.x).

Precision lives in the graph: an FP16 engine is built from the FP16 ONNX graph (``export.fp16``), an INT8
image engine from the QDQ graph (``export.int8``), and the builder only follows the tensor types. TensorRT
11 removed the weakly typed API (``BuilderFlag.FP16``/``INT8``, precision constraints, per-layer precision,
``platform_has_fast_fp16``) and builds every network strongly typed; TensorRT 10 does the same when the
network is created with ``STRONGLY_TYPED`` (kept, ignored, in 11). So one code path, using only API
present in both, serves ``tensorrt>=10.0,<12``.

``tensorrt`` is imported only inside these functions, with an error naming the extra that installs it.
A graph whose types do not match the requested precision is refused: nothing silently builds in FP32.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ipiqa._optional import require
from ipiqa.errors import IPIQAError
from ipiqa.manifest import PRECISIONS, check_batch_profile

__all__ = ["EngineSpec", "PRECISIONS", "GRAPH_PRECISIONS", "input_profiles", "network_flags", "build_engine"]
log = logging.getLogger(__name__)

Shape = tuple[int, ...]
# The graph precisions each engine precision is built from: INT8 is the image graph's QDQ form; the text
# and fusion graphs have no INT8 form and come in FP16.
GRAPH_PRECISIONS = {"fp32": ("fp32",), "fp16": ("fp16",), "int8": ("int8", "fp16")}
_FIX = {"fp16": "convert it with ipiqa.export.fp16.convert_to_fp16",
        "int8": "quantize it with ipiqa.export.quantize.quantize_image_graph",
        "fp32": "pass the FP32 graph the export wrote"}


@dataclass(frozen=True)
class EngineSpec:
    precision: str  # "fp32" | "fp16" | "int8": which graphs the engines are built from (GRAPH_PRECISIONS)
    batch: tuple[int, int, int]  # min, opt, max
    workspace_gib: float = 4.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        object.__setattr__(self, "batch", check_batch_profile(self.batch))  # the one batch-profile rule
        if not 0 < self.workspace_gib <= 1024:
            raise ValueError(f"workspace must be in (0, 1024] GiB, got {self.workspace_gib}")


def input_profiles(input_shapes: Mapping[str, Sequence[Any]], batch: tuple[int, int, int]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shapes per input: the batch axis from the profile, every other axis static."""
    profiles = {}
    for name, shape in input_shapes.items():
        rest = tuple(int(d) for d in shape[1:])
        if any(d <= 0 for d in rest):
            raise IPIQAError(f"input {name!r} has a dynamic non-batch axis {list(shape)}; only batch may vary")
        profiles[name] = tuple((b, *rest) for b in batch)  # type: ignore[misc]
    return profiles


def network_flags(trt: Any) -> int:
    """``STRONGLY_TYPED``: required on TensorRT 10 for graph-typed precision, accepted and ignored by 11."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _check_graph_precision(onnx_path: Path, precision: str) -> None:
    from .fp16 import graph_precision

    got = graph_precision(onnx_path)
    if got not in GRAPH_PRECISIONS[precision]:
        raise IPIQAError(f"{onnx_path}: this graph is {got} but a {precision} engine was asked for; TensorRT takes "
                         f"precision from the graph's tensor types, so {_FIX[precision]} and build from that file")
    if got == "int8":
        import json

        from .int8_settings import SETTINGS_KEY

        onnx = require("onnx", extra="export")
        meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        target = json.loads(meta[SETTINGS_KEY]).get("target") if SETTINGS_KEY in meta else None
        if target not in (None, "tensorrt"):
            raise IPIQAError(f"{onnx_path}: this INT8 graph was quantized for {target} (asymmetric uint8 activations); "
                             "TensorRT takes symmetric int8 Q/DQ only: quantize_image_graph(..., target='tensorrt')")


def _keep_outputs(network: Any, onnx_path: Path, keep: Sequence[str]) -> None:
    """Unmark every network output not in ``keep`` (``unmark_output``: TensorRT 10 and 11)."""
    marked = [network.get_output(i) for i in range(network.num_outputs)]
    missing = set(keep) - {t.name for t in marked}
    if missing:
        raise IPIQAError(f"{onnx_path}: the graph has no output {sorted(missing)} (outputs: "
                         f"{[t.name for t in marked]}); re-export the bundle")
    for tensor in marked:
        if tensor.name not in keep:
            network.unmark_output(tensor)


def build_engine(onnx_path: Path, profiles: Mapping[str, tuple[Shape, Shape, Shape]], spec: EngineSpec,
                 timing_cache: Optional[Path] = None, outputs: Optional[Sequence[str]] = None) -> bytes:
    """Serialized engine of ``onnx_path``, strongly typed. Reuses and updates ``timing_cache``.

    ``outputs``: the graph outputs the engine keeps (None: all). The fusion graph's gate-only ``pooled`` is
    left out this way, so every engine IO tensor is one the runtime binds a buffer to.
    """
    trt = require("tensorrt", extra="tensorrt")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise IPIQAError(f"{onnx_path}: no such ONNX graph; export the bundle first (ipiqa-export MODEL -o BUNDLE)")
    _check_graph_precision(onnx_path, spec.precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from file: resolves the external weights beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise IPIQAError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    if outputs is not None:
        _keep_outputs(network, onnx_path, outputs)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise IPIQAError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    blob = bytes(serialized)
    log.info("%s: %s engine built (%.1f MB)", onnx_path.name, spec.precision, len(blob) / 1e6)
    return blob
