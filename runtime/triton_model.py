"""Triton's python-backend preprocessing model: IMAGE (encoded bytes) + PROMPT -> image (R, R, 3) UINT8, tokens (L,) INT64.

``write_triton_repository`` puts a two-line ``model.py`` beside the tokenizer that imports ``TritonPythonModel``
from here, so the code Triton runs is this module, which linters and tests see like any other. The server's
Python environment needs ipiqa installed anyway (``pip install ipiqa`` there): the model decodes with
``ipiqa.preprocess`` and tokenizes with ``ipiqa.runtime.tokenizer``, so Triton's scores equal the runtime's.

The rows follow ``ipiqa.runtime.rows``: a prompt is missing by ``clean_prompt`` (empty or blank; the words
NaN/null/None are prompts), and an image is decoded and refused as the runtime decodes and refuses a file.
Triton answers per request, not per row: a request with one missing prompt or one bad image gets an error
response (the runtime's row text, after this model's name) and the other requests of the batch go on.

``triton_python_backend_utils`` exists only inside Triton's stub process, so it is imported inside the methods
that use it, never at import time; tests put a stand-in in ``sys.modules``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ipiqa.errors import IPIQAError
from ipiqa.preprocess import decode_bytes, resized
from ipiqa.runtime.rows import MISSING_PROMPT, clean_prompt
from ipiqa.runtime.tokenizer import ClipTokenizer

__all__ = ["TritonPythonModel", "MODEL_NAME", "preprocess_request", "decode_image"]

MODEL_NAME = "ipiqa_preprocess"
TOKENIZER_FILE = "tokenizer.json"  # beside model.py, in the model's version folder


def _text(value: object) -> str:
    """A BYTES tensor element (bytes from Triton; str from some clients) as text."""
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def decode_image(blob: bytes, name: str, resolution: int) -> np.ndarray:
    """Encoded image bytes -> uint8 (R, R, 3), by the runtime's rules; ImageError naming ``name`` and the cause."""
    # ``decode_bytes`` is the runtime's own decoder (the torch backend reads bytes through it too): the same mode
    # handling and the same refusals (empty, unreadable, corrupt/truncated, decompression bomb, mode F).
    img = decode_bytes(blob, name)
    return resized(img, resolution)


def preprocess_request(blobs: Sequence[object], prompts: Sequence[object], resolution: int,
                       tokenize: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One request's rows -> (images uint8 (B, R, R, 3), tokens int64 (B, L)); IPIQAError with the row's error.

    Prompts are checked first, as ``rows.row_error`` does, so a missing prompt is reported even when the
    image is bad too. Triton gives both inputs of a request the same batch size.
    """
    texts = [clean_prompt(_text(p)) for p in prompts]
    if any(t is None for t in texts):
        raise IPIQAError(MISSING_PROMPT)
    images = np.stack([decode_image(bytes(b), f"IMAGE[{i}]", resolution) for i, b in enumerate(blobs)])
    return images, tokenize(texts)


def _parameter(config: dict, key: str) -> str:
    try:
        return config["parameters"][key]["string_value"]
    except KeyError:
        raise IPIQAError(f"{MODEL_NAME}/config.pbtxt: parameter {key!r} is missing; rewrite the repository with "
                         "ipiqa-export --triton") from None


class TritonPythonModel:
    """The python-backend contract: ``initialize`` once per instance, ``execute`` per batch of requests."""

    resolution: int
    tokenizer: ClipTokenizer

    def initialize(self, args: dict[str, str]) -> None:
        """Read the resolution and context length from config.pbtxt and the tokenizer beside ``model.py``."""
        config = json.loads(args["model_config"])
        self.resolution = int(_parameter(config, "resolution"))
        path = Path(args["model_repository"]) / args["model_version"] / TOKENIZER_FILE
        if not path.is_file():
            raise IPIQAError(f"{path}: tokenizer file not found; rewrite the repository with ipiqa-export --triton")
        self.tokenizer = ClipTokenizer(path, int(_parameter(config, "context_length")))

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """One response per request, in order: the two tensors, or an error naming the cause."""
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                blobs = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
                prompts = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)
                images, tokens = preprocess_request(blobs, prompts, self.resolution, self.tokenizer)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("image", images), pb_utils.Tensor("tokens", tokens)]))
            except IPIQAError as exc:  # the row's own error, as the runtime writes it: the client sent bad input
                responses.append(_error(pb_utils, str(exc), "INVALID_ARG"))
            except Exception as exc:  # noqa: BLE001 - one bad request must not take the others down
                responses.append(_error(pb_utils, f"{type(exc).__name__}: {exc}", "INTERNAL"))
        return responses

    def finalize(self) -> None:
        """Nothing to release: the tokenizer is plain memory."""


def _error(pb_utils: Any, message: str, code: str) -> Any:
    """An error response; the code (INVALID_ARG -> HTTP 400) where this Triton's TritonError has codes (23.06+)."""
    text = f"{MODEL_NAME}: {message}"
    code_value = getattr(pb_utils.TritonError, code, None)
    error = pb_utils.TritonError(text) if code_value is None else pb_utils.TritonError(text, code_value)
    return pb_utils.InferenceResponse(error=error)
