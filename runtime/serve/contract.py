"""The one contract of both servers (``ipiqa serve``, the NGC repository's ensemble) and both clients
(``ipiqa score --server``, ``triton_client``): tensor names, how a request is built and read, what a server says
about its model.

    model  ipiqa
    in     IMAGE   BYTES [1]  the encoded image file, as read from disk (never decoded by the client)
           PROMPT  BYTES [1]  UTF-8 text
    out    SCORES  FP32  [N]  the bundle's outputs, in the bundle's order
           ERROR   BYTES [1]  ``ipiqa serve`` only: "" or why the row was not scored (``runtime.rows``'s text)

Both servers answer per request, never per batch: a bad row is that request's error. ``ipiqa serve`` puts it in
ERROR (the request itself succeeds, so a batch of good and bad rows still carries every answer); the NGC
ensemble's python model refuses the request (INVALID_ARG) with the same text. ``row_answer`` maps either form to
the runtime's (scores, error) pair, so a client reads both servers alike.

**The description** (``ServedModel``): the score names, whether rows need a prompt, the input resolution, the
SHA-256 of the bundle's ``manifest.json`` (which lists every file's hash) and, from ``ipiqa serve``, its run record
(``io.provenance``: backend, precision, engine batch), as the string parameters
``DESCRIPTION_KEYS``. The ensemble carries them as its ``config.pbtxt`` parameters (written by
``ipiqa-export --triton``); ``ipiqa serve`` answers them from a second model, ``ipiqa_describe`` (PyTriton's public
``bind`` has no config parameters). ``describe`` reads either, through Triton's public endpoints only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ipiqa.errors import IPIQAError

from ..io.provenance import bundle_sha256  # the bundle's identity, as a local run records it
from ..rows import Row, clean_prompt

__all__ = ["MODEL", "DESCRIBE_MODEL", "IMAGE", "PROMPT", "SCORES", "ERROR", "QUERY", "DESCRIPTION",
           "OUTPUTS_PARAMETER", "BUNDLE_PARAMETER", "NEEDS_PROMPT_PARAMETER", "RESOLUTION_PARAMETER", "PROVENANCE_PARAMETER",
           "ServedModel", "NotDescribed", "bundle_sha256", "served_model", "describe", "build_inputs", "request_rows", "row_answer",
           "text"]

MODEL = "ipiqa"
DESCRIBE_MODEL = "ipiqa_describe"  # ipiqa serve only: QUERY (anything) -> DESCRIPTION (the JSON parameters)
IMAGE, PROMPT, SCORES, ERROR = "IMAGE", "PROMPT", "SCORES", "ERROR"
QUERY, DESCRIPTION = "QUERY", "DESCRIPTION"
OUTPUTS_PARAMETER = "ipiqa_outputs"  # comma-separated score names, the order of SCORES
BUNDLE_PARAMETER = "ipiqa_bundle_sha256"  # SHA-256 of the bundle's manifest.json
NEEDS_PROMPT_PARAMETER = "ipiqa_needs_prompt"  # "true": the model has a text branch; "false": image only
RESOLUTION_PARAMETER = "ipiqa_resolution"  # the side the server resizes images to
PROVENANCE_PARAMETER = "ipiqa_provenance"  # ipiqa serve only: its Scorer's run record (io.provenance), as JSON
DESCRIPTION_KEYS = (OUTPUTS_PARAMETER, BUNDLE_PARAMETER, NEEDS_PROMPT_PARAMETER, RESOLUTION_PARAMETER,
                    PROVENANCE_PARAMETER)


class NotDescribed(IPIQAError):
    """The server has model ``ipiqa`` but its description model is not ready (a server still starting)."""


@dataclass(frozen=True)
class ServedModel:
    """What a client reads off a running server once (see the module docstring)."""

    outputs: tuple[str, ...]
    bundle_sha256: Optional[str]
    needs_prompt: bool
    resolution: Optional[int]
    has_error_output: bool  # ipiqa serve: bad rows come back in ERROR; the ensemble refuses the request
    provenance: Optional[str] = None  # ipiqa serve: its run record's JSON (what a --server output records)

    @staticmethod
    def parameters(outputs: Sequence[str], bundle: str, needs_prompt: bool, resolution: int,
                   provenance: Optional[str] = None) -> dict[str, str]:
        """The description as both servers publish it: string parameters keyed by ``DESCRIPTION_KEYS``."""
        params = {OUTPUTS_PARAMETER: ",".join(outputs), BUNDLE_PARAMETER: bundle,
                  NEEDS_PROMPT_PARAMETER: "true" if needs_prompt else "false", RESOLUTION_PARAMETER: str(resolution)}
        return {**params, PROVENANCE_PARAMETER: provenance} if provenance else params


def text(value: object) -> str:
    """A BYTES tensor element (bytes from Triton, str from some clients) as text; undecodable bytes escaped."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, (bytes, bytearray, np.bytes_)) else str(value)


