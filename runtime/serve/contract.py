"""The one client contract of ``ipiqa serve`` and of the written model repository's ensemble.

    model  ipiqa
    in     IMAGE   BYTES [1]  the encoded image file, as read from disk (never decoded by the client)
           PROMPT  BYTES [1]  UTF-8 text
    out    SCORES  FP32  [N]  the bundle's outputs, in the bundle's order (``parameters['ipiqa_outputs']``)
           ERROR   BYTES [1]  ``ipiqa serve`` only: "" or why the row was not scored (``runtime.rows``'s text)

Both servers answer per request, never per batch: a bad row is that request's error. ``ipiqa serve`` puts it in
ERROR (the request itself succeeds, so a batch of good and bad rows still carries every answer); the NGC
ensemble's python model refuses the request (INVALID_ARG) with the same text. ``row_answer`` maps either form to
the runtime's (scores, error) pair, so a client reads both servers alike. Both models' configs carry the bundle's
output names and the SHA-256 of its ``manifest.json`` (which lists every file's hash) as parameters.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ipiqa.errors import IPIQAError

__all__ = ["MODEL", "IMAGE", "PROMPT", "SCORES", "ERROR", "OUTPUTS_PARAMETER", "BUNDLE_PARAMETER", "ServedModel",
           "bundle_sha256", "served_model", "row_answer", "text"]

MODEL = "ipiqa"
IMAGE, PROMPT, SCORES, ERROR = "IMAGE", "PROMPT", "SCORES", "ERROR"
OUTPUTS_PARAMETER = "ipiqa_outputs"  # comma-separated score names, the order of SCORES
BUNDLE_PARAMETER = "ipiqa_bundle_sha256"  # SHA-256 of the bundle's manifest.json


@dataclass(frozen=True)
class ServedModel:
    """What a client reads off a running server once: the score names, the bundle it serves, whether it has ERROR."""

    outputs: tuple[str, ...]
    bundle_sha256: Optional[str]
    has_error_output: bool


def bundle_sha256(root: Union[str, Path]) -> str:
    """The bundle's identity: the hash of its manifest, which holds every file's own hash."""
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()


def text(value: object) -> str:
    """A BYTES tensor element (bytes from Triton, str from some clients) as text; undecodable bytes escaped."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, (bytes, bytearray, np.bytes_)) else str(value)


def served_model(config: dict[str, Any], metadata: dict[str, Any], url: str, model: str = MODEL) -> ServedModel:
    """The contract as a server states it: ``config``/``metadata`` are tritonclient's ``as_json=True`` answers."""
    config = config.get("config", config)
    params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
    names = [o["name"] for o in metadata.get("outputs", [])]
    if SCORES not in names:
        raise IPIQAError(f"{url}: model {model!r} has no {SCORES} output (it has {names}); is it an ipiqa server?")
    if OUTPUTS_PARAMETER not in params:
        raise IPIQAError(f"{url}: model {model!r} does not name its outputs (config parameter {OUTPUTS_PARAMETER!r}); "
                         "serve it with 'ipiqa serve' or write the repository with this ipiqa (ipiqa-export --triton)")
    outputs = tuple(s for s in params[OUTPUTS_PARAMETER].split(",") if s)
    return ServedModel(outputs, params.get(BUNDLE_PARAMETER) or None, ERROR in names)


def row_answer(scores: Optional[np.ndarray], errors: Optional[np.ndarray], index: int,
               num_outputs: int) -> tuple[Optional[Sequence[float]], Optional[str]]:
    """Row ``index`` of a successful response -> (scores, None) or (None, the server's row error)."""
    if errors is not None:
        why = text(errors.reshape(-1)[index])
        if why:
            return None, why
    if scores is None:
        return None, "the server answered without SCORES"
    row = scores.reshape(-1, num_outputs)[index]
    return [float(v) for v in row], None
