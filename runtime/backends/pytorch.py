"""PyTorch backend: a ``.safetensors`` model file served fast (for users without ONNX/TensorRT).

Not the reference (that is ``ipiqa.model`` run as the authors do, FP32 eager, straightforward pools): this
serves the single-query pools, channels-last and optionally FP16 on CUDA; ``compile=True`` wraps the image
encoder in ``torch.compile`` (mode "reduce-overhead" on CUDA, which replays CUDA graphs); ``decode_on_device``
decodes JPEGs on the GPU. Only imported when chosen.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ipiqa._optional import require
from ipiqa.device import Device, parse_device
from ipiqa.errors import IPIQAError

from .base import Backend

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    name = "torch"
    device_pixels = True  # ``decode_on_device`` hands over pixels already on the GPU

    def __init__(self, model_path: Union[str, Path], device: Union[str, Device] = "cpu", fp16: bool = False,
                 compile: bool = False):
        # Through require(): on a base install the user gets the pip command, not a ModuleNotFoundError.
        torch = require("torch", extra="torch")
        require("open_clip", extra="torch")  # ipiqa.model builds its towers from open_clip's modules
        from ipiqa.checkpoint import load_model

        self.torch = torch
        self.device = torch.device(parse_device(device).resolve_torch())
        self.gpu = self.device.type == "cuda"  # the engine batch rule (backends.base) reads it
        if fp16 and self.device.type != "cuda":
            raise IPIQAError("--fp16 needs --device cuda (half precision on CPU is slow and inexact)")
        self.dtype = torch.float16 if fp16 else torch.float32
        self.precision = "fp16" if fp16 else "fp32"
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.model = load_model(model_path).to(self.device, self.dtype, memory_format=self.memory_format).eval()
        self.cfg = self.model.cfg
        self._encode_pixels = self.model.encode_pixels
        if compile:  # the trunk is ~95% of the FLOPs; text runs once per prompt and fusion is small
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._encode_pixels = torch.compile(self.model.encode_pixels, mode=mode, dynamic=False)
        self.name = f"torch-{self.device.type}{'-fp16' if fp16 else ''}{'-compiled' if compile else ''}"

    def _encode_image(self, images: np.ndarray) -> Any:
        # uint8 NHWC up (4x fewer bytes than float32); normalized on the device, channels-last by construction.
        # A tensor already on the device (``decode_on_device``) goes straight in.
        if isinstance(images, np.ndarray):
            x = self.torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to(self.device, non_blocking=True)
        else:
            x = images.to(self.device)
        with self.torch.inference_mode():
            feature_map, embedding = self._encode_pixels(x)
            return feature_map.clone(), embedding.clone()  # CUDA-graph outputs are overwritten by the next replay

    def decode_on_device(self, paths: list[str]) -> tuple[Any, list[Optional[str]]]:
        """JPEGs decoded on this backend's device (nvJPEG on CUDA) and resized there with Pillow's exact
        arithmetic -> (uint8 (k, R, R, 3) on the device, error text or None per path). Other formats and files
        nvJPEG refuses go through Pillow with the host path's rules; on a CPU device all of them do."""
        from .torch_images import decode_resize

        pixels, errors = decode_resize(paths, self.cfg.resolution, self.device)
        # NHWC contiguous: the layout the host path hands over, so the convolutions see the same memory format
        return pixels.permute(0, 2, 3, 1).contiguous(), [None if e is None else str(e) for e in errors]

    def _image_embedding(self, image_side: Any) -> np.ndarray:
        return image_side[1].float().cpu().numpy()

    def _encode_text(self, tokens: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model.encode_text(self.torch.from_numpy(tokens).to(self.device)).float().cpu().numpy()

    def _fuse(self, image_side: Any, text_embedding: Optional[np.ndarray]) -> np.ndarray:
        feature_map, image_embedding = image_side
        text = None if text_embedding is None else self.torch.from_numpy(text_embedding).to(self.device, self.dtype)
        with self.torch.inference_mode():
            return self.model.fuse(feature_map, image_embedding, text).float().cpu().numpy()

    def close(self) -> None:
        self.model = None
