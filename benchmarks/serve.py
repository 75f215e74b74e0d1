"""``--sections serve``: requests/s and p50/p99 latency of ``ipiqa serve`` at 1, 4 and 16 concurrent clients, beside
the same bundle and backend scoring the same images locally (``Scorer.score``, the CLI's batch of 8), in one run.

The server runs as its own process (``python -m ipiqa.cli serve``, as a user starts it), so client threads and the
server do not share a GIL; each client is one gRPC connection sending one image file per request.
"""
from __future__ import annotations

import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["ServeRate", "section", "markdown"]
PROMPT = "a red fox in snow"


@dataclass(frozen=True)
class ServeRate:
    """One row of the table: who scored, at what concurrency, how fast, how long a request took."""

    mode: str  # "server" or "local"
    clients: int
    requests: int
    requests_per_s: float
    p50_ms: Optional[float]
    p99_ms: Optional[float]


def _jpegs(n: int, side: int) -> list[bytes]:
    out = []
    for seed in range(n):
        arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start(bundle: Path, backend: str, max_batch: int, delay_ms: float, log: Path) -> tuple[subprocess.Popen, int]:
    import tritonclient.grpc as grpc

    http, grpc_port, metrics = _free_ports(3)
    cmd = [sys.executable, "-m", "ipiqa.cli", "serve", str(bundle), "--backend", backend, "--device", "cpu",
           "--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics),
           "--max-batch", str(max_batch), "--max-queue-delay-ms", str(delay_ms), "--exit-timeout", "5", "--address", "127.0.0.1"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    client = grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ipiqa serve exited ({proc.returncode}); see {log}")
            try:
                if client.is_model_ready("ipiqa"):  # what "ready" means: the model, not the server
                    return proc, grpc_port
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.2)
    finally:
        client.close()
    proc.terminate()
    raise RuntimeError(f"ipiqa serve not ready in 120 s; see {log}")


def _load(port: int, blobs: Sequence[bytes], clients: int, per_client: int) -> ServeRate:
    import tritonclient.grpc as grpc

    from ipiqa.runtime.serve.contract import ERROR, MODEL, build_inputs

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        client = grpc.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            for i in range(per_client):
                blob = blobs[(k * per_client + i) % len(blobs)]
                inputs = build_inputs(grpc, blob, PROMPT)  # the request every ipiqa client sends
                t0 = time.perf_counter()
                answer = client.infer(MODEL, inputs, client_timeout=300)
                dt = time.perf_counter() - t0
                error = answer.as_numpy(ERROR).reshape(-1)[0]
                with lock:
                    latencies.append(dt)
                    if error:
                        errors.append(error.decode())
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors or len(latencies) != clients * per_client:
        raise RuntimeError(f"{len(errors)} errors / {len(latencies)} answers of {clients * per_client}: {errors[:2]}")
    ms = np.asarray(latencies) * 1000
    return ServeRate("server", clients, len(latencies), len(latencies) / wall, float(np.percentile(ms, 50)),
                     float(np.percentile(ms, 99)))


def _local(bundle: Path, backend: str, blobs: Sequence[bytes], n: int) -> ServeRate:
    from ipiqa.runtime.scorer import Scorer

    images = [Image.open(io.BytesIO(blobs[i % len(blobs)])) for i in range(n)]
    with Scorer(bundle, backend=backend, device="cpu") as scorer:
        scorer.score(images[:8], [PROMPT] * 8)  # warm-up
        start = time.perf_counter()
        records = scorer.score(images, [PROMPT] * n, batch_size=8)
        wall = time.perf_counter() - start
    assert all(r["error"] is None for r in records)
    return ServeRate("local", 1, n, n / wall, None, None)


def section(workdir: Path, bundle: Optional[Path] = None, backend: str = "onnxruntime", side: int = 512,
            requests_per_client: int = 16, clients: Sequence[int] = (1, 4, 16), max_batch: int = 16,
            max_queue_delay_ms: float = 2.0) -> dict:
    """Rates at each client count and the local baseline; the dict holds the rows and their ``markdown``.

    ``bundle`` defaults to the reduced-width 64 px model (as the shards section uses): the server's own cost
    (request handling, batching, decode of a ``side`` px JPEG) is what this section measures on CPU machines."""
    from ipiqa.errors import IPIQAError
    from ipiqa.runtime.serve.server import prepare_environment

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        import pytriton  # noqa: F401

        prepare_environment()
    except (ImportError, IPIQAError) as exc:
        return {"skipped": str(exc), "markdown": f"serve: not measured here ({exc})"}
    if bundle is None:
        from .shards import _tiny_bundle

        bundle = _tiny_bundle(workdir / "tiny")
    blobs = _jpegs(16, side)
    proc, port = _start(Path(bundle), backend, max_batch, max_queue_delay_ms, workdir / "serve.log")
    try:
        _load(port, blobs, 2, 4)  # warm-up: sessions, connections
        rows = [_load(port, blobs, c, requests_per_client) for c in clients]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    rows.append(_local(Path(bundle), backend, blobs, max(clients) * requests_per_client))
    from ipiqa.runtime.cpu import usable_cores

    return {"bundle": str(bundle), "backend": backend, "side": side, "cores": usable_cores(),
            "max_batch": max_batch, "max_queue_delay_ms": max_queue_delay_ms,
            "rows": [asdict(r) for r in rows], "markdown": markdown(rows, side, backend)}


def markdown(rows: Sequence[ServeRate], side: int, backend: str) -> str:
    def cell(v: Optional[float]) -> str:
        return "" if v is None else f"{v:.1f}"

    lines = [f"ipiqa serve ({backend}, {side} px JPEG requests) vs the same backend locally", "",
             "| scored by | clients | requests | requests/s | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        who = "ipiqa serve (gRPC)" if r.mode == "server" else "local Scorer.score, batch 8"
        lines.append(f"| {who} | {r.clients} | {r.requests} | {r.requests_per_s:.1f} | {cell(r.p50_ms)} | "
                     f"{cell(r.p99_ms)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json

    out = section(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-serve"),
                  Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(out["markdown"])
    print(json.dumps({k: v for k, v in out.items() if k != "markdown"}, indent=1), file=sys.stderr)
