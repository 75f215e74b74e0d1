"""``ipiqa serve`` against the real Triton server (PyTriton's tritonserver) on loopback, started here on free ports.

Two servers per run at most (about 3 s to start each on 2 cores): the module's shared one and the drain test's own.
Every client call has a timeout and every server is stopped in a finalizer, also when a test fails.
"""
from __future__ import annotations

import io
import os
import socket
import struct
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("pytriton", reason="the real-server tests need ipiqa[serve] (nvidia-pytriton)")
grpc = pytest.importorskip("tritonclient.grpc", reason="the real-server tests need ipiqa[serve] (tritonclient)")
if int(np.__version__.split(".")[0]) >= 2:
    pytest.skip(f"PyTriton's python stub needs numpy<2 (numpy {np.__version__} here; ipiqa[serve] resolves numpy<2)",
                allow_module_level=True)

from conftest import make_image, read_csv  # noqa: E402
from serve_ports import free_ports as _free_ports  # noqa: E402
from ipiqa.cli import cli  # noqa: E402
from ipiqa.errors import IPIQAError  # noqa: E402
from ipiqa.runtime.rows import MISSING_PROMPT, Row  # noqa: E402
from ipiqa.runtime.scorer import Scorer  # noqa: E402
from ipiqa.runtime.serve import server as serve_server  # noqa: E402
from ipiqa.runtime.serve.client import RemoteScorer  # noqa: E402
from ipiqa.runtime.serve.contract import (DESCRIBE_MODEL, ERROR, IMAGE, MODEL, PROMPT, SCORES,  # noqa: E402
                                          bundle_sha256, describe)
from ipiqa.runtime.serve.server import ServeOptions, serve_forever, start_server  # noqa: E402

TIMEOUT_S = 30.0  # per client call: nothing here can hang CI
PROMPT_TEXT = "a red fox"


def _options(bundle: Path, **kw) -> ServeOptions:
    http, grpc_port, metrics = _free_ports(3)
    return ServeOptions(bundle, backend="onnxruntime", device="cpu", http_port=http, grpc_port=grpc_port,
                        metrics_port=metrics, exit_timeout_s=5, address="127.0.0.1", **kw)


class Running:
    """A started server: its options, the Triton object, the handler and a gRPC client on it."""

    def __init__(self, options: ServeOptions, scorer):
        self.options, self.scorer = options, scorer
        self.triton, self.handler = start_server(options, scorer)
        self.url = f"127.0.0.1:{options.grpc_port}"
        self.client = grpc.InferenceServerClient(self.url)

    def stop(self) -> None:
        self.client.close()
        try:
            self.triton.stop()
        finally:
            self.handler.close()


@pytest.fixture(scope="module")
def served(tiny_bundle):
    """The tiny bundle served on free loopback ports; batches of up to 16, waiting 20 ms to fill them."""
    scorer = Scorer(tiny_bundle, backend="onnxruntime", device="cpu")
    running = None
    try:
        running = Running(_options(tiny_bundle, max_batch=16, max_queue_delay_ms=20), scorer)
        yield running
    finally:
        if running is not None:
            running.stop()
        scorer.close()


