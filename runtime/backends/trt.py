"""TensorRT backend: the bundle's engines on one CUDA stream, with device buffers shared between engines.

The image engine writes ``feature_map``/``image_embedding`` into the very buffers the fusion engine
reads, so nothing image-side leaves the GPU; only images go up (from pinned host memory) and scores
come down. Written against TensorRT 10 and 11 (named tensors, ``execute_async_v3``) and cuda-python.

Every IO tensor of every engine gets a device buffer, sized from the engine itself (batch axis at the
profile's max), so an engine can never run with an unbound tensor; pinned host buffers exist only for
what crosses to or from the host (``HOST_TENSORS``).
"""
from __future__ import annotations

import ctypes
from typing import Any, Optional

import numpy as np

from ipiqa._optional import require
from ipiqa.bundle import Manifest, check_engine_compat
from ipiqa.errors import IPIQAError

from .base import Backend

__all__ = ["TrtBackend", "HOST_TENSORS"]

HOST_TENSORS = ("image", "tokens", "text_embedding", "scores")  # uploaded or downloaded; the rest stay on the GPU
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32,
          "INT64": np.int64, "BOOL": np.bool_}


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


class TrtBackend(Backend):
    name = "tensorrt"
    gpu = True  # the engine batch rule (backends.base) reads it

    def __init__(self, manifest: Manifest, device_id: int = 0):
        trt = require("tensorrt", extra="tensorrt")
        self.cudart = cudart = _cudart()
        self.device: dict[str, Any] = {}
        self.host: dict[str, tuple[Any, np.ndarray]] = {}
        self.stream = None
        _ok(cudart.cudaSetDevice(device_id))
        props = _ok(cudart.cudaGetDeviceProperties(device_id))
        gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        check_engine_compat(manifest, trt.__version__, gpu, f"{props.major}.{props.minor}")
        engines = manifest.engines
        assert engines is not None  # check_engine_compat refused a bundle without engines
        self.cfg = manifest.config
        self.precision = engines.precision
        self.name = f"tensorrt-{self.precision}"
        self.min_batch, _, self.max_batch = engines.batch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for name in engines.graphs:
            engine = runtime.deserialize_cuda_engine(manifest.engine_path(name).read_bytes())
            if engine is None:
                raise IPIQAError(f"{manifest.engine_path(name)}: TensorRT could not load the engine; rebuild the bundle")
            self.engines[name], self.contexts[name] = engine, engine.create_execution_context()
        self.shapes, self.dtypes = self._io_tensors(manifest)
        self.stream = _ok(cudart.cudaStreamCreate())
        try:
            for tensor, shape in self.shapes.items():
                nbytes = self.max_batch * int(np.prod(shape)) * self.dtypes[tensor].itemsize
                self.device[tensor] = _ok(cudart.cudaMalloc(nbytes))
                if tensor in HOST_TENSORS:
                    ptr = _ok(cudart.cudaMallocHost(nbytes))  # pinned: async copies overlap with compute
                    buf = (ctypes.c_byte * nbytes).from_address(int(ptr))
                    self.host[tensor] = (ptr, np.frombuffer(buf, dtype=self.dtypes[tensor]).reshape(self.max_batch, *shape))
            for name, engine in self.engines.items():
                for i in range(engine.num_io_tensors):
                    tensor = engine.get_tensor_name(i)
                    self.contexts[name].set_tensor_address(tensor, int(self.device[tensor]))
        except BaseException:
            self.close()
            raise
        self._h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def _io_tensors(self, manifest: Manifest) -> tuple[dict[str, tuple[int, ...]], dict[str, np.dtype]]:
        """Per tensor name, its per-row shape and dtype as the engines declare them; engines sharing a name
        (image side -> fusion) must agree, or the shared buffer would be misread."""
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, np.dtype] = {}
        for name, engine in self.engines.items():
            for i in range(engine.num_io_tensors):
                tensor = engine.get_tensor_name(i)
                shape = tuple(int(d) for d in engine.get_tensor_shape(tensor))[1:]
                kind = engine.get_tensor_dtype(tensor).name
                if kind not in _NUMPY or any(d < 1 for d in shape):
                    raise IPIQAError(f"{manifest.engine_path(name)}: tensor {tensor!r} is {kind} {list(shape)}; "
                                     "only the batch axis may vary; rebuild the bundle")
                dtype = np.dtype(_NUMPY[kind])
                if shapes.setdefault(tensor, shape) != shape or dtypes.setdefault(tensor, dtype) != dtype:
                    raise IPIQAError(f"{manifest.engine_path(name)}: tensor {tensor!r} is {dtype} {list(shape)} here but "
                                     f"{dtypes[tensor]} {list(shapes[tensor])} in another engine; rebuild the bundle")
        return shapes, dtypes

    def _upload(self, name: str, array: np.ndarray) -> None:
        ptr, host = self.host[name]
        host[: len(array)] = array
        _ok(self.cudart.cudaMemcpyAsync(self.device[name], ptr, host[: len(array)].nbytes, self._h2d, self.stream))

    def _download(self, name: str, batch: int) -> np.ndarray:
        ptr, host = self.host[name]
        _ok(self.cudart.cudaMemcpyAsync(ptr, self.device[name], host[:batch].nbytes, self._d2h, self.stream))
        _ok(self.cudart.cudaStreamSynchronize(self.stream))
        return host[:batch].copy()

    def _run(self, name: str, batch: int) -> None:
        if not self.min_batch <= batch <= self.max_batch:  # Backend.score pads and splits: never reached from there
            raise IPIQAError(f"batch {batch} is outside the engines' profile [{self.min_batch}, {self.max_batch}]")
        engine, ctx = self.engines[name], self.contexts[name]
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            if engine.get_tensor_mode(tensor).name == "INPUT":
                ctx.set_input_shape(tensor, (batch, *self.shapes[tensor]))
        if not ctx.execute_async_v3(self.stream):
            raise IPIQAError(f"TensorRT execution of {name} failed")

    def _encode_image(self, images: np.ndarray) -> int:
        self._upload("image", images)
        self._run("image_encoder", len(images))
        return len(images)  # the outputs stay in the shared device buffers until the next _encode_image

    def _image_embedding(self, image_side: int) -> np.ndarray:
        """The image engine's embedding, copied down from its device buffer (gates only: not pinned)."""
        out = np.empty((image_side, *self.shapes["image_embedding"]), self.dtypes["image_embedding"])
        _ok(self.cudart.cudaStreamSynchronize(self.stream))
        _ok(self.cudart.cudaMemcpy(out.ctypes.data, self.device["image_embedding"], out.nbytes, self._d2h))
        return out

    def _encode_text(self, tokens: np.ndarray) -> np.ndarray:
        self._upload("tokens", tokens)
        self._run("text_encoder", len(tokens))
        return self._download("text_embedding", len(tokens))

    def _fuse(self, image_side: int, text_embedding: Optional[np.ndarray]) -> np.ndarray:
        if text_embedding is not None:
            self._upload("text_embedding", text_embedding.astype(np.float32))
        self._run("fusion", image_side)
        return self._download("scores", image_side)

    def close(self) -> None:
        """Free every buffer and the stream this backend created; safe to call twice."""
        if self.stream is not None:
            self.cudart.cudaStreamSynchronize(self.stream)  # no copy or kernel still using the buffers
        self.contexts.clear()  # execution contexts before the memory they point at
        self.engines.clear()
        for ptr in self.device.values():
            self.cudart.cudaFree(ptr)
        for ptr, _ in self.host.values():
            self.cudart.cudaFreeHost(ptr)
        self.device.clear()
        self.host.clear()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
