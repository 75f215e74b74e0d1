"""``ipiqa serve``: the bundle's ``Scorer`` as one Triton model, ``ipiqa``, through PyTriton, dynamically batched.

Triton (the real ``tritonserver`` from the ``nvidia-pytriton`` wheel) owns the HTTP/gRPC/metrics endpoints,
readiness, statistics and the dynamic batcher; each batch it forms goes to ``handler.RequestHandler``. A second,
unbatched model, ``ipiqa_describe``, answers the model's description (``contract``: outputs, prompts, resolution,
bundle hash): PyTriton's public ``bind`` takes no config parameters, so the description is an answer, not a
config field. Only PyTriton's public API is used (``Triton``, ``bind``, ``ModelConfig``, ``Tensor``).

This module: the options, the two models' configs (``start_server``), readiness (``wait_until_ready``: model
``ipiqa`` ready, not only the server) and the signal loop (``serve_forever``). The process environment is
``environment``'s.
"""
from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ipiqa._optional import require
from ipiqa.errors import IPIQAError

from .contract import (DESCRIBE_MODEL, DESCRIPTION, ERROR, IMAGE, MODEL, PROMPT, QUERY, SCORES, ServedModel,
                       bundle_sha256)
from .environment import prepare_environment
from .handler import RequestHandler

__all__ = ["ServeOptions", "RequestHandler", "prepare_environment", "start_server", "wait_until_ready",
           "serve_forever", "READY_PATH"]

READY_PATH = f"/v2/models/{MODEL}/ready"  # the probe that means "can score" (/v2/health/ready comes earlier)


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
    address: str = "127.0.0.1"  # the interface all three endpoints listen on (0.0.0.0: every machine)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise IPIQAError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_queue_delay_ms < 0:
            raise IPIQAError(f"--max-queue-delay-ms must be >= 0, got {self.max_queue_delay_ms}")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise IPIQAError(f"the HTTP, gRPC and metrics ports must be three different ports in 1..65535, got {ports}")

    @property
    def probe_host(self) -> str:
        """Where this machine reaches the endpoints (a wildcard address is reached on loopback)."""
        if self.address in ("0.0.0.0", ""):
            return "127.0.0.1"
        if self.address == "::":
            return "[::1]"
        return f"[{self.address}]" if ":" in self.address else self.address


def describer(description: dict[str, str]) -> Callable[[Sequence[Any]], list[dict[str, np.ndarray]]]:
    """``ipiqa_describe``'s inference callable: every request gets the description as one JSON string."""
    answer = np.array([json.dumps(description).encode("utf-8")], dtype=object)
    return lambda requests: [{DESCRIPTION: answer} for _ in requests]


def _security() -> dict[str, Any]:
    """PyTriton (0.7+) protects the statistics endpoint with a random token by default; the statistics (batch
    sizes, queue times) are this server's monitoring, so they stay readable. Model loading and shared memory
    stay protected."""
    from pytriton.triton import TritonSecurityConfig

    return {"security_config": TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])}


def start_server(options: ServeOptions, scorer: Any) -> tuple[Any, RequestHandler]:
    """Bind ``scorer`` (model ``ipiqa``) and its description (``ipiqa_describe``), start Triton and wait until
    both models are ready; returns (the running ``pytriton.triton.Triton``, the handler).

    The caller stops both (``triton.stop()``, ``handler.close()``); ``serve_forever`` does it on a signal."""
    require("pytriton", extra="serve")
    prepare_environment()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(http_port=options.http_port, grpc_port=options.grpc_port,
                          metrics_port=options.metrics_port, exit_timeout_secs=options.exit_timeout_s,
                          http_address=options.address, grpc_address=options.address,
                          metrics_address=options.address)
    description = ServedModel.parameters(scorer.outputs, bundle_sha256(options.bundle), scorer.needs_prompt,
                                         scorer.resolution, scorer.provenance.to_json())
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
        triton.bind(model_name=DESCRIBE_MODEL, infer_func=describer(description),
                    inputs=[Tensor(name=QUERY, dtype=object, shape=(1,))],
                    outputs=[Tensor(name=DESCRIPTION, dtype=object, shape=(1,))],
                    config=ModelConfig(batching=False), strict=True)
        triton.run()
        wait_until_ready(options)
    except BaseException:
        triton.stop()
        handler.close()
        raise
    return triton, handler


def wait_until_ready(options: ServeOptions, timeout_s: float = 120.0) -> None:
    """Block until ``GET /v2/models/ipiqa/ready`` (and ``ipiqa_describe``'s) answers 200: model ready, not only
    the server (``/v2/health/ready`` turns ready seconds before the model does)."""
    deadline = time.monotonic() + timeout_s
    base = f"http://{options.probe_host}:{options.http_port}"
    for path in (READY_PATH, f"/v2/models/{DESCRIBE_MODEL}/ready"):
        while True:
            try:
                with urllib.request.urlopen(base + path, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise IPIQAError(f"{base}{path}: the model is not ready after {timeout_s:.0f}s; see the server log "
                                 "above")
            time.sleep(0.1)


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
