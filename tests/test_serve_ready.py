"""``ipiqa serve``'s readiness and defaults, without a server: "ready" means model ``ipiqa`` answers
``GET /v2/models/ipiqa/ready`` (a stand-in HTTP server plays Triton), and the command listens on loopback unless
told ``--address 0.0.0.0``."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from ipiqa.cli import cli
from ipiqa.errors import IPIQAError
from ipiqa.runtime.serve.server import READY_PATH, ServeOptions, wait_until_ready


@pytest.fixture
def triton():
    """A stand-in for Triton's HTTP endpoint: the server is ready at once, model ``ipiqa`` after ``model_after``
    probes (None: never)."""
    state = {"model_after": 5, "model_probes": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ready = True
            if self.path == READY_PATH:
                state["model_probes"] += 1
                ready = state["model_after"] is not None and state["model_probes"] > state["model_after"]
            self.send_response(200 if ready else 400)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], state
    server.shutdown()
    server.server_close()


def _options(tmp_path, http_port: int) -> ServeOptions:
    return ServeOptions(tmp_path, http_port=http_port, grpc_port=1, metrics_port=2)


def test_ready_waits_for_model_ipiqa_not_for_the_servers_health(triton, tmp_path):
    port, state = triton
    wait_until_ready(_options(tmp_path, port), timeout_s=30)
    assert state["model_probes"] == 6  # five "not ready" answers, then ready


def test_a_model_that_never_gets_ready_is_one_line_naming_the_probe(triton, tmp_path):
    port, state = triton
    state["model_after"] = None
    with pytest.raises(IPIQAError, match="/v2/models/ipiqa/ready: the model is not ready"):
        wait_until_ready(_options(tmp_path, port), timeout_s=0.5)


def test_serve_listens_on_loopback_by_default(tmp_path):
    assert ServeOptions(tmp_path).address == "127.0.0.1"


def test_serve_help_names_the_model_probe_and_how_to_serve_other_machines():
    text = " ".join(CliRunner().invoke(cli, ["serve", "--help"]).output.split())
    assert "/v2/models/ipiqa/ready" in text and "--address 0.0.0.0" in text and "[default: 127.0.0.1]" in text
