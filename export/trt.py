"""FP16/FP32 TensorRT engines from the ONNX graphs, with NVIDIA's documented Python API (TensorRT 10).

``tensorrt`` is imported only inside these functions, with an error naming the extra that installs it.
FP16 never silently falls back to FP32: a GPU without fast FP16 is an error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ipiqa._optional import require
from ipiqa.errors import IPIQAError

__all__ = ["EngineSpec", "input_profiles", "fp32_layer_names", "build_engine", "TorchEngineRunner"]
log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineSpec:
    precision: str  # "fp16" | "fp32"
    batch: tuple[int, int, int]  # min, opt, max
    workspace_gib: float = 4.0

    def __post_init__(self) -> None:
        if self.precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {self.precision!r}")
        lo, opt, hi = self.batch
        if not 1 <= lo <= opt <= hi:
            raise ValueError(f"batch profile needs 1 <= MIN <= OPT <= MAX, got {self.batch}")
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


def fp32_layer_names(network: Any, trt: Any) -> list[str]:
    """Layers pinned to FP32 in FP16 engines: normalizations, softmaxes, and the products feeding a softmax.

    LayerNorm statistics and attention logits are where FP16 overflows or loses the ranking
    (the text tower's 12 LayerNorms and the two 2048-wide single-query pools); the convolutions and
    projections, where nearly all FLOPs are, stay FP16.
    """
    pinned, producers = [], {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX):
            pinned.append(layer)
            if layer.type == trt.LayerType.SOFTMAX:
                src = producers.get(layer.get_input(0).name)
                if src is not None and src.type in (trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.ELEMENTWISE):
                    pinned.append(src)
    seen, names = set(), []
    for layer in pinned:
        if layer.name not in seen:
            seen.add(layer.name)
            names.append(layer.name)
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
    return names


def build_engine(onnx_path: Path, profiles: Mapping[str, tuple[Shape, Shape, Shape]], spec: EngineSpec,
                 timing_cache: Optional[Path] = None) -> tuple[bytes, list[str]]:
    """Serialized engine + the names of layers pinned to FP32. Reuses and updates ``timing_cache``."""
    trt = require("tensorrt", extra="tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from file: resolves the external weights beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise IPIQAError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gib * (1 << 30)))
    pinned: list[str] = []
    if spec.precision == "fp16":
        if not builder.platform_has_fast_fp16:
            raise IPIQAError("this GPU has no fast FP16; build with --fp32 (no silent fallback)")
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = fp32_layer_names(network, trt)
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
    return bytes(serialized), pinned


class TorchEngineRunner:
    """Runs one engine on CUDA tensors owned by torch (used by the export's parity gate)."""

    def __init__(self, engine_bytes: bytes):
        self.trt = require("tensorrt", extra="tensorrt")
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise IPIQAError("TensorRT could not deserialize the engine (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT]

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        import torch

        trt = self.trt
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64}
        inputs = {name: t.contiguous() for name, t in inputs.items()}  # kept alive until execution ends
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.outputs:
            dtype = dtypes[self.engine.get_tensor_dtype(name)]
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            results[name] = out
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise IPIQAError("TensorRT execution failed")
        stream.synchronize()
        return results
