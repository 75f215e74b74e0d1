"""The per-row rules, in one place: what a missing prompt is, what a bad image is, what a bad score is.

Every entry point (``Scorer.score``, ``Scorer.score_files`` / ``ipiqa score``, the Ray path and Triton's
client) calls these functions, so the same input gives the same output row everywhere.

The rules (README "Row rules" repeats them for users):

- **Prompt.** Missing only when the manifest cell is empty or blank (whitespace only), the JSON value is
  ``null``, the JSON key or CSV column is absent, or (Python API) the value is ``None`` or a float NaN (what
  pandas puts in an empty cell). Any other text is a prompt and is scored as written, including the words
  ``NaN``, ``null`` and ``None``. ``--prompt TEXT`` fills rows whose own prompt is missing; a blank
  ``--prompt`` fills nothing. A model with a text branch gives a missing-prompt row an error, and a prompt
  longer than ``MAX_PROMPT_CHARS`` (8192 characters; CLIP reads its first 77 tokens, about 300 characters)
  too, checked before any clean-up or tokenizing: a multi-megabyte prompt never holds a batch (or a server).
- **Image.** A path that is empty, not a regular file (directory, FIFO, socket, device), unreadable,
  corrupt, truncated, above ``MAX_IMAGE_BYTES`` (64 MiB encoded; ``ipiqa.preprocess.check_encoded_size``,
  checked before the file is read or the bytes decoded) or above Pillow's decompression-bomb limit gives an
  error row naming the cause.
- **Score.** A NaN or infinite score is never written as a number: the row becomes an error row.
- **One bad row never loses the others**: errors are per row; a batch whose backend call fails marks
  that batch's rows and the run goes on.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ipiqa.errors import IPIQAError
# The decoder's gate owns the byte limit (every decode and file read passes it); re-exported as a row rule.
from ipiqa.preprocess import MAX_IMAGE_BYTES, check_encoded_size, read_regular_file

__all__ = ["Row", "Result", "MISSING_PROMPT", "MISSING_IMAGE", "MAX_PROMPT_CHARS", "MAX_IMAGE_BYTES", "clean_prompt", "resolve_prompt", "row_error",
           "load_pixels", "score_error", "scoring_failed", "finish", "check_prompt_source",
           "image_file", "image_bytes"]

MISSING_PROMPT = "missing prompt: IP-IQA scores an image against its prompt; fill the prompt cell (or pass --prompt)"
MISSING_IMAGE = "missing image path"
MAX_PROMPT_CHARS = 8192  # a longer prompt is an error row (see the module docstring)


@dataclass(frozen=True)
class Row:
    """One input row: the image path as given (resolved against a manifest's folder) and its prompt."""

    image: str
    prompt: Optional[str]  # None: missing (see clean_prompt)
    error: Optional[str] = None  # a manifest line that could not be read: kept as an error row
    # The image itself when it is not a file (Python API: a PIL image or decoded array); ``image`` then only
    # labels the row. Never written, never compared.
    source: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Result:
    """One output row: scores, or the error that replaced them (never both)."""

    row: Row
    scores: Optional[tuple[float, ...]] = None
    error: Optional[str] = None


def clean_prompt(value: object) -> Optional[str]:
    """A manifest cell, JSON value or API argument -> the prompt text, or None when it is missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        value = str(value)  # a number in a JSON manifest is text a user typed
    return value if value.strip() else None


def resolve_prompt(value: object, default: Optional[str]) -> Optional[str]:
    """The row's own prompt, else ``default`` (``--prompt``); None when both are missing."""
    own = clean_prompt(value)
    return own if own is not None else clean_prompt(default)


def row_error(row: Row, needs_prompt: bool) -> Optional[str]:
    """Why a row cannot be scored before its image is opened, or None."""
    if row.error is not None:
        return row.error
    if needs_prompt and row.prompt is None:
        return MISSING_PROMPT
    if needs_prompt and len(row.prompt) > MAX_PROMPT_CHARS:
        return (f"prompt of {len(row.prompt)} characters is above the {MAX_PROMPT_CHARS}-character limit "
                "(ipiqa.runtime.rows.MAX_PROMPT_CHARS; CLIP reads only its first 77 tokens): shorten it")
    if not row.image or not str(row.image).strip():
        return MISSING_IMAGE
    return None


def load_pixels(row: Row, resolution: int, needs_prompt: bool, loader) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(pixels, None) or (None, error) for one row; ``loader(path, resolution)`` decodes and resizes.

    Never raises: an unexpected exception from a decoder becomes the row's error, so one file can
    never stop a run.
    """
    error = row_error(row, needs_prompt)
    if error is not None:
        return None, error
    try:
        return loader(row.image, resolution), None
    except IPIQAError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the run
        return None, f"{row.image}: {type(exc).__name__}: {exc}"


def score_error(scores: Sequence[float]) -> Optional[str]:
    """A score row that must not be written as numbers (NaN/inf), or None."""
    values = tuple(float(s) for s in scores)
    if all(math.isfinite(v) for v in values):
        return None
    return f"non-finite score {values}: the model produced NaN/inf for this input"


def scoring_failed(exc: BaseException) -> str:
    """The error of every row in a batch whose backend call raised."""
    return f"scoring failed: {type(exc).__name__}: {exc}"


def finish(row: Row, scores: Optional[Sequence[float]], error: Optional[str]) -> Result:
    """The output row: scores that pass ``score_error``, or the error."""
    if error is None and scores is not None:
        error = score_error(scores)
        if error is None:
            return Result(row, tuple(float(s) for s in scores), None)
    return Result(row, None, error or "not scored")



def check_prompt_source(needs_prompt: bool, has_prompt_column: bool, default: Optional[str], source: object) -> None:
    """Refuse a run that cannot score any row: a text model, no prompt column and no usable --prompt."""
    if needs_prompt and not has_prompt_column and clean_prompt(default) is None:
        raise IPIQAError(f"{source}: no prompts; this model scores an image against its prompt: pass --prompt TEXT "
                         "or a manifest with a 'prompt' column")


def image_file(row: Row) -> Optional[str]:
    """The file a row's image is read from, or None where the image is in memory (shard member, Parquet bytes,
    a Python API image). The one reader of ``row.image`` vs ``row.source`` for every consumer (local pipeline,
    ``--server``, ``--ray``, calibration, report thumbnails): a Parquet row whose image cell holds only a path
    carries that path in ``source`` (its label is ``FILE::ROW``)."""
    if row.source is None:
        return row.image
    if isinstance(row.source, (str, os.PathLike)):
        return os.fspath(row.source)
    return None


def image_bytes(row: Row) -> bytes:
    """The row's encoded image: its in-memory bytes, else its file's (regular files of at most ``MAX_IMAGE_BYTES``
    only; ``ImageError`` names the file otherwise). A decoded Python API image has no encoded bytes and is refused."""
    if isinstance(row.source, (bytes, bytearray, memoryview)):
        check_encoded_size(len(row.source), row.image)
        return bytes(row.source)
    path = image_file(row)
    if path is None:
        raise IPIQAError(f"{row.image}: this row holds a decoded image, not an encoded file; pass a path or bytes")
    return read_regular_file(path)