def served_model(params: dict[str, str], output_names: Sequence[str], url: str, model: str = MODEL) -> ServedModel:
    """The description from its parameters and the model's output names (``describe`` reads both)."""
    if SCORES not in output_names:
        raise IPIQAError(f"{url}: model {model!r} has no {SCORES} output (it has {list(output_names)}); "
                         "is it an ipiqa server?")
    if OUTPUTS_PARAMETER not in params:
        raise IPIQAError(f"{url}: model {model!r} does not describe itself (no {OUTPUTS_PARAMETER!r}); serve it "
                         "with this ipiqa's 'ipiqa serve', or rewrite the repository with ipiqa-export --triton")
    resolution = params.get(RESOLUTION_PARAMETER, "")
    return ServedModel(outputs=tuple(s for s in params[OUTPUTS_PARAMETER].split(",") if s),
                       bundle_sha256=params.get(BUNDLE_PARAMETER) or None,
                       needs_prompt=params.get(NEEDS_PROMPT_PARAMETER, "true") != "false",
                       resolution=int(resolution) if resolution.isdigit() else None,
                       has_error_output=ERROR in output_names,
                       provenance=params.get(PROVENANCE_PARAMETER) or None)


def describe(grpc: Any, client: Any, url: str, model: str = MODEL, timeout_s: float = 30.0) -> ServedModel:
    """Ask a running server what it serves: the config parameters of ``model`` (the ensemble), else the
    ``ipiqa_describe`` model's answer (ipiqa serve). ``grpc`` is ``tritonclient.grpc``, ``client`` its client."""
    names = [o["name"] for o in client.get_model_metadata(model, as_json=True).get("outputs", [])]
    config = client.get_model_config(model, as_json=True)
    config = config.get("config", config)
    params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
    if OUTPUTS_PARAMETER not in params and model == MODEL:
        if not client.is_model_ready(DESCRIBE_MODEL):
            raise NotDescribed(f"{url}: model {DESCRIBE_MODEL!r} is not ready: the server is still starting, or it "
                               "is not this ipiqa's 'ipiqa serve' (which answers its description there)")
        query = grpc.InferInput(QUERY, [1], "BYTES")
        query.set_data_from_numpy(np.array([b"describe"], dtype=object))
        answer = client.infer(DESCRIBE_MODEL, [query], client_timeout=timeout_s).as_numpy(DESCRIPTION)
        params = {k: str(v) for k, v in json.loads(text(answer.reshape(-1)[0])).items()}
    return served_model(params, names, url, model)


def build_inputs(grpc: Any, image: bytes, prompt: Optional[str]) -> list[Any]:
    """One row's request: IMAGE (the encoded file) and PROMPT (UTF-8; "" when missing), each BYTES [1, 1]."""
    inputs = [grpc.InferInput(IMAGE, [1, 1], "BYTES"), grpc.InferInput(PROMPT, [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[bytes(image)]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[(prompt or "").encode("utf-8")]], dtype=object))
    return inputs


def request_rows(blobs: Sequence[object], prompts: Sequence[object]) -> list[Row]:
    """One request's tensors -> its rows, as both servers read them: ``IMAGE[i]`` labels, the bytes as the row's
    source, the prompt through ``clean_prompt`` (so the row rules apply as in a local run)."""
    blobs, prompts = np.asarray(blobs, dtype=object).reshape(-1), np.asarray(prompts, dtype=object).reshape(-1)
    if len(blobs) != len(prompts):
        return [Row(f"IMAGE[{i}]", None, error=f"{len(blobs)} images but {len(prompts)} prompts in one request")
                for i in range(max(len(blobs), len(prompts)))]
    return [Row(f"IMAGE[{i}]", clean_prompt(text(p)), source=bytes(b)) for i, (b, p) in enumerate(zip(blobs, prompts))]


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
