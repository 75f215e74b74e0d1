"""Triton's python-backend preprocessing model: IMAGE (encoded bytes) + PROMPT -> image (R, R, 3) UINT8, tokens (L,) INT64.

``write_triton_repository`` puts a two-line ``model.py`` beside the tokenizer that imports ``TritonPythonModel``
from here, so the code Triton runs is this module, which linters and tests see like any other. The server's
Python environment needs ipiqa installed anyway (``pip install ipiqa`` there): the model decodes with
``ipiqa.preprocess`` and tokenizes with ``ipiqa.runtime.tokenizer``, so Triton's scores equal the runtime's.

The rows follow ``ipiqa.runtime.rows``, read as ``ipiqa serve`` reads them (``contract.request_rows``,
``pipeline.decode_row``): a prompt is missing by ``clean_prompt`` (empty or blank; the words NaN/null/None are
prompts) or refused above ``rows.MAX_PROMPT_CHARS``, and an image is decoded and refused as the runtime decodes and
refuses a file.
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
from ipiqa.runtime.pipeline import decode_row
from ipiqa.runtime.tokenizer import ClipTokenizer

from .contract import IMAGE, PROMPT, request_rows

__all__ = ["TritonPythonModel", "MODEL_NAME", "preprocess_request", "decode_image"]

MODEL_NAME = "ipiqa_preprocess"
TOKENIZER_FILE = "tokenizer.json"  # beside model.py, in the model's version folder


def decode_image(blob: bytes, name: str, resolution: int) -> np.ndarray:
    """Encoded image bytes -> uint8 (R, R, 3), by the runtime's rules; ImageError naming ``name`` and the cause."""
    return resized(decode_bytes(blob, name), resolution)


def preprocess_request(blobs: Sequence[object], prompts: Sequence[object], resolution: int,
                       tokenize: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One request's rows -> (images uint8 (B, R, R, 3), tokens int64 (B, L)); IPIQAError with the first bad row's
    error. The rows are ``contract.request_rows``'s and each is decoded by ``pipeline.decode_row``, as ``ipiqa serve``
    reads them: the prompt checked (missing, above the size limit) before the image is opened, and before anything
    is tokenized."""
    rows = request_rows(blobs, prompts)
    images = []
    for row in rows:
        pixels, error = decode_row(row, resolution, needs_prompt=True)
        if error is not None:
            raise IPIQAError(error)
        images.append(pixels)
    return np.stack(images), tokenize([row.prompt for row in rows])


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
                blobs = pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy()
                prompts = pb_utils.get_input_tensor_by_name(request, PROMPT).as_numpy()
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
