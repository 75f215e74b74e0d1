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

Reproducible scores (issue 28): the graphs are row-independent in exact arithmetic, but a kernel's blocking
and summation order follow the batch size, so a row's last bits did change with it (2.4e-3 on ORT FP32, 5e-3
on OpenVINO at batch 8 vs alone, RN50-512 steep head), while at one fixed size its bits depend neither on its
neighbours nor on its position. So a backend with an ``engine_batch`` runs *every* image, text and fusion call
at exactly that size (chunks of it, the last padded up): a row's score is then a function of (bundle, image,
prompt, backend, precision, machine) only, whatever ``--batch``, the last short batch, the number of uncached
prompts, a resume or the server's dynamic batcher made of it. ``engine_batch_for`` is the rule: on the CPU the
default (``CPU_ENGINE_BATCH``, where throughput barely depends on the batch: ``benchmarks/fixed_batch.py``), on
a GPU opt-in (``Scorer(reproducible=True)``, ``--reproducible``), where padding costs at low load. A closed
backend refuses every later call with one line (``<name>: closed``).

Short text calls: where the text graph's sequence axis is dynamic (``takes_short_tokens``, bundles exported since
the graph format 2), each text call runs only up to its rows' last end-of-text token (``short_tokens``): under
the causal mask nothing after it reaches the embedding, and the dataset prompts' mean is 34 of 77 tokens. The
length follows the call's own rows, so it is cut only where the engine batch is 1 (the CPU default: a prompt's
length is its own, and its bits stay a function of the prompt) or free (a GPU without ``reproducible``); a fixed
engine batch above 1 runs the full context, so a neighbour's length never reaches a row.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import numpy as np

from ipiqa.config import IPIQAConfig
from ipiqa.errors import IPIQAError
from ipiqa.manifest import io_shapes

__all__ = ["Backend", "batch_spans", "engine_batch_for", "short_tokens", "CPU_ENGINE_BATCH", "GPU_ENGINE_BATCH"]

# The engine batch of a CPU backend: RN50-512 FP32 on ONNX Runtime measured 4.47 / 4.48 / 4.17 img/s at batch
# 1 / 4 / 8 on a quiet 2-core Ice Lake (issue 28), and 1 wastes nothing padding a short batch, one uncached prompt
# or one server request. benchmarks/fixed_batch.py on a 2-core AMD EPYC (Zen 4) shared by seven processes read
# fixed / variable 0.75-0.88 at a requested batch of 4-8 with its A/A row at 0.98, within that machine's noise
# (other runs: 0.46-1.05): rerun it on a quiet machine before changing this.
CPU_ENGINE_BATCH = 1
# ``reproducible=True`` on a GPU: big enough to keep an RN50-512 engine busy, small enough that padding one
# request up to it at low load stays cheap (clamped into a TensorRT profile's [min, max]).
GPU_ENGINE_BATCH = 16


def engine_batch_for(gpu: bool, reproducible: bool, min_batch: int = 1, max_batch: Optional[int] = None) -> Optional[int]:
    """The one rule for the size every engine call runs at: None (the caller's batch, padded up to ``min_batch``
    only) on a GPU unless ``reproducible``; else ``CPU_ENGINE_BATCH`` / ``GPU_ENGINE_BATCH`` moved into the
    engines' range [``min_batch``, ``max_batch``]."""
    if gpu and not reproducible:
        return None
    size = max(GPU_ENGINE_BATCH if gpu else CPU_ENGINE_BATCH, min_batch)
    return size if max_batch is None else min(size, max_batch)


def batch_spans(n: int, min_batch: int, max_batch: Optional[int],
                engine_batch: Optional[int] = None) -> list[tuple[int, int, int]]:
    """``n`` rows as engine calls: (start, stop, padded size) with every padded size in [min, max].

    Pure, so the rule is tested without an engine: chunks of ``max_batch`` and a last, shorter chunk that
    is padded up to ``min_batch`` when it falls below it; with ``engine_batch``, chunks of that size, every
    one (the last included) padded up to it, so every call has the same size.
    """
    if min_batch < 1 or (max_batch is not None and max_batch < min_batch):
        raise IPIQAError(f"invalid batch range [{min_batch}, {max_batch}]")
    if engine_batch is not None:
        if not min_batch <= engine_batch <= (max_batch or engine_batch):
            raise IPIQAError(f"engine batch {engine_batch} is outside the batch range [{min_batch}, {max_batch}]")
        return [(i, min(i + engine_batch, n), engine_batch) for i in range(0, n, engine_batch)]
    step = max_batch or max(n, 1)
    return [(i, min(i + step, n), max(min(i + step, n) - i, min_batch)) for i in range(0, n, step)]