def _png(seed: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A PNG header declaring 20000x20000: Pillow's decompression-bomb limit refuses it before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _infer(client, image: bytes, prompt: bytes, timeout: float = TIMEOUT_S):
    inputs = [grpc.InferInput(IMAGE, [1, 1], "BYTES"), grpc.InferInput(PROMPT, [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[image]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[prompt]], dtype=object))
    answer = client.infer(MODEL, inputs, client_timeout=timeout)
    return answer.as_numpy(SCORES)[0], answer.as_numpy(ERROR).reshape(-1)[0].decode()


def _local(scorer, blob: bytes) -> np.ndarray:
    return np.asarray([scorer.score([Image.open(io.BytesIO(blob))], [PROMPT_TEXT])[0][o] for o in scorer.outputs])


# ---------------------------------------------------------------- the environment the command prepares

def test_serve_puts_this_interpreters_libpython_first_on_ld_library_path(monkeypatch):
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/usr/lib/x86_64-linux-gnu:{libdir}")
    serve_server.prepare_environment()
    paths = os.environ["LD_LIBRARY_PATH"].split(":")
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert paths[0] == libdir and paths.count(libdir) == 1
    assert "/usr/lib/x86_64-linux-gnu" in paths


def test_serve_refuses_numpy_2_with_the_fix(monkeypatch):
    monkeypatch.setattr(serve_server.np, "__version__", "2.1.0")
    with pytest.raises(IPIQAError, match=r"numpy<2.*ipiqa\[serve\]"):
        serve_server.prepare_environment()


def test_bad_serve_options_are_refused_before_anything_starts(tiny_bundle):
    with pytest.raises(IPIQAError, match="three different ports"):
        ServeOptions(tiny_bundle, http_port=9000, grpc_port=9000, metrics_port=9002)
    with pytest.raises(IPIQAError, match="max-batch"):
        ServeOptions(tiny_bundle, max_batch=0)


# ---------------------------------------------------------------- readiness, metadata, metrics

def test_started_server_has_model_ipiqa_ready(served):
    """``start_server`` returns once the probe that means "can score" answers, not only the server's health."""
    assert served.client.is_server_live() and served.client.is_model_ready(MODEL)
    with urllib.request.urlopen(f"http://127.0.0.1:{served.options.http_port}/v2/models/ipiqa/ready", timeout=10) as r:
        assert r.status == 200
    meta = served.client.get_model_metadata(MODEL, as_json=True)
    assert [o["name"] for o in meta["outputs"]] == [SCORES, ERROR]
    assert [i["name"] for i in meta["inputs"]] == [IMAGE, PROMPT]


def test_server_describes_outputs_prompts_resolution_and_bundle_hash(served, tiny_bundle):
    served_model = describe(grpc, served.client, served.url)
    assert served_model.outputs == tuple(served.scorer.outputs)
    assert served_model.bundle_sha256 == bundle_sha256(tiny_bundle)
    assert served_model.needs_prompt is True and served_model.resolution == served.scorer.resolution
    assert served_model.has_error_output is True and served.client.is_model_ready(DESCRIBE_MODEL)


def _request_successes(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    line = next(l for l in text.splitlines() if l.startswith('nv_inference_request_success{model="ipiqa"'))
    return float(line.split()[-1])


def test_metrics_port_counts_requests(served):
    """Triton counts a request after its reply has gone (seen 0 right after it, the machine loaded): polled."""
    _infer(served.client, _png(1), PROMPT_TEXT.encode())
    url = f"http://127.0.0.1:{served.options.metrics_port}/metrics"
    deadline = time.monotonic() + 15
    while _request_successes(url) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _request_successes(url) >= 1


# ---------------------------------------------------------------- rows

@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Good PNG/JPEG files, a corrupt file, an empty file, a missing file and a row without a prompt."""
    d = tmp_path_factory.mktemp("serve_rows")
    rows = []
    for i in range(6):
        p = make_image(d / f"img{i}.{'png' if i % 2 else 'jpg'}", size=(50 + 7 * i, 40 + 3 * i), seed=i)
        rows.append((p.name, f"prompt {i % 3}"))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (d / "empty.jpg").write_bytes(b"")
    rows += [("corrupt.png", "a cat"), ("empty.jpg", "a cat"), ("missing.png", "a cat"), ("img0.jpg", "")]
    path = d / "images.csv"
    path.write_text("image,prompt\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _assert_same_rows(remote: list[dict], local: list[dict], outputs) -> None:
    assert len(remote) == len(local)
    for a, b in zip(remote, local):
        assert (a["image"], a["prompt"], a["error"]) == (b["image"], b["prompt"], b["error"])
        for o in outputs:
            assert (a[o] == "") == (b[o] == "")
            if a[o]:
                assert float(a[o]) == float(b[o])  # one engine batch (backends.base): batches never change a score


def test_score_server_rows_equal_the_local_clis(served, tiny_bundle, manifest, tmp_path):
    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    r1 = _cli("score", str(tiny_bundle), "--images", str(manifest), "-o", str(local), "--backend", "onnxruntime",
              "--device", "cpu", "-q")
    r2 = _cli("score", "--server", served.url, "--images", str(manifest), "-o", str(remote), "--concurrency", "4", "-q")
    assert r1.exit_code == r2.exit_code == 3  # some rows are errors, in both
    rows = read_csv(remote)
    _assert_same_rows(rows, read_csv(local), served.scorer.outputs)
    errors = [r["error"] for r in rows]
    assert sum(bool(e) for e in errors) == 4 and MISSING_PROMPT in errors


def test_score_server_sends_shard_members_as_the_local_run_reads_them(served, tiny_bundle, tmp_path):
    import tarfile

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, blob in enumerate([_png(11), b"not an image", _png(12)]):
            for name, data in ((f"s{i}.png", blob), (f"s{i}.txt", f"prompt {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    _cli("score", str(tiny_bundle), "--images", str(shard), "-o", str(local), "--backend", "onnxruntime",
         "--device", "cpu", "-q")
    _cli("score", "--server", served.url, "--images", str(shard), "-o", str(remote), "-q")
    rows = read_csv(remote)
    _assert_same_rows(rows, read_csv(local), served.scorer.outputs)
    assert [bool(r["error"]) for r in rows] == [False, True, False] and rows[0]["image"].endswith("::s0")


def test_score_server_resume_continues_a_cut_output(served, manifest, tmp_path):
    full, cut = tmp_path / "full.csv", tmp_path / "cut.csv"
    assert _cli("score", "--server", served.url, "--images", str(manifest), "-o", str(full), "-q",
                "--allow-errors").exit_code == 0
    lines = full.read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[:4]))  # header + 3 rows, as a killed run leaves it
    result = _cli("score", "--server", served.url, "--images", str(manifest), "-o", str(cut), "--resume", "-q",
                  "--allow-errors")
    assert result.exit_code == 0 and "3 already done" in result.output
    assert cut.read_text().startswith("".join(lines[:4]))  # the kept rows untouched, the rest appended
    _assert_same_rows(read_csv(cut), read_csv(full), served.scorer.outputs)  # exactly, though batches differ


def test_a_server_run_records_the_servers_own_run_record(served, manifest, tmp_path):
    from ipiqa.runtime.io.provenance import read_provenance

    out = tmp_path / "remote.csv"
    with RemoteScorer(served.url, concurrency=2) as scorer:
        scorer.score_files(manifest, out)
    recorded, own = read_provenance(out), served.scorer.provenance
    assert (recorded.bundle_sha256, recorded.backend, recorded.precision, recorded.engine_batch) == \
        (own.bundle_sha256, own.backend, own.precision, own.engine_batch)


def test_score_server_refuses_local_options_and_unreachable_servers(tmp_path, manifest, tiny_bundle):
    r = _cli("score", "--server", "127.0.0.1:1", "--images", str(manifest), "--device", "cpu")
    assert r.exit_code == 1 and "--device" in r.output and "Traceback" not in r.output
    r = _cli("score", str(tiny_bundle), "--server", "127.0.0.1:1", "--images", str(manifest))
    assert r.exit_code == 1 and "drop MODEL" in r.output
    port = _free_ports(1)[0]
    r = _cli("score", "--server", f"127.0.0.1:{port}", "--images", str(manifest))
    assert r.exit_code == 1 and "cannot reach an ipiqa server" in r.output and "Traceback" not in r.output


def test_every_bad_request_is_answered_alone_inside_a_shared_batch(served):
    good = [_png(s) for s in range(4)]
    cases = {"corrupt": (b"\x89PNG\r\n\x1a\ngarbage", PROMPT_TEXT.encode(), "not a readable image"),
             "empty": (b"", PROMPT_TEXT.encode(), "empty"),
             "oversized": (_bomb(), PROMPT_TEXT.encode(), "decompression bomb"),
             "no prompt": (good[0], b"", MISSING_PROMPT),
             "blank prompt": (good[0], b"  \t", MISSING_PROMPT)}
    jobs = [(f"good{i}", g, PROMPT_TEXT.encode(), None) for i, g in enumerate(good)]
    jobs += [(name, img, prompt, why) for name, (img, prompt, why) in cases.items()]
    answers: dict[str, tuple] = {}

    def send(job):
        client = grpc.InferenceServerClient(served.url)
        try:
            answers[job[0]] = _infer(client, job[1], job[2])
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(j,)) for j in jobs]  # together: the batcher groups them
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert set(answers) == {j[0] for j in jobs}
    for name, _, _, why in jobs:
        scores, error = answers[name]
        if why is None:
            assert error == "" and np.array_equal(scores, _local(served.scorer, good[int(name[4:])]))
        else:
            assert why in error and np.isnan(scores).all(), (name, error)


def test_a_4_mb_prompt_is_that_requests_error_naming_the_limit_and_the_server_goes_on(served):
    from ipiqa.runtime.rows import MAX_PROMPT_CHARS

    scores, error = _infer(served.client, _png(5), b"a red fox " * 400_000)
    assert f"above the {MAX_PROMPT_CHARS}-character limit" in error and np.isnan(scores).all()
    scores, error = _infer(served.client, _png(5), PROMPT_TEXT.encode())
    assert error == "" and np.isfinite(scores).all()


def test_an_image_above_the_byte_limit_is_that_requests_error_naming_the_limit(served, monkeypatch):
    from ipiqa import preprocess

    blob = _png(6)
    monkeypatch.setattr(preprocess, "MAX_IMAGE_BYTES", len(blob) - 1)  # the handler runs in this process
    scores, error = _infer(served.client, blob, PROMPT_TEXT.encode())
    assert error.startswith("IMAGE[0]: ") and "MiB limit (ipiqa.preprocess.MAX_IMAGE_BYTES)" in error


def test_a_client_that_disconnects_mid_request_leaves_the_server_serving(served):
    http = socket.create_connection(("127.0.0.1", served.options.http_port), timeout=10)
    http.sendall(b"POST /v2/models/ipiqa/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{\"inputs\": [")
    http.close()  # half a body, then gone
    impatient = grpc.InferenceServerClient(served.url)
    try:
        with pytest.raises(Exception, match="(?i)deadline|timeout"):
            _infer(impatient, _png(7, (2000, 1500)), PROMPT_TEXT.encode(), timeout=0.001)
    finally:
        impatient.close()
    scores, error = _infer(served.client, _png(3), PROMPT_TEXT.encode())
    assert error == "" and np.isfinite(scores).all() and served.client.is_server_ready()


def test_256_requests_from_16_clients_all_answered_in_batches(served):
    blobs = [_png(s) for s in range(8)]
    expected = [_local(served.scorer, b) for b in blobs]
    before = _batch_sizes(served.client)
    failures: list = []

    def client_run(k: int) -> None:
        client = grpc.InferenceServerClient(served.url)
        try:
            for i in range(16):
                j = (k + i) % len(blobs)
                scores, error = _infer(client, blobs[j], PROMPT_TEXT.encode())
                if error or not np.array_equal(scores, expected[j]):
                    failures.append((k, i, error, scores))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            failures.append((k, repr(exc)))
        finally:
            client.close()

    threads = [threading.Thread(target=client_run, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and failures == []
    after = _batch_sizes(served.client)
    grown = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * n for size, n in grown.items()) == 256  # every request was executed once
    assert any(size > 1 and n > 0 for size, n in grown.items()), grown


def _batch_sizes(client) -> dict[int, int]:
    """Triton's own statistics: how many batches of each size the model executed."""
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}


# ---------------------------------------------------------------- stopping

class _Slow:
    """The tiny scorer, 0.4 s per batch: requests are surely in flight when the signal comes."""

    def __init__(self, scorer):
        self.inner = scorer
        self.resolution, self.needs_prompt, self.outputs = scorer.resolution, scorer.needs_prompt, scorer.outputs
        self.provenance = scorer.provenance

    def score_arrays(self, images, prompts):
        time.sleep(0.4)
        return self.inner.score_arrays(images, prompts)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sigterm_drains_in_flight_requests_then_stops(tiny_bundle):
    scorer = Scorer(tiny_bundle, backend="onnxruntime", device="cpu")
    running = Running(_options(tiny_bundle, max_batch=2, max_queue_delay_ms=0), _Slow(scorer))
    results: list = []
    try:
        def send(seed: int) -> None:
            client = grpc.InferenceServerClient(running.url)
            try:
                results.append(_infer(client, _png(seed), PROMPT_TEXT.encode()))
            except Exception as exc:  # noqa: BLE001 - asserted below
                results.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=send, args=(s,)) for s in range(6)]  # 3 batches: about 1.2 s of work
        for t in threads:
            t.start()
        time.sleep(0.3)  # all six reach the server (milliseconds); their work takes about 1.2 s
        threading.Timer(0.05, os.kill, (os.getpid(), 15)).start()
        stopped = []
        serve_forever(running.triton, running.handler, on_stop=stopped.append)  # returns once drained and stopped
        for t in threads:
            t.join(TIMEOUT_S)
        assert stopped == ["SIGTERM"]
        assert len(results) == 6 and all(isinstance(r, tuple) and r[1] == "" for r in results), results
        assert not running.triton.is_alive()
    finally:
        running.client.close()
        running.triton.stop()
        running.handler.close()
        scorer.close()



