"""``ipiqa serve``: the bundle's ``Scorer`` as one Triton model, ``ipiqa``, through PyTriton, dynamically batched.

Triton (the real ``tritonserver`` from the ``nvidia-pytriton`` wheel) owns the HTTP/gRPC/metrics endpoints,
readiness, statistics and the dynamic batcher; each batch it forms comes here as a list of requests. Every row
goes through the runtime's own rules (``pipeline.decode_row`` for the encoded bytes, ``pipeline.score_batch`` for
the batch), so a served row equals the local CLI's and one bad row is only its own request's ERROR.

Two facts of this PyTriton (0.7) that the command handles itself:
- Its python-backend stub links ``libpython3.11``; a stub that loads the system's copy under a venv of another
  3.11 build fails (``'_thread.RLock' object has no attribute '_recursion_count'``). ``prepare_environment`` puts
  this interpreter's own ``LIBDIR`` first on ``LD_LIBRARY_PATH`` before the server process starts.
- Its stub reads numpy arrays with numpy 1.x's layout (the wheel pins ``numpy<2``): under numpy 2 every array it
  hands over is garbage. ``prepare_environment`` refuses that environment with the fix.
"""
from __future__ import annotations

import logging
import os
import signal
import sysconfig
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ipiqa._optional import require
from ipiqa.errors import IPIQAError

from ..pipeline import decode_row, score_batch
from ..rows import Result, Row, clean_prompt
from .contract import BUNDLE_PARAMETER, ERROR, IMAGE, MODEL, OUTPUTS_PARAMETER, PROMPT, SCORES, bundle_sha256, text

__all__ = ["ServeOptions", "RequestHandler", "prepare_environment", "start_server", "serve_forever"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """One ``ipiqa serve``: the bundle, how the Scorer runs it, Triton's ports and its batcher."""

    bundle: Path
    backend: str = "auto"
    precision: str = "auto"
    device: str = "auto"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 32  # rows per batch Triton forms (and per request)
    max_queue_delay_ms: float = 2.0  # how long the batcher waits to fill a batch
    workers: int = 4  # decode threads
    exit_timeout_s: int = 30  # how long stopping waits for in-flight requests
    address: str = "0.0.0.0"  # the interface all three endpoints listen on (127.0.0.1: this machine only)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise IPIQAError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_queue_delay_ms < 0:
            raise IPIQAError(f"--max-queue-delay-ms must be >= 0, got {self.max_queue_delay_ms}")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise IPIQAError(f"the HTTP, gRPC and metrics ports must be three different ports in 1..65535, got {ports}")


def prepare_environment() -> None:
    """Make the server process PyTriton starts able to run its python stub here (see the module docstring)."""
    major = int(np.__version__.split(".")[0])
    if major >= 2:
        raise IPIQAError(f"ipiqa serve: PyTriton's python stub needs numpy<2 (it reads arrays with numpy 1.x's "
                         f"layout), and numpy {np.__version__} is installed; install the serve extra into its own "
                         "environment: pip install 'ipiqa[serve]' (it resolves numpy<2), or pip install 'numpy<2'")
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return  # a static interpreter: the stub loads the system libpython, which is then the only one
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if paths[:1] != [libdir]:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *[p for p in paths if p != libdir]])


