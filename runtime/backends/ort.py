"""ONNX Runtime backend: CPU, CUDA or TensorRT execution provider over the bundle's ONNX graphs."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np

from ipiqa.bundle import Manifest, check_graph_metadata
from ipiqa.errors import IPIQAError

__all__ = ["OrtBackend", "PROVIDERS"]
log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OrtBackend:
    name = "onnxruntime"
    max_batch: Optional[int] = None

    def __init__(self, manifest: Manifest, provider: str = "cpu", device_id: int = 0, threads: Optional[int] = None):
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise IPIQAError(f"unknown onnxruntime provider {provider!r}; choose from {sorted(PROVIDERS)}")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise IPIQAError(f"onnxruntime here has no {PROVIDERS[provider]} (available: {available}); "
                             "install onnxruntime-gpu (pip install 'ipiqa[gpu]') for cuda/tensorrt")
        self.gpu = provider != "cpu"
        self.device_id = device_id
        self.name = f"onnxruntime-{provider}"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self.gpu:  # one op at a time, all cores inside each op: best for conv nets on CPU
            options.intra_op_num_threads = threads or os.cpu_count() or 1
            options.inter_op_num_threads = 1
        providers: list[Any] = [PROVIDERS["cpu"]]
        if provider == "cuda":
            providers.insert(0, (PROVIDERS["cuda"], {"device_id": device_id}))
        elif provider == "tensorrt":
            cache = manifest.root / "engines" / "ort-trt-cache"
            providers[:0] = [(PROVIDERS["tensorrt"], {"device_id": device_id, "trt_fp16_enable": True,
                                                      "trt_engine_cache_enable": True,
                                                      "trt_engine_cache_path": str(cache)}),
                             (PROVIDERS["cuda"], {"device_id": device_id})]
        self.sessions = {}
        for name in manifest.data["onnx"]["graphs"]:
            sess = ort.InferenceSession(str(manifest.graph_path(name)), options, providers=providers)
            check_graph_metadata(manifest, name, sess.get_modelmeta().custom_metadata_map,
                                 {i.name: i.shape for i in sess.get_inputs()})
            self.sessions[name] = sess
        self.image_outputs = [o.name for o in self.sessions["image_encoder"].get_outputs()]

    def encode_image(self, images: np.ndarray) -> dict[str, Any]:
        sess = self.sessions["image_encoder"]
        if not self.gpu:
            return dict(zip(self.image_outputs, sess.run(None, {"image": images})))
        binding = sess.io_binding()  # outputs stay on the GPU as OrtValues; fusion binds them directly
        binding.bind_cpu_input("image", np.ascontiguousarray(images))
        for name in self.image_outputs:
            binding.bind_output(name, "cuda", self.device_id)
        sess.run_with_iobinding(binding)
        return dict(zip(self.image_outputs, binding.get_outputs()))

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        return self.sessions["text_encoder"].run(None, {"tokens": tokens})[0]

    def fuse(self, image_side: dict[str, Any], text_embedding: Optional[np.ndarray]) -> np.ndarray:
        sess = self.sessions["fusion"]
        wanted = [i.name for i in sess.get_inputs()]
        feeds = {k: v for k, v in image_side.items() if k in wanted}
        if text_embedding is not None:
            feeds["text_embedding"] = np.ascontiguousarray(text_embedding, dtype=np.float32)
        if not self.gpu:
            return sess.run(None, feeds)[0]
        binding = sess.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)  # text embeddings come from the host-side prompt cache (4 KB/row)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("scores")
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        self.sessions.clear()