# ---------------------------------------------------------------- the NGC repository's python model, in the bundled server

def test_ngc_repository_preprocess_model_runs_in_pytritons_tritonserver(tiny_bundle, tmp_path):
    """The repository's ``ipiqa_preprocess`` (python backend) loaded by the real tritonserver that PyTriton ships;
    its other models need Triton's onnxruntime backend, which that build does not carry."""
    import shutil
    import subprocess

    from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path

    from ipiqa.bundle import read_bundle
    from ipiqa.export.triton import write_triton_repository
    from ipiqa.runtime.pipeline import load_input

    server_dir = tmp_path / "tritonserver"
    shutil.copytree(get_root_module_path() / "tritonserver", server_dir, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                server_dir / "backends" / "python" / "triton_python_backend_stub")
    repo = write_triton_repository(read_bundle(tiny_bundle), tmp_path / "models", kind="KIND_CPU")
    only = tmp_path / "only"
    shutil.copytree(repo / "ipiqa_preprocess", only / "ipiqa_preprocess")
    serve_server.prepare_environment()  # this interpreter's libpython first, as ipiqa serve does
    env = dict(os.environ, LD_LIBRARY_PATH=f"{os.environ.get('LD_LIBRARY_PATH', '')}:{get_libs_path()}",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    http, grpc_port, metrics = _free_ports(3)
    log = tmp_path / "tritonserver.log"
    proc = subprocess.Popen([str(server_dir / "bin" / "tritonserver"), f"--model-repository={only}",
                             f"--backend-directory={server_dir / 'backends'}", f"--http-port={http}",
                             f"--grpc-port={grpc_port}", f"--metrics-port={metrics}", "--exit-timeout-secs=3"],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    client = grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.is_model_ready("ipiqa_preprocess"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"tritonserver did not load ipiqa_preprocess: {log.read_text()[-2000:]}")
        png = tmp_path / "a.png"
        png.write_bytes(_png(4))
        inputs = [grpc.InferInput(IMAGE, [1, 1], "BYTES"), grpc.InferInput(PROMPT, [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([[png.read_bytes()]], dtype=object))
        inputs[1].set_data_from_numpy(np.array([[PROMPT_TEXT.encode()]], dtype=object))
        answer = client.infer("ipiqa_preprocess", inputs, client_timeout=TIMEOUT_S)
        with Scorer(tiny_bundle, backend="onnxruntime", device="cpu") as scorer:
            assert np.array_equal(answer.as_numpy("image")[0], load_input(str(png), scorer.resolution))
            assert np.array_equal(answer.as_numpy("tokens"), scorer.tokenizer([PROMPT_TEXT]))
        inputs[0].set_data_from_numpy(np.array([[b"junk"]], dtype=object))
        with pytest.raises(Exception, match="not a readable image"):
            client.infer("ipiqa_preprocess", inputs, client_timeout=TIMEOUT_S)
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
