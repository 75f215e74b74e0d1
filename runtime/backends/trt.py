"""TensorRT backend: the bundle's engines on one CUDA stream, with device buffers shared between engines.

The image engine writes ``feature_map``/``image_embedding`` into the very buffers the fusion engine
reads, so nothing image-side leaves the GPU; only images go up (from pinned host memory) and scores
come down. Written against TensorRT 10 (named tensors, ``execute_async_v3``) and cuda-python.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any, Optional

import numpy as np

from ipiqa._optional import require
from ipiqa.bundle import Manifest, check_engine_compat
from ipiqa.errors import IPIQAError

__all__ = ["TrtBackend"]
log = logging.getLogger(__name__)


def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
        return runtime
    except ImportError:
        return require("cuda.cudart", extra="tensorrt")


def _ok(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise IPIQAError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class TrtBackend:
    name = "tensorrt"

    def __init__(self, manifest: Manifest, device_id: int = 0):
        trt = require("tensorrt", extra="tensorrt")
        self.cudart = cudart = _cudart()
        _ok(cudart.cudaSetDevice(device_id))
        props = _ok(cudart.cudaGetDeviceProperties(device_id))
        gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        check_engine_compat(manifest, trt.__version__, gpu, f"{props.major}.{props.minor}")
        self.max_batch = int(manifest.data["engines"]["batch"][2])
        self.min_batch = int(manifest.data["engines"]["batch"][0])
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for name in manifest.data["engines"]["graphs"]:
            engine = runtime.deserialize_cuda_engine(manifest.engine_path(name).read_bytes())
            if engine is None:
                raise IPIQAError(f"{manifest.engine_path(name)}: TensorRT could not load the engine; rebuild the bundle")
            self.engines[name], self.contexts[name] = engine, engine.create_execution_context()
        self.stream = _ok(cudart.cudaStreamCreate())
        # One device buffer per tensor name at the profile's max batch; engines sharing a name share it.
        self.shapes = {k: tuple(v[1:]) for k, v in manifest.data["shapes"].items()}
        self.shapes["scores"] = (len(manifest.outputs),)
        dtypes = {"tokens": np.int64, "image": np.uint8}
        self.dtypes = {k: np.dtype(dtypes.get(k, np.float32)) for k in self.shapes}
        self.device, self.host = {}, {}
        for name, shape in self.shapes.items():
            nbytes = self.max_batch * int(np.prod(shape)) * self.dtypes[name].itemsize
            self.device[name] = _ok(cudart.cudaMalloc(nbytes))
            if name in ("image", "tokens", "text_embedding", "scores"):
                ptr = _ok(cudart.cudaMallocHost(nbytes))  # pinned: async copies overlap with compute
                buf = (ctypes.c_byte * nbytes).from_address(int(ptr))
                self.host[name] = (ptr, np.frombuffer(buf, dtype=self.dtypes[name]).reshape(self.max_batch, *shape))
        for name, engine in self.engines.items():
            ctx = self.contexts[name]
            for i in range(engine.num_io_tensors):
                tensor = engine.get_tensor_name(i)
                ctx.set_tensor_address(tensor, int(self.device[tensor]))
        self._h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def _upload(self, name: str, array: np.ndarray) -> None:
        ptr, host = self.host[name]
        host[: len(array)] = array
        _ok(self.cudart.cudaMemcpyAsync(self.device[name], ptr, array.nbytes, self._h2d, self.stream))

    def _download(self, name: str, batch: int) -> np.ndarray:
        ptr, host = self.host[name]
        nbytes = batch * int(np.prod(self.shapes[name])) * self.dtypes[name].itemsize
        _ok(self.cudart.cudaMemcpyAsync(ptr, self.device[name], nbytes, self._d2h, self.stream))
        _ok(self.cudart.cudaStreamSynchronize(self.stream))
        return host[:batch].copy()

    def _run(self, name: str, batch: int) -> None:
        if not self.min_batch <= batch <= self.max_batch:
            raise IPIQAError(f"batch {batch} is outside the engines' profile [{self.min_batch}, {self.max_batch}]")
        engine, ctx = self.engines[name], self.contexts[name]
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            if engine.get_tensor_mode(tensor).name == "INPUT":
                ctx.set_input_shape(tensor, (batch, *self.shapes[tensor]))
        if not ctx.execute_async_v3(self.stream):
            raise IPIQAError(f"TensorRT execution of {name} failed")

    def encode_image(self, images: np.ndarray) -> int:
        self._upload("image", images)
        self._run("image_encoder", len(images))
        return len(images)  # the outputs stay in the shared device buffers until the next encode_image

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        self._upload("tokens", tokens)
        self._run("text_encoder", len(tokens))
        return self._download("text_embedding", len(tokens))

    def fuse(self, image_side: int, text_embedding: Optional[np.ndarray]) -> np.ndarray:
        if text_embedding is not None:
            self._upload("text_embedding", text_embedding.astype(np.float32))
        self._run("fusion", image_side)
        return self._download("scores", image_side)

    def close(self) -> None:
        for ptr in self.device.values():
            self.cudart.cudaFree(ptr)
        for ptr, _ in self.host.values():
            self.cudart.cudaFreeHost(ptr)
        self.device.clear()
        self.host.clear()
