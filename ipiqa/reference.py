"""The PyTorch reference model as a batch scorer (what ``ipiqa score MODEL.safetensors`` runs).

Prompts are encoded once per distinct prompt: datasets hold ~10 images per prompt, and the [QA]
embedding depends on the prompt alone.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Union

import numpy as np
import torch

from .errors import IPIQAError
from .model import IPIQA, tokenize

__all__ = ["TorchScorer"]


class TorchScorer:
    def __init__(self, model: IPIQA, device: Union[str, torch.device] = "cpu", fp16: bool = False,
                 cache_size: int = 4096):
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise IPIQAError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        if fp16 and device.type != "cuda":
            raise IPIQAError("--fp16 needs --device cuda (half precision on CPU is slow and inexact)")
        self.dtype = torch.float16 if fp16 else torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.device = device
        self.cfg = model.cfg
        self.resolution = model.cfg.resolution
        self.needs_prompt = model.cfg.text
        self._cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self.cache_hits = self.cache_misses = 0

    def _text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = tokenize(prompts, self.cfg.context_length)
        keys = [tuple(t.tolist()) for t in tokens]
        unique = list(dict.fromkeys(keys))
        todo = [k for k in unique if k not in self._cache]
        if todo:
            new = self.model.encode_text(torch.tensor(todo, device=self.device))
            self._cache.update(zip(todo, new))
        self.cache_misses += len(todo)
        self.cache_hits += len(keys) - len(todo)
        out = torch.stack([self._cache[k] for k in keys])
        for k in unique:  # LRU: mark used
            self._cache.move_to_end(k)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, self.dtype)
        feature_map, image_embedding = self.model.encode_image(x)
        text = self._text_embeddings(prompts) if self.cfg.text else None
        return self.model.fuse(feature_map, image_embedding, text).float().cpu().numpy()
