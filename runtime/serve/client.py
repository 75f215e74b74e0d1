"""``ipiqa score --server HOST:PORT``: a local run's rows, scored by a running ``ipiqa serve`` (or the NGC ensemble).

The rows, the writer, ``--resume`` and the output lock are the local run's (``RowSource``, ``open_output``);
only scoring differs: each row's encoded bytes go to the server as one request, up to ``concurrency`` at once,
and the answers are written in input order. Rows refused before sending (missing prompt, not a regular file,
above the size limits) get the runtime's own text, as ``rows.row_error`` and ``rows.image_bytes`` word it.

Two kinds of failure, never confused:
- **the row's**: the server's per-request ERROR output, or the NGC ensemble's refusal of the request
  (INVALID_ARG, INTERNAL): an error row, and the run goes on.
- **the connection's** (UNAVAILABLE, DEADLINE_EXCEEDED, reset, the server draining or its model not loaded):
  the call is retried with backoff for up to ``retry_s``; past that the run stops with ``ServerUnavailable``:
  every row answered so far is written in input order, nothing for the rest, so ``--resume`` continues it.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from ipiqa._optional import require
from ipiqa.errors import IPIQAError

from ..io import RowSource, writable_rows
from ..io.provenance import Provenance
from ..io.run_output import open_output
from ..pipeline import RunSummary
from ..rows import Result, Row, finish, image_bytes, row_error, scoring_failed
from .contract import ERROR, MODEL, SCORES, NotDescribed, ServedModel, build_inputs, describe, row_answer

__all__ = ["RemoteScorer", "RemoteBackend", "ServerUnavailable", "ServerChanged", "parse_server", "is_connection_failure",
           "RETRY_S"]

RETRY_S = 60.0  # how long a call failing for the connection is retried before the run stops
# gRPC status codes that say nothing about the row: the server is gone, restarting, draining or overloaded.
CONNECTION_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED", "RESOURCE_EXHAUSTED",
                              "NOT_FOUND"})
_FIRST_DELAY_S, _MAX_DELAY_S = 0.25, 4.0
# gRPC reconnects a lost channel with its own backoff (up to 120 s by default): kept short, so a restarted server
# is found within seconds. Message sizes as tritonclient's own defaults.
_CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                 ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                 ("grpc.max_reconnect_backoff_ms", 2000)]


class ServerUnavailable(IPIQAError):
    """The server stopped answering for longer than the retry time: the run stops, its written rows intact."""


class ServerChanged(ServerUnavailable):
    """The server came back describing another model: the run stops, so one output holds one model's scores."""


@dataclass(frozen=True)
class PromptCacheCounts:
    """A local ``Scorer.cache``'s counters, as the CLI's summary line reads them."""

    hits: int = 0
    misses: int = 0


@dataclass(frozen=True)
class RemoteBackend:
    """What ``scorer.backend.name`` says for a remote run (the CLI's summary line prints it)."""

    name: str


