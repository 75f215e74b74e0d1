"""``ipiqa serve`` as a user runs it (its own process, the real tritonserver), killed with SIGKILL while
``ipiqa score --server`` runs, then restarted: the rows written stay, none is an error row, ``--resume`` writes
every row exactly once, with the local run's scores. Also: the command says "ready" only when model ``ipiqa``
answers ready, and an image-only bundle serves a folder without a prompt.

Each server start is about 3-5 s on 2 cores; every server is killed in a finalizer, also when a test fails.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytriton", reason="the real-server tests need ipiqa[serve] (nvidia-pytriton)")
pytest.importorskip("tritonclient.grpc", reason="the real-server tests need ipiqa[serve] (tritonclient)")
if int(np.__version__.split(".")[0]) >= 2:
    pytest.skip(f"PyTriton's python stub needs numpy<2 (numpy {np.__version__} here)", allow_module_level=True)

from click.testing import CliRunner  # noqa: E402

from conftest import TINY, read_csv  # noqa: E402
from serve_ports import free_ports as _free_ports, port_free as _port_free  # noqa: E402
from ipiqa.cli import cli  # noqa: E402
from ipiqa.runtime.io import RowSource  # noqa: E402
from ipiqa.runtime.scorer import Scorer  # noqa: E402
from ipiqa.runtime.serve.client import RemoteScorer, ServerUnavailable  # noqa: E402

PROMPT = "a red fox"
N_IMAGES = 160  # the kill comes after the first written batch: most rows are still to be sent


class Served:
    """``ipiqa serve BUNDLE`` in its own process group (so SIGKILL reaches every process of it)."""

    def __init__(self, bundle: Path, ports: list[int], log: Path):
        self.ports, self.log = ports, log
        deadline = time.monotonic() + 60
        while not all(_port_free(p) for p in ports):  # a stopped server's tritonserver may still be exiting
            if time.monotonic() > deadline:
                pytest.fail(f"ports {ports} still taken 60 s after the previous server was killed")
            time.sleep(0.2)
        http, grpc_port, metrics = ports
        command = [sys.executable, "-c", "from ipiqa.cli import main; main()", "serve", str(bundle),
                   "--backend", "onnxruntime", "--device", "cpu", "--http-port", str(http), "--grpc-port",
                   str(grpc_port), "--metrics-port", str(metrics), "--exit-timeout", "2", "--workers", "2"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)
        self.url = f"127.0.0.1:{grpc_port}"
        self.ready_at_line = self._wait_ready()

    def _wait_ready(self) -> bool:
        """Wait for the command's "ready:" line; then whether the model probe answered 200 at that moment."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            if b"ready: " in self.log.read_bytes():
                url = f"http://127.0.0.1:{self.ports[0]}/v2/models/ipiqa/ready"
                with urllib.request.urlopen(url, timeout=10) as answer:
                    return answer.status == 200
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"ipiqa serve did not say ready: {self.log.read_text(errors='replace')[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to the whole process group: the command, its tritonserver and the python stubs."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)


@pytest.fixture
def servers(tmp_path):
    """Start servers with ``servers(bundle, ports)``; all of them are killed at the end."""
    started: list[Served] = []

    def start(bundle: Path, ports: list[int]) -> Served:
        served = Served(bundle, ports, tmp_path / f"serve{len(started)}.log")
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("outage_images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        (d / f"img{i:03d}.png").write_bytes(buf.getvalue())
    return d


@pytest.fixture(scope="module")
def local_rows(tiny_bundle, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("outage_local") / "local.csv"
    with Scorer(tiny_bundle, backend="onnxruntime", device="cpu") as scorer:
        scorer.score_files(RowSource(images, PROMPT), out)
    return read_csv(out)


def _assert_local_scores(rows: list[dict], local: list[dict]) -> None:
    assert [r["image"] for r in rows] == [r["image"] for r in local]  # every row once, in input order
    assert all(r["error"] == "" for r in rows)
    for a, b in zip(rows, local):
        for name in ("quality", "alignment"):
            assert float(a[name]) == float(b[name]), (a, b)  # one engine batch: exactly the local scores


def test_serve_says_ready_only_when_model_ipiqa_is_ready(servers, tiny_bundle):
    served = servers(tiny_bundle, _free_ports(3))
    assert served.ready_at_line, "the ready line came before GET /v2/models/ipiqa/ready answered 200"


def test_a_killed_server_stops_the_run_and_resume_after_restart_writes_every_row_once(
        servers, tiny_bundle, images, local_rows, tmp_path):
    ports = _free_ports(3)
    served = servers(tiny_bundle, ports)
    out = tmp_path / "remote.csv"

    def kill_after_first_batch(batch) -> None:
        served.kill()

    with RemoteScorer(served.url, retry_s=2) as scorer, pytest.raises(ServerUnavailable) as stop:
        scorer.score_files(RowSource(images, PROMPT), out, batch_size=4, on_results=kill_after_first_batch)
    assert served.url in str(stop.value) and "--resume" in str(stop.value)
    written = read_csv(out)
    assert 4 <= len(written) < N_IMAGES and all(r["error"] == "" for r in written)  # no row became an error

    restarted = servers(tiny_bundle, ports)
    with RemoteScorer(restarted.url) as scorer:
        summary = scorer.score_files(RowSource(images, PROMPT), out, resume=True)
    assert summary.skipped == len(written) and summary.errors == 0
    _assert_local_scores(read_csv(out), local_rows)


def test_a_server_restarted_within_the_retry_time_finishes_the_run_without_error_rows(
        servers, tiny_bundle, images, local_rows, tmp_path):
    ports = _free_ports(3)
    served = servers(tiny_bundle, ports)
    restart: list[threading.Thread] = []

    def kill_and_restart(batch) -> None:
        if not restart:
            served.kill()
            restart.append(threading.Thread(target=servers, args=(tiny_bundle, ports), daemon=True))
            restart[0].start()

    out = tmp_path / "remote.csv"
    with RemoteScorer(served.url, retry_s=120) as scorer:
        summary = scorer.score_files(RowSource(images, PROMPT), out, batch_size=4, on_results=kill_and_restart)
    restart[0].join(120)
    assert summary.rows == N_IMAGES and summary.errors == 0
    _assert_local_scores(read_csv(out), local_rows)


@pytest.fixture(scope="module")
def image_only_bundle(tmp_path_factory):
    from ipiqa.checkpoint import save_model
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import demo_model
    from ipiqa.export.bundle_export import ExportOptions, export_bundle

    cfg = IPIQAConfig(**{**TINY, "text": False})
    d = tmp_path_factory.mktemp("image_only")
    model = demo_model(cfg, seed=1)
    src = save_model(d / "m.safetensors", model.state_dict(), cfg)
    export_bundle(model, [src], d / "bundle", ExportOptions(onnx_only=True), progress=lambda m: None)
    return d / "bundle"


def test_an_image_only_bundle_serves_a_folder_without_a_prompt(servers, image_only_bundle, images, tmp_path):
    served = servers(image_only_bundle, _free_ports(3))
    out = tmp_path / "remote.csv"
    result = CliRunner().invoke(cli, ["score", "--server", served.url, "--images", str(images), "-o", str(out), "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert len(rows) == N_IMAGES and all(r["error"] == "" for r in rows)
