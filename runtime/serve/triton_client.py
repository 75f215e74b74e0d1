"""Score one image with the ``ipiqa`` ensemble (or ``ipiqa serve``: the same contract) on a running Triton server.

    python -m ipiqa.runtime.serve.triton_client IMAGE "PROMPT" [--url localhost:8001] [--outputs quality,alignment]

(``client.py`` beside a written repository runs this with the bundle's output names.) It speaks gRPC through
``tritonclient.grpc``, the client the ``triton`` extra installs (``pip install 'ipiqa[triton]'``).

The answer is the runtime's record, ``{output: score, ..., "error": None}``, or the outputs as None and
``error`` saying why, by ``ipiqa.runtime.rows``: a missing prompt and an unreadable file are refused here,
before anything is sent, with the runtime's own text; what the server refuses (a corrupt image) or a failed
call becomes the error as a failed batch does in the runtime.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ipiqa._optional import require
from ipiqa.config import IPIQAConfig
from ipiqa.errors import IPIQAError
from ipiqa.runtime.rows import Row, clean_prompt, finish, image_bytes, row_error, scoring_failed

from .contract import ERROR, MODEL, SCORES, build_inputs, row_answer

__all__ = ["score", "main", "ENSEMBLE", "DEFAULT_URL", "DEFAULT_OUTPUTS"]

ENSEMBLE = MODEL  # the ensemble model's name in the repository, and ipiqa serve's model
DEFAULT_URL = "localhost:8001"  # Triton's gRPC port
DEFAULT_OUTPUTS = IPIQAConfig().outputs  # the authors' model; a repository's client.py passes its bundle's names


def score(url: str, image_path: Union[str, Path], prompt: Optional[str], *,
          outputs: Sequence[str] = DEFAULT_OUTPUTS, model: str = ENSEMBLE) -> dict[str, Any]:
    """One image and its prompt -> ``{output: score, ..., "error": None | str}``, as ``Scorer.score`` gives."""
    row = Row(str(image_path), clean_prompt(prompt))
    error = row_error(row, needs_prompt=True)
    values = None
    if error is None:
        try:
            data = image_bytes(row)  # FIFOs/devices and oversized files refused, worded as the runtime's
        except IPIQAError as exc:
            error = str(exc)
    if error is None:
        values, error = _infer(url, model, data, row.prompt or "")
        if values is not None and len(values) != len(outputs):
            raise IPIQAError(f"{url}: model {model!r} gives {len(values)} scores but outputs names {list(outputs)}; "
                             "pass the bundle's output names (client.py beside the repository has them)")
    result = finish(row, values, error)
    scores = result.scores if result.scores is not None else (None,) * len(outputs)
    return {**dict(zip(outputs, scores)), "error": result.error}


def _infer(url: str, model: str, image: bytes, prompt: str) -> tuple[Optional[list[float]], Optional[str]]:
    """(scores, None), or (None, why) when the server refused the request or could not be reached."""
    grpc = require("tritonclient.grpc", extra="triton")
    client = grpc.InferenceServerClient(url)
    try:
        # ipiqa serve answers a bad row in ERROR; the ensemble (no ERROR output) refuses the request instead
        names = [o["name"] for o in client.get_model_metadata(model, as_json=True).get("outputs", [])]
        wanted = [SCORES] + ([ERROR] if ERROR in names else [])
        result = client.infer(model, build_inputs(grpc, image, prompt),
                              outputs=[grpc.InferRequestedOutput(n) for n in wanted])
        scores = result.as_numpy(SCORES)
        return row_answer(scores, result.as_numpy(ERROR) if ERROR in wanted else None, 0, scores.reshape(-1).size)
    except Exception as exc:  # noqa: BLE001 - a failed call is this row's error, as a failed batch is in the runtime
        return None, scoring_failed(exc)
    finally:
        client.close()


def main(argv: Optional[Sequence[str]] = None, outputs: Sequence[str] = DEFAULT_OUTPUTS) -> int:
    """Print the record as JSON; exit status 1 when the row has an error."""
    p = argparse.ArgumentParser(prog="python -m ipiqa.runtime.serve.triton_client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image")
    p.add_argument("prompt")
    p.add_argument("--url", default=DEFAULT_URL, help="Triton's gRPC address (default %(default)s)")
    p.add_argument("--model", default=ENSEMBLE)
    p.add_argument("--outputs", default=",".join(outputs), help="score names, in the model's order (default %(default)s)")
    args = p.parse_args(argv)
    try:
        record = score(args.url, args.image, args.prompt, outputs=args.outputs.split(","), model=args.model)
    except IPIQAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 1 if record["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
