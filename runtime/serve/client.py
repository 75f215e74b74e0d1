"""``ipiqa score --server HOST:PORT``: a local run's rows, scored by a running ``ipiqa serve`` (or the NGC ensemble).

The rows, the writer, ``--resume`` and the output lock are the local run's (``RowSource``, ``ResultWriter``,
``resume_point``, ``OutputLock``); only scoring differs: each row's encoded bytes go to the server as one request,
up to ``concurrency`` at once, and the answers are written in input order. Rows refused before sending (missing
prompt, not a regular file) get the runtime's own text, as ``rows.row_error`` and ``read_regular_file`` word it.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np

from ipiqa._optional import require
from ipiqa.errors import IPIQAError
from ipiqa.preprocess import read_regular_file

from ..io import RowSource, writable_rows
from ..io.run_output import open_output
from ..pipeline import RunSummary
from ..rows import Result, Row, finish, row_error, scoring_failed
from .contract import ERROR, IMAGE, MODEL, PROMPT, SCORES, ServedModel, row_answer, served_model

__all__ = ["RemoteScorer", "RemoteBackend", "parse_server"]


@dataclass(frozen=True)
class PromptCacheCounts:
    """A local ``Scorer.cache``'s counters, as the CLI's summary line reads them."""

    hits: int = 0
    misses: int = 0


def _batches(results: Iterator[Result], size: int) -> Iterator[list[Result]]:
    batch: list[Result] = []
    for result in results:
        batch.append(result)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def parse_server(address: str) -> str:
    """``HOST:PORT`` (Triton's gRPC port) checked; the URL tritonclient takes."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise IPIQAError(f"--server {address!r}: expected HOST:PORT of the server's gRPC endpoint, e.g. localhost:8001")
    return address


@dataclass(frozen=True)
class RemoteBackend:
    """What ``scorer.backend.name`` says for a remote run (the CLI's summary line prints it)."""

    name: str


class RemoteScorer:
    """A running server behind the attributes a local ``Scorer`` run uses: ``outputs``, ``needs_prompt``,
    ``backend.name``, ``score_files`` and ``close``; one row is one request (the server batches them)."""

    needs_prompt = True  # every served model scores against a prompt (the ensemble requires the text branch)

    def __init__(self, address: str, model: str = MODEL, concurrency: int = 8, timeout_s: float = 60.0):
        if concurrency < 1:
            raise IPIQAError(f"--concurrency must be >= 1, got {concurrency}")
        self.url, self.model, self.concurrency, self.timeout_s = parse_server(address), model, concurrency, timeout_s
        self._grpc = require("tritonclient.grpc", extra="serve")
        self._client = self._grpc.InferenceServerClient(self.url)
        self.served = self._contract()
        self.outputs = self.served.outputs
        digest = (self.served.bundle_sha256 or "unknown")[:12]
        self.backend = RemoteBackend(f"server {self.url} (model {model}, bundle {digest})")

    def _contract(self) -> ServedModel:
        try:
            if not self._client.is_model_ready(self.model):
                raise IPIQAError(f"{self.url}: model {self.model!r} is not ready (is the server still starting?)")
            config = self._client.get_model_config(self.model, as_json=True)
            metadata = self._client.get_model_metadata(self.model, as_json=True)
        except IPIQAError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable, refused: one line naming the server
            raise IPIQAError(f"{self.url}: cannot reach an ipiqa server ({' '.join(str(exc).split())}); start one "
                             "with: ipiqa serve BUNDLE") from None
        return served_model(config, metadata, self.url, self.model)

    # -- one row
    def _inputs(self, image: bytes, prompt: str) -> list[Any]:
        grpc = self._grpc
        inputs = [grpc.InferInput(IMAGE, [1, 1], "BYTES"), grpc.InferInput(PROMPT, [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([[image]], dtype=object))
        inputs[1].set_data_from_numpy(np.array([[prompt.encode("utf-8")]], dtype=object))
        return inputs

    def score_row(self, row: Row) -> Result:
        """One row -> its Result, by the runtime's rules; a failed call is this row's error, never an exception."""
        error = row_error(row, self.needs_prompt)
        if error is not None:
            return finish(row, None, error)
        try:
            data = bytes(row.source) if isinstance(row.source, (bytes, bytearray, memoryview)) \
                else read_regular_file(row.image)
        except IPIQAError as exc:
            return finish(row, None, str(exc))
        outputs = [self._grpc.InferRequestedOutput(SCORES)]
        if self.served.has_error_output:
            outputs.append(self._grpc.InferRequestedOutput(ERROR))
        try:
            answer = self._client.infer(self.model, self._inputs(data, row.prompt or ""), outputs=outputs,
                                        client_timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failed call (or the ensemble's refusal) is this row's error
            return finish(row, None, scoring_failed(exc))  # as runtime.triton_client words it
        scores, why = row_answer(answer.as_numpy(SCORES), answer.as_numpy(ERROR) if self.served.has_error_output
                                 else None, 0, len(self.outputs))
        if why is not None and why.startswith("IMAGE[0]"):
            why = row.image + why[len("IMAGE[0]"):]  # the server names the request's image; the output names the file
        return finish(row, scores, why)

    def iter_results(self, rows: Iterable[Row], window: Optional[int] = None) -> Iterator[Result]:
        """Results in input order, ``concurrency`` requests in flight, at most ``window`` rows held."""
        window = window or 4 * self.concurrency
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="ipiqa-remote") as pool:
            pending: deque[Future] = deque()
            try:
                for row in rows:
                    pending.append(pool.submit(self.score_row, row))
                    if len(pending) >= window:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def score_files(self, source: Union[str, Path, RowSource], output: Union[str, Path] = "-",
                    prompt: Optional[str] = None, fmt: Optional[str] = None, batch_size: int = 8, workers: int = 4,
                    resume: bool = False, fail_fast: bool = False,
                    on_results: Callable[[list[Result]], None] = lambda r: None, **_host_only: Any) -> RunSummary:
        """``Scorer.score_files``'s run (same rows, writer, resume and lock) with the server scoring.

        ``batch_size`` only sets how many rows are written (and flushed) together; ``workers`` is unused (the
        server decodes). ``decode``/``fast_decode`` are host decoding options: given, they are refused."""
        if _host_only.get("decode", "host") != "host" or _host_only.get("fast_decode"):
            raise IPIQAError("--decode device and --fast-decode choose how this machine decodes; with --server the "
                             "server decodes: drop them")
        source = source if isinstance(source, RowSource) else RowSource(source, prompt)
        source.refuse_run(self.needs_prompt, output)
        rows = writable_rows(source)
        start = time.perf_counter()
        n = errors = 0
        stopped = False
        with open_output(output, rows, self.outputs, fmt, resume) as (writer, skipped):
            results = self.iter_results(rows)
            try:
                for batch in _batches(results, batch_size):
                    writer.write(batch)
                    on_results(batch)
                    n, errors = n + len(batch), errors + sum(r.error is not None for r in batch)
                    if fail_fast and errors:
                        stopped = True
                        break
            finally:
                results.close()
        return replace(RunSummary(rows=n, errors=errors, stopped=stopped), skipped=skipped,
                       seconds=time.perf_counter() - start)

    # The CLI's summary line reads a local scorer's prompt cache; the server keeps its own, so none is counted here.
    cache = PromptCacheCounts()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