class RequestHandler:
    """PyTriton's inference callable: a batch of requests in, one answer per request out, in order."""

    def __init__(self, scorer: Any, workers: int = 4):
        self.scorer = scorer
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ipiqa-decode")

    def _rows(self, request: Any) -> list[Row]:
        blobs = np.asarray(request[IMAGE]).reshape(-1)
        prompts = np.asarray(request[PROMPT]).reshape(-1)
        if len(blobs) != len(prompts):
            return [Row(f"IMAGE[{i}]", None, error=f"{len(blobs)} images but {len(prompts)} prompts in one request")
                    for i in range(max(len(blobs), len(prompts)))]
        return [Row(f"IMAGE[{i}]", clean_prompt(text(p)), source=bytes(b)) for i, (b, p) in enumerate(zip(blobs, prompts))]

    def results(self, requests: Sequence[Any]) -> list[list[Result]]:
        """Each request's rows' results: decoded in the pool, the batch's good rows scored in one backend call."""
        per_request = [self._rows(r) for r in requests]
        rows = [row for group in per_request for row in group]
        res, needs_prompt = self.scorer.resolution, self.scorer.needs_prompt
        decoded = list(self.pool.map(lambda row: decode_row(row, res, needs_prompt), rows))
        flat = score_batch(self.scorer, rows, decoded) if rows else []
        out, start = [], 0
        for group in per_request:
            out.append(flat[start:start + len(group)])
            start += len(group)
        return out

    def __call__(self, requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        n = len(self.scorer.outputs)
        answers = []
        for results in self.results(requests):
            scores = np.full((len(results), n), np.nan, dtype=np.float32)
            errors = np.empty((len(results), 1), dtype=object)
            for i, r in enumerate(results):
                if r.scores is not None:
                    scores[i] = r.scores
                errors[i, 0] = (r.error or "").encode("utf-8", "backslashreplace")
            answers.append({SCORES: scores, ERROR: errors})
        return answers

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _add_parameters(triton: Any, parameters: dict[str, str]) -> None:
    """The score names and bundle hash in the model's config (Triton's model-config endpoint shows them).

    PyTriton's ``bind`` takes no config parameters; its model keeps a ``TritonModelConfig`` whose
    ``backend_parameters`` become them. Reaching it is PyTriton-internal, so a PyTriton that moved it is named."""
    try:
        for model in triton._model_manager.models:  # noqa: SLF001 - see the docstring
            model._get_triton_model_config().backend_parameters.update(parameters)  # noqa: SLF001
    except AttributeError as exc:
        raise IPIQAError(f"this nvidia-pytriton has no model config to name the outputs in ({exc}); "
                         "install the version the serve extra pins") from None


def _security() -> dict[str, Any]:
    """PyTriton (0.7+) protects the statistics endpoint with a random token by default; the statistics (batch
    sizes, queue times) are this server's monitoring, so they stay readable. Model loading and shared memory
    stay protected."""
    try:
        from pytriton.triton import TritonSecurityConfig
    except ImportError:  # older PyTriton: no restrictions at all
        return {}
    return {"security_config": TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])}


def start_server(options: ServeOptions, scorer: Any) -> tuple[Any, RequestHandler]:
    """Bind ``scorer`` and start Triton; returns (the running ``pytriton.triton.Triton``, its handler).

    The caller stops both (``triton.stop()``, ``handler.close()``); ``serve_forever`` does it on a signal."""
    require("pytriton", extra="serve")
    prepare_environment()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(http_port=options.http_port, grpc_port=options.grpc_port,
                          metrics_port=options.metrics_port, exit_timeout_secs=options.exit_timeout_s,
                          http_address=options.address, grpc_address=options.address,
                          metrics_address=options.address)
    handler = RequestHandler(scorer, options.workers)
    triton = Triton(config=config, **_security())
    try:
        triton.bind(
            model_name=MODEL, infer_func=handler,
            inputs=[Tensor(name=IMAGE, dtype=object, shape=(1,)), Tensor(name=PROMPT, dtype=object, shape=(1,))],
            outputs=[Tensor(name=SCORES, dtype=np.float32, shape=(len(scorer.outputs),)),
                     Tensor(name=ERROR, dtype=object, shape=(1,))],
            config=ModelConfig(max_batch_size=options.max_batch, batcher=DynamicBatcher(
                max_queue_delay_microseconds=int(options.max_queue_delay_ms * 1000))),
            strict=True)
        _add_parameters(triton, {OUTPUTS_PARAMETER: ",".join(scorer.outputs),
                                 BUNDLE_PARAMETER: bundle_sha256(options.bundle)})
        triton.run()
    except BaseException:
        triton.stop()
        handler.close()
        raise
    return triton, handler


def serve_forever(triton: Any, handler: RequestHandler, on_stop: Callable[[str], None] = lambda why: None) -> None:
    """Block until SIGINT or SIGTERM (or the server dies), then stop: Triton finishes in-flight requests
    (up to its exit timeout) before the process exits."""
    stop = threading.Event()
    reason = {"why": "the server process ended"}

    def on_signal(signum: int, _frame: object) -> None:
        reason["why"] = signal.Signals(signum).name
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            if not triton.is_alive():
                break
    finally:
        on_stop(reason["why"])
        try:
            triton.stop()  # tritonserver drains in-flight requests, then exits
        finally:
            handler.close()
            for s, h in previous.items():
                signal.signal(s, h)