def short_tokens(tokens: np.ndarray) -> np.ndarray:
    """``tokens`` cut after the last end-of-text of its rows (at least 2 columns): the graph reads each row at
    ``argmax`` (end-of-text is the vocabulary's largest id, the tokenizer pads with 0 after it), and under the
    causal mask that row depends only on the columns up to it. A view, no copy."""
    return tokens[:, :max(int(tokens.argmax(axis=1).max(initial=0)) + 1, 2)]


def _padded(x: Any, size: int) -> Any:
    """``x`` (numpy array or device tensor) with its last row repeated up to ``size`` rows."""
    k = len(x)
    if k == size:
        return x
    return x[list(range(k)) + [k - 1] * (size - k)]


def _dtype_name(x: Any) -> str:
    return str(getattr(x, "dtype", type(x))).replace("torch.", "")


_UNSET: Any = object()
_REFUSED_WHEN_CLOSED = ("image_outputs", "fusion_outputs")  # what a subclass serves beyond the contract's calls


def _refusing_when_closed(method: Callable) -> Callable:
    @functools.wraps(method)
    def guarded(self: "Backend", *args: Any, **kwargs: Any) -> Any:
        self._refuse_closed()
        return method(self, *args, **kwargs)

    return guarded


def _marking_closed(close: Callable) -> Callable:
    @functools.wraps(close)
    def closing(self: "Backend") -> None:
        try:
            close(self)
        finally:
            self._closed = True

    return closing


class Backend(ABC):
    """A model's three graphs behind ``encode_text`` and ``score``; see the module docstring."""

    name: str = "backend"
    precision: str = "fp32"
    min_batch: int = 1
    max_batch: Optional[int] = None  # None: any batch
    device_pixels: bool = False  # ``score`` also takes pixels already on the backend's device (decode_on_device)
    gpu: bool = False  # the engines run on a GPU: the engine batch is then free unless made reproducible
    takes_short_tokens: bool = False  # the text graph's sequence axis is dynamic: calls may be cut (short_tokens)
    cfg: IPIQAConfig
    _closed: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every backend's own ``close`` marks it closed (whether or not it calls this class's), and its own
        gate methods refuse once closed: the next call is one line, never a ``KeyError`` on a cleared session."""
        super().__init_subclass__(**kwargs)
        if "close" in cls.__dict__:
            cls.close = _marking_closed(cls.__dict__["close"])  # type: ignore[method-assign]
        for name in _REFUSED_WHEN_CLOSED:
            if name in cls.__dict__:
                setattr(cls, name, _refusing_when_closed(cls.__dict__[name]))

    # -- the engine batch (see the module docstring)
    @property
    def engine_batch(self) -> Optional[int]:
        """The size every engine call runs at (None: the caller's batch, padded up to ``min_batch`` only)."""
        fixed = self.__dict__.get("_engine_batch", _UNSET)
        return engine_batch_for(self.gpu, False, self.min_batch, self.max_batch) if fixed is _UNSET else fixed

    def fix_engine_batch(self, size: Optional[int]) -> None:
        """Run every later engine call at ``size`` rows (None: follow the caller's batch, as the benchmark's
        variable-batch row does); refused outside the engines' range."""
        if size is not None and not (size >= self.min_batch and (self.max_batch is None or size <= self.max_batch)):
            raise IPIQAError(f"{self.name}: engine batch {size} is outside the engines' batch range "
                             f"[{self.min_batch}, {self.max_batch}]; choose a size in it (or rebuild the engines)")
        self._engine_batch = size

    def make_reproducible(self) -> None:
        """Fix the engine batch on a GPU too (on the CPU it is fixed already): ``Scorer(reproducible=True)``."""
        self.fix_engine_batch(engine_batch_for(self.gpu, True, self.min_batch, self.max_batch))

    def _refuse_closed(self) -> None:
        if self._closed:
            raise IPIQAError(f"{self.name}: closed; open a new backend (or Scorer) to score again")

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
        """Release engines and buffers; safe to call twice. Later calls are refused (``<name>: closed``)."""
        self._closed = True

    # -- the contract, the same for every backend
    def _check(self, tensor: str, x: Any, rows: Optional[int] = None) -> None:
        self._refuse_closed()  # every public call checks its input first
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
        cut = self.takes_short_tokens and self.engine_batch in (None, 1)  # see the module docstring

        def run(a: int, b: int, size: int) -> np.ndarray:
            rows = _padded(tokens[a:b], size)
            return self._encode_text(np.ascontiguousarray(short_tokens(rows)) if cut else rows)

        return self._over_spans("text_embedding", len(tokens), run)

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
        for start, stop, size in batch_spans(n, self.min_batch, self.max_batch, self.engine_batch):
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
