"""``ipiqa serve``: the command; the server itself is ``server.py``. Click only at import: PyTriton, numpy and the
backends load inside the command, so ``ipiqa --help`` stays instant."""
from __future__ import annotations

from pathlib import Path

import click

from ipiqa._optional import require
from ipiqa.console import InputPath, device_option, friendly, text_option
from ipiqa.device import DEVICE_HELP
from ipiqa.runtime.cpu import usable_cores

__all__ = ["serve_cmd"]


@click.command("serve")
@click.argument("bundle", type=InputPath(exists=True, file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime", "openvino"]), default="auto",
              show_default=True, help="As for 'ipiqa score'.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8"]), default="auto",
              show_default=True, help="As for 'ipiqa score'.")
@click.option("--device", default="auto", show_default=True, callback=device_option, help=DEVICE_HELP)
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Triton's HTTP/REST port.")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535),
              help="Triton's gRPC port (what 'ipiqa score --server HOST:PORT' connects to).")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535),
              help="Triton's Prometheus metrics port (GET /metrics).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1),
              help="Largest batch Triton's dynamic batcher forms from waiting requests.")
@click.option("--max-queue-delay-ms", default=2.0, show_default=True, type=click.FloatRange(0),
              help="How long the batcher waits for more requests before running a smaller batch.")
@click.option("--workers", default=min(8, usable_cores()), show_default=True, type=click.IntRange(1),
              help="Threads decoding the requests' images.")
@click.option("--address", default="127.0.0.1", show_default=True, callback=text_option,
              help="Interface the endpoints listen on: this machine only by default; --address 0.0.0.0 serves "
                   "other machines (every interface).")
@click.option("--reproducible", is_flag=True,
              help="GPU: every engine call at one fixed batch, so a request's score never depends on the batch the "
                   "dynamic batcher formed from other clients' traffic (on the CPU it always is).")
@click.option("--exit-timeout", default=30, show_default=True, type=click.IntRange(0),
              help="Seconds Ctrl-C / SIGTERM waits for in-flight requests before the server exits.")
@friendly
def serve_cmd(bundle, backend, precision, device, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_ms,
              workers, address, reproducible, exit_timeout) -> None:
    """Serve a BUNDLE as the Triton model 'ipiqa' (Triton Inference Server through PyTriton; ipiqa[serve]).

    Each request is one image file's bytes (IMAGE, BYTES) and its prompt (PROMPT, BYTES); the answer is the
    bundle's scores (SCORES, FP32) and ERROR: empty, or why that request's row was not scored (a corrupt or
    empty image, one above 64 MiB encoded or Pillow's pixel limit, a missing prompt or one above 8192
    characters, refused before decoding or tokenizing: the same text as a local run). Requests waiting together
    are scored as one batch. The model describes itself (outputs, prompts needed, resolution, bundle hash) through
    a second model, ipiqa_describe, which 'ipiqa score --server' reads.

    "ready" is printed once model 'ipiqa' can score: the probe for that is GET /v2/models/ipiqa/ready
    (HTTP 200), not /v2/health/ready (the server, which turns ready seconds earlier). Statistics and metrics are
    Triton's own endpoints (/v2/models/ipiqa/stats, :METRICS/metrics). Ctrl-C or SIGTERM finishes in-flight
    requests, then exits.

    \b
    Examples:
      ipiqa serve bundle/                                   # 127.0.0.1: HTTP 8000, gRPC 8001, metrics 8002
      ipiqa serve bundle/ --address 0.0.0.0                 # reachable from other machines
      ipiqa serve bundle/ --device cuda --max-batch 64 --max-queue-delay-ms 5
      ipiqa score --server localhost:8001 --images data.csv -o scores.csv
      curl -sf localhost:8000/v2/models/ipiqa/ready && curl -s localhost:8002/metrics | grep nv_inference_count
    """
    from ipiqa.runtime.scorer import Scorer
    from ipiqa.runtime.serve.server import READY_PATH, ServeOptions, prepare_environment, serve_forever, start_server

    options = ServeOptions(bundle, backend, precision, device, http_port, grpc_port, metrics_port, max_batch,
                           max_queue_delay_ms, workers, exit_timeout, address)
    require("pytriton", extra="serve")
    prepare_environment()  # before the bundle loads: a refused environment costs nothing
    with Scorer(bundle, backend=backend, device=device, precision=precision, reproducible=reproducible) as scorer:
        triton, handler = start_server(options, scorer)
        click.echo(f"ready: {bundle} as model 'ipiqa' (backend {scorer.backend.name}, outputs "
                   f"{','.join(scorer.outputs)}) on {address}: gRPC :{grpc_port}, HTTP :{http_port} "
                   f"(GET {READY_PATH}), metrics :{metrics_port}; Ctrl-C stops", err=True)
        serve_forever(triton, handler, on_stop=lambda why: click.echo(
            f"{why}: finishing in-flight requests (up to {exit_timeout}s), then exiting", err=True))
    click.echo("server stopped", err=True)