def parse_server(address: str) -> str:
    """``HOST:PORT`` (Triton's gRPC port) checked; the URL tritonclient takes."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise IPIQAError(f"--server {address!r}: expected HOST:PORT of the server's gRPC endpoint, e.g. localhost:8001")
    return address


def is_connection_failure(exc: BaseException) -> bool:
    """True when a failed call says nothing about its row (see the module docstring), a server whose description
    model is still loading included; False for the server's answer about the request (INVALID_ARG, INTERNAL, ...)."""
    if isinstance(exc, NotDescribed):  # a restarted server whose description model is still loading
        return True
    status = getattr(exc, "status", None)
    if callable(status):  # tritonclient's InferenceServerException: "StatusCode.UNAVAILABLE"
        code = str(status() or "").rpartition(".")[2]
        return code in CONNECTION_CODES
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def _batches(results: Iterator[Result], size: int) -> Iterator[list[Result]]:
    batch: list[Result] = []
    for result in results:
        batch.append(result)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class RemoteScorer(AbstractContextManager):
    """A running server behind the attributes a local ``Scorer`` run uses: ``outputs``, ``needs_prompt``,
    ``backend.name``, ``score_files`` and ``close``; one row is one request (the server batches them).

    ``timeout_s`` bounds one call; ``retry_s`` how long calls failing for the connection are retried."""

    def __init__(self, address: str, model: str = MODEL, concurrency: int = 8, timeout_s: float = 60.0,
                 retry_s: Optional[float] = None):
        retry_s = RETRY_S if retry_s is None else retry_s
        if concurrency < 1:
            raise IPIQAError(f"--concurrency must be >= 1, got {concurrency}")
        if retry_s < 0:
            raise IPIQAError(f"the retry time must be >= 0 seconds, got {retry_s}")
        self.url, self.model, self.concurrency = parse_server(address), model, concurrency
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self._grpc = require("tritonclient.grpc", extra="serve")
        self._client = self._grpc.InferenceServerClient(self.url, channel_args=_CHANNEL_ARGS)
        self._stopping = threading.Event()
        self.served = self._describe()
        self.outputs, self.needs_prompt = self.served.outputs, self.served.needs_prompt
        digest = (self.served.bundle_sha256 or "unknown")[:12]
        self.backend = RemoteBackend(f"server {self.url} (model {model}, bundle {digest})")
        self._wanted = [self._grpc.InferRequestedOutput(SCORES)]
        if self.served.has_error_output:
            self._wanted.append(self._grpc.InferRequestedOutput(ERROR))

    def _describe(self) -> ServedModel:
        try:
            if not self._client.is_model_ready(self.model):
                raise IPIQAError(f"{self.url}: model {self.model!r} is not ready (is the server still starting? "
                                 f"GET /v2/models/{self.model}/ready says when it is)")
            return describe(self._grpc, self._client, self.url, self.model, self.timeout_s)
        except IPIQAError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable, refused: one line naming the server
            raise IPIQAError(f"{self.url}: cannot reach an ipiqa server ({_one_line(exc)}); start one "
                             "with: ipiqa serve BUNDLE") from None

    # -- one row
    def _infer(self, data: bytes, prompt: Optional[str]) -> Any:
        """The call, retried while it fails for the connection; ``ServerUnavailable`` once ``retry_s`` is spent."""
        deadline, delay = None, _FIRST_DELAY_S
        while True:
            try:
                answer = self._client.infer(self.model, build_inputs(self._grpc, data, prompt),
                                            outputs=self._wanted, client_timeout=self.timeout_s)
                if deadline is not None:  # answered after an outage: is it still the model this run began with?
                    self._check_same_model()
                return answer
            except ServerChanged:
                raise
            except Exception as exc:  # noqa: BLE001 - sorted into the row's failure or the connection's
                if not is_connection_failure(exc):
                    raise
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self.retry_s
                if now >= deadline or self._stopping.is_set():
                    raise ServerUnavailable(f"{self.url}: the server did not answer for {self.retry_s:g} s "
                                            f"({_one_line(exc)})") from None
                self._stopping.wait(min(delay, deadline - now))
                delay = min(2 * delay, _MAX_DELAY_S)

    def _check_same_model(self) -> None:
        """A restarted server may serve another bundle, backend or precision: then the run stops (what differs is
        what ``--resume`` compares: the run record's ``SAME_ON_RESUME`` keys, and the outputs)."""
        now = describe(self._grpc, self._client, self.url, self.model, self.timeout_s)
        was_record, now_record = self.provenance, Provenance.served(self.url, now.provenance, now.bundle_sha256)
        changed = [f"{key} {a} -> {b}" for key, a, b in was_record.differences(now_record)]
        changed += [f"{key} {getattr(self.served, key)} -> {getattr(now, key)}" for key in
                    ("outputs", "needs_prompt", "resolution") if getattr(self.served, key) != getattr(now, key)]
        if changed:
            raise ServerChanged(f"{self.url}: the server came back with another model ({'; '.join(changed)}); "
                                "stopped so that one output holds one model's scores")

    def score_row(self, row: Row) -> Result:
        """One row -> its Result, by the runtime's rules. The server's answer about the row (ERROR, a refused
        request) is the row's error; a lost connection raises ``ServerUnavailable`` after the retries."""
        error = row_error(row, self.needs_prompt)
        if error is not None:
            return finish(row, None, error)
        try:
            data = image_bytes(row)
        except IPIQAError as exc:
            return finish(row, None, str(exc))
        try:
            answer = self._infer(data, row.prompt)
        except ServerUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - the ensemble's refusal of this request: the row's error
            return finish(row, None, scoring_failed(exc))
        scores, why = row_answer(answer.as_numpy(SCORES), answer.as_numpy(ERROR) if self.served.has_error_output
                                 else None, 0, len(self.outputs))
        if why is not None and why.startswith("IMAGE[0]"):
            why = row.image + why[len("IMAGE[0]"):]  # the server names the request's image; the output names the file
        return finish(row, scores, why)

    def iter_results(self, rows: Iterable[Row], window: Optional[int] = None) -> Iterator[Result]:
        """Results in input order, ``concurrency`` requests in flight, at most ``window`` rows held. A
        ``ServerUnavailable`` surfaces at its row's turn: every earlier row has been yielded, no later one is."""
        window = window or 4 * self.concurrency
        self._stopping.clear()
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
                self._stopping.set()  # calls still retrying give up now: the pool's exit does not wait out retry_s
                for f in pending:
                    f.cancel()

    def score_files(self, source: Union[str, Path, RowSource], output: Union[str, Path] = "-",
                    prompt: Optional[str] = None, fmt: Optional[str] = None, batch_size: int = 8, workers: int = 4,
                    resume: bool = False, fail_fast: bool = False,
                    on_results: Callable[[list[Result]], None] = lambda r: None, **_host_only: Any) -> RunSummary:
        """``Scorer.score_files``'s run (same rows, writer, resume, lock and ``on_results`` progress callback) with
        the server scoring; ``ServerUnavailable`` (after the rows answered so far are written) names the
        ``--resume`` command that continues it.

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
        with open_output(output, rows, self.outputs, fmt, resume, self.provenance) as (writer, skipped):
            results = self.iter_results(rows)
            try:
                for batch in _batches(results, batch_size):
                    writer.write(batch)
                    on_results(batch)
                    n, errors = n + len(batch), errors + sum(r.error is not None for r in batch)
                    if fail_fast and errors:
                        stopped = True
                        break
            except ServerUnavailable as exc:
                resume = "" if isinstance(exc, ServerChanged) else self._continue(source.path, output)
                raise type(exc)(f"{exc}; {skipped + n} rows are in {output}{resume}") from None
            finally:
                results.close()
        return replace(RunSummary(rows=n, errors=errors, stopped=stopped), skipped=skipped,
                       seconds=time.perf_counter() - start)

    def _continue(self, images: Path, output: Union[str, Path]) -> str:
        """The command that scores the rest, as the stop line ends."""
        if str(output) == "-":
            return " (stdout); rerun with -o FILE, which --resume can continue"
        return (f"; when the server is back, the same command with --resume scores the rest: ipiqa score --server "
                f"{self.url} --images {images} -o {output} --resume")

    @property
    def provenance(self) -> Provenance:
        """This run's record: the server's own (ipiqa serve publishes its Scorer's), else its bundle hash."""
        return Provenance.served(self.url, self.served.provenance, self.served.bundle_sha256)

    # The CLI's summary line reads a local scorer's prompt cache; the server keeps its own, so none is counted here.
    cache = PromptCacheCounts()

    def close(self) -> None:
        self._client.close()

    def __exit__(self, *exc: object) -> None:  # (AbstractContextManager's __enter__ returns self)
        self.close()
