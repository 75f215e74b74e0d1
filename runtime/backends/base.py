"""The backend contract, after Polygraphy's runner template: a backend implements only its engine calls.

A subclass declares what it is (``name``, ``precision``, the batch range its engines take, whether it takes
pixels already on its device) and implements three engine calls that see only batches inside that range:

- ``_encode_image(images) -> handle``: the image graph; the handle (host arrays, device tensors, or just
  the batch size for engines whose outputs stay in device buffers) is read only by the next ``_fuse``;
- ``_encode_text(tokens) -> (k, E)``: the text graph;
- ``_fuse(handle, text_embedding or None) -> (k, N)``: the fusion graph.

Everything else is here, once for every backend: inputs are checked against ``io_shapes`` (the one place
shapes are written down); a batch above ``max_batch`` is split; a batch below ``min_batch`` (the last,
short batch of a run, or one uncached prompt) is padded by repeating its last row and the padding is
trimmed from the outputs; outputs are checked for their shape. A padded row only repeats a real one, so no
row's score depends on the padding (the graphs are row-independent: no batch statistics at inference).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import numpy as np

from ipiqa.config import IPIQAConfig
from ipiqa.errors import IPIQAError
from ipiqa.manifest import io_shapes

__all__ = ["Backend", "batch_spans"]


def batch_spans(n: int, min_batch: int, max_batch: Optional[int]) -> list[tuple[int, int, int]]:
    """``n`` rows as engine calls: (start, stop, padded size) with every padded size in [min, max].

    Pure, so the rule is tested without an engine: chunks of ``max_batch`` and a last, shorter chunk that
    is padded up to ``min_batch`` when it falls below it.
    """
    if min_batch < 1 or (max_batch is not None and max_batch < min_batch):
        raise IPIQAError(f"invalid batch range [{min_batch}, {max_batch}]")
    step = max_batch or max(n, 1)
    return [(i, min(i + step, n), max(min(i + step, n) - i, min_batch)) for i in range(0, n, step)]


def _padded(x: Any, size: int) -> Any:
    """``x`` (numpy array or device tensor) with its last row repeated up to ``size`` rows."""
    k = len(x)
    if k == size:
        return x
    return x[list(range(k)) + [k - 1] * (size - k)]


def _dtype_name(x: Any) -> str:
    return str(getattr(x, "dtype", type(x))).replace("torch.", "")


class Backend(ABC):
    """A model's three graphs behind ``encode_text`` and ``score``; see the module docstring."""

    name: str = "backend"
    precision: str = "fp32"
    min_batch: int = 1
    max_batch: Optional[int] = None  # None: any batch
    device_pixels: bool = False  # ``score`` also takes pixels already on the backend's device (decode_on_device)
    cfg: IPIQAConfig

    # -- the engine calls a backend implements (each sees a batch within [min_batch, max_batch])
    @abstractmethod
    def _encode_image(self, images: Any) -> Any: ...

    @abstractmethod
    def _encode_text(self, tokens: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _fuse(self, image_side: Any, text_embedding: Optional[np.ndarray]) -> np.ndarray: ...

    def _image_embedding(self, image_side: Any) -> np.ndarray:
        """The image embedding inside a handle, on the host: the gates read it (INT8 is judged by its cosine)."""
        raise IPIQAError(f"{self.name}: this backend does not expose its image embedding")

    # -- what the gates read beyond ``score`` (every intermediate tensor); CPU backends provide them
    def image_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the image graph for a batch (the gates check the feature map too)."""
        raise IPIQAError(f"{self.name}: this backend does not expose its image graph's outputs")

    def fusion_outputs(self, image_side: Any, text_embedding: Optional[np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the fusion graph (the gates read the gate-only ``pooled``)."""
        raise IPIQAError(f"{self.name}: this backend does not expose its fusion graph's outputs")

    def close(self) -> None:
        """Release engines and buffers; safe to call twice."""

    # -- the contract, the same for every backend
    def _check(self, tensor: str, x: Any, rows: Optional[int] = None) -> None:
        shape, dtype = io_shapes(self.cfg)[tensor]
        got = tuple(int(d) for d in getattr(x, "shape", ()))
        if len(got) != len(shape) or got[1:] != tuple(shape[1:]) or _dtype_name(x) != dtype:
            raise IPIQAError(f"{self.name}: {tensor} must be {dtype} (B, {', '.join(map(str, shape[1:]))}), got "
                             f"{_dtype_name(x)} {got}")
        if rows is not None and got[0] != rows:
            raise IPIQAError(f"{self.name}: {tensor} has {got[0]} rows for {rows} images")

    def _host(self, x: Any) -> Any:
        """Host arrays contiguous, as the engines read them; device tensors (``device_pixels``) as they are.
        Never cast: a float image or int32 tokens are the caller's mistake, refused by ``_check``."""
        return x if self.device_pixels and not isinstance(x, np.ndarray) else np.ascontiguousarray(x)

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        """int64 (B, L) token ids -> float32 (B, E), for any B (the prompt cache calls it with the uncached rows)."""
        if not self.cfg.text:
            raise IPIQAError(f"{self.name}: this model has no text branch")
        tokens = self._host(tokens)
        self._check("tokens", tokens)
        return self._over_spans("text_embedding", len(tokens),
                                lambda a, b, size: self._encode_text(_padded(tokens[a:b], size)))

    def score(self, images: Any, text_embedding: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 (B, R, R, 3) pixels (+ float32 (B, E) text embeddings for a text model) -> float32 (B, N)."""
        images = self._host(images)
        self._check("image", images)
        if self.cfg.text:
            if text_embedding is None:
                raise IPIQAError(f"{self.name}: this model scores against a prompt: pass its text embeddings")
            text_embedding = self._host(text_embedding)
            self._check("text_embedding", text_embedding, rows=len(images))
        elif text_embedding is not None:
            raise IPIQAError(f"{self.name}: this image-only model takes no text embeddings")
        text = text_embedding

        def run(a: int, b: int, size: int) -> np.ndarray:
            side = self._encode_image(_padded(images[a:b], size))
            return self._fuse(side, None if text is None else _padded(text[a:b], size))

        return self._over_spans("scores", len(images), run)

    def embed_images(self, images: Any) -> np.ndarray:
        """uint8 (B, R, R, 3) -> float32 (B, E) image embeddings, through the same engine calls as ``score``."""
        images = self._host(images)
        self._check("image", images)
        return self._over_spans("image_embedding", len(images), lambda a, b, size: self._image_embedding(
            self._encode_image(_padded(images[a:b], size))))

    def _over_spans(self, tensor: str, n: int, call: Callable[[int, int, int], Any]) -> np.ndarray:
        """``call(start, stop, padded size)`` over ``batch_spans``: each output checked, trimmed, joined."""
        per_row = tuple(io_shapes(self.cfg)[tensor][0][1:])
        out = [np.zeros((0, *per_row), np.float32)]
        for start, stop, size in batch_spans(n, self.min_batch, self.max_batch):
            y = np.asarray(call(start, stop, size), dtype=np.float32)
            if y.shape != (size, *per_row):
                raise IPIQAError(f"{self.name}: the engine returned {tensor} of shape {y.shape}, expected "
                                 f"{(size, *per_row)}")
            out.append(y[: stop - start])
        return np.concatenate(out)

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
