"""A row's score never depends on how it was batched (issue 28): one image scored alone, in batches of 3, 8 and 33
among other images (and other prompts), after a resume and through the server under other clients' traffic gets the
same bits, on ONNX Runtime and OpenVINO at FP32 and INT8; and a resume by another bundle, backend or precision is
refused, naming both. Exact equality throughout: at one engine batch, bits depend on nothing else."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY, make_image, read_csv
from serve_ports import free_ports
from ipiqa.errors import IPIQAError
from ipiqa.runtime.cache import PromptCache
from ipiqa.runtime.io.provenance import read_provenance, sidecar_path
from ipiqa.runtime.rows import Row
from ipiqa.runtime.scorer import Scorer

pytest.importorskip("onnx", reason="the INT8 bundle is exported here (ipiqa[export])")

TARGET_PROMPT = "a red fox in the snow"
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
ROUTES = [pytest.param(("onnxruntime", "fp32"), id="onnxruntime-fp32"),
          pytest.param(("onnxruntime", "int8"), id="onnxruntime-int8"),
          pytest.param(("openvino", "fp32"), id="openvino-fp32",
                       marks=pytest.mark.skipif(not HAVE_OPENVINO, reason="needs ipiqa[openvino]")),
          pytest.param(("openvino", "int8"), id="openvino-int8",
                       marks=pytest.mark.skipif(not HAVE_OPENVINO, reason="needs ipiqa[openvino]"))]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A seeded tiny model with image-dependent embeddings (test_int8.trained_like), exported with its FP32 graphs
    and the gated INT8 image graph (gated on OpenVINO too where it is installed)."""
    from test_int8 import trained_like, write_images

    from ipiqa.checkpoint import save_model
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import demo_model
    from ipiqa.export.bundle_export import ExportOptions, Int8Options, export_bundle
    from ipiqa.export.calibration import image_input

    root = tmp_path_factory.mktemp("reproducible")
    files = write_images(root / "calibration", 24, seed=0)
    cfg = IPIQAConfig(**TINY)
    model = trained_like(demo_model(cfg, seed=3), np.stack([image_input(p, cfg.resolution) for p in files[:16]]))
    path = save_model(root / "model.safetensors", model.state_dict(), cfg)
    export_bundle(model, [path], root / "bundle", ExportOptions(onnx_only=True, int8=Int8Options(root / "calibration",
                                                                                                 size=16)),
                  progress=lambda m: None)
    return root / "bundle"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """The image under test first, then 40 others of several sizes."""
    folder = tmp_path_factory.mktemp("repro_images")
    return [make_image(folder / f"{i:02d}.png", size=(48 + 5 * (i % 7), 40 + 3 * (i % 5)), seed=100 + i)
            for i in range(41)]


def _scorer(bundle: Path, route: tuple[str, str]) -> Scorer:
    from ipiqa.bundle import read_bundle

    backend, precision = route
    if route == ("openvino", "int8") and not read_bundle(bundle).onnx.int8["cpu"].openvino_passed:
        pytest.skip("the export's OpenVINO INT8 gate did not pass on this CPU: the bundle does not serve it")
    return Scorer(bundle, backend=backend, device="cpu", precision=precision)


def _scores(scorer: Scorer, records: list[dict], index: int) -> list[float]:
    assert records[index]["error"] is None, records[index]["error"]
    return [records[index][o] for o in scorer.outputs]


def _among_others(images: list[Path], n: int, position: int) -> tuple[list[Path], list[str]]:
    """``n`` rows, the image under test at ``position``, the others with prompts of their own."""
    others = images[1:n]
    files = others[:position] + [images[0]] + others[position:]
    prompts = [f"another prompt {i}" for i in range(position)] + [TARGET_PROMPT] + \
              [f"another prompt {i}" for i in range(position, n - 1)]
    return files, prompts


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("n,batch,position", [(3, 3, 1), (8, 8, 5), (33, 33, 16), (35, 8, 33)],
                         ids=["batch-3", "batch-8", "batch-33", "last-short-batch"])
def test_an_image_gets_the_same_bits_alone_and_among_others_at_any_batch(bundle, images, route, n, batch,
                                                                        position):
    with _scorer(bundle, route) as scorer:
        scorer.cache = PromptCache()  # its prompt encoded alone
        alone = _scores(scorer, scorer.score([images[0]], [TARGET_PROMPT]), 0)
        scorer.cache = PromptCache()  # its prompt encoded again, among n - 1 other distinct prompts
        files, prompts = _among_others(images, n, position)
        together = _scores(scorer, scorer.score(files, prompts, batch_size=batch), position)
    assert together == alone


@pytest.mark.parametrize("route", ROUTES[:1] + ROUTES[2:3])
def test_a_resumed_run_writes_the_bytes_of_an_uninterrupted_one(bundle, images, route, tmp_path):
    rows = [Row(str(p), f"prompt {i % 3}") for i, p in enumerate(images[:11])]
    full, cut = tmp_path / "full.csv", tmp_path / "cut.csv"
    with _scorer(bundle, route) as scorer:
        scorer.score_files(rows, full, batch_size=4)
        lines = full.read_bytes().splitlines(keepends=True)
        cut.write_bytes(b"".join(lines[:6]) + lines[6][:9])  # 5 rows and a cut one, as a kill leaves it
        scorer.cache = PromptCache()
        summary = scorer.score_files(rows, cut, batch_size=1, resume=True)  # rows scored in other batches
    assert summary.skipped == 5 and cut.read_bytes() == full.read_bytes()


# ---------------------------------------------------------------- the run record and the resume check


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_output_records_what_made_its_numbers(bundle, images, tmp_path):
    from ipiqa import __version__
    from ipiqa.runtime.cpu import cpu_model

    out = tmp_path / "s.csv"
    with Scorer(bundle, backend="onnxruntime", device="cpu", precision="int8") as scorer:
        scorer.score_files([Row(str(images[0]), TARGET_PROMPT)], out)
    record = read_provenance(out)
    assert record is not None and sidecar_path(out).is_file()
    assert (record.bundle_sha256, record.backend, record.precision, record.engine_batch, record.ipiqa_version,
            record.machine) == (_sha256(bundle / "manifest.json"), "onnxruntime-cpu-int8", "int8", 1, __version__,
                                cpu_model())


def test_a_parquet_output_carries_the_record_in_its_metadata(bundle, images, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet outputs need ipiqa[parquet]")
    out = tmp_path / "s.parquet"
    with Scorer(bundle, backend="onnxruntime", device="cpu") as scorer:
        scorer.score_files([Row(str(images[0]), TARGET_PROMPT)], out)
        expected = scorer.provenance
    os.unlink(sidecar_path(out))  # the file alone still says
    stored = json.loads(pq.read_schema(out).metadata[b"ipiqa.provenance"])
    assert stored["backend"] == "onnxruntime-cpu" and read_provenance(out) == expected


def test_an_output_written_before_records_has_none(tmp_path):
    out = tmp_path / "old.csv"
    out.write_text("image,prompt,quality,error\n")
    assert read_provenance(out) is None


def test_per_shard_outputs_each_record_their_run(bundle, tmp_path):
    from test_shards import good_samples, write_shard

    from ipiqa.runtime.io import RowSource
    from ipiqa.runtime.io.partitions import score_partitions

    for s in range(2):
        write_shard(tmp_path / f"{s:05d}.tar", good_samples(10 * s, 2))
    with Scorer(bundle, backend="onnxruntime", device="cpu") as scorer:
        summary = score_partitions(scorer, RowSource(str(tmp_path / "{00000..00001}.tar")), tmp_path / "scores")
        expected = scorer.provenance
    assert summary.scored == 2
    assert [read_provenance(tmp_path / "scores" / f"{s:05d}.csv") for s in range(2)] == [expected] * 2
    assert read_provenance(tmp_path / "scores") == expected  # the folder as one scores set
    assert not list((tmp_path / "scores").glob(".*.run.json"))  # renamed with their file


@pytest.mark.parametrize("other", [pytest.param(("openvino", "fp32"), id="another-backend",
                                                marks=pytest.mark.skipif(not HAVE_OPENVINO, reason="needs openvino")),
                                   pytest.param(("onnxruntime", "int8"), id="another-precision")])
def test_a_resume_by_another_backend_or_precision_is_refused_naming_both(bundle, images, tmp_path, other):
    out = tmp_path / "s.csv"
    rows = [Row(str(p), TARGET_PROMPT) for p in images[:3]]
    with Scorer(bundle, backend="onnxruntime", device="cpu", precision="fp32") as scorer:
        scorer.score_files(rows[:2], out)
    before = out.read_bytes()
    with Scorer(bundle, backend=other[0], device="cpu", precision=other[1]) as scorer:
        name = scorer.backend.name
        with pytest.raises(IPIQAError) as refused:
            scorer.score_files(rows, out, resume=True)
    message = str(refused.value)
    assert "cannot resume" in message and str(out) in message and str(sidecar_path(out)) in message
    assert "scored with backend onnxruntime-cpu" in message and f"this run has backend {name}" in message
    assert out.read_bytes() == before  # nothing appended


def test_a_resume_with_another_bundle_is_refused_on_the_command_line(bundle, tiny_bundle, images, tmp_path):
    from ipiqa.cli import cli

    manifest = tmp_path / "in.csv"
    manifest.write_text("image,prompt\n" + "".join(f"{p},{TARGET_PROMPT}\n" for p in images[:3]))
    out = tmp_path / "s.csv"
    common = ["--images", str(manifest), "-o", str(out), "--backend", "onnxruntime", "--device", "cpu", "-q"]
    assert CliRunner().invoke(cli, ["score", str(tiny_bundle), *common]).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))
    result = CliRunner().invoke(cli, ["score", str(bundle), *common, "--resume"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"bundle_sha256 {_sha256(tiny_bundle / 'manifest.json')}" in result.output
    assert f"bundle_sha256 {_sha256(bundle / 'manifest.json')}" in result.output
    assert len(read_csv(out)) == 1


# ---------------------------------------------------------------- through the server, under other clients' traffic


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """``ipiqa serve`` (the public command, in its own process) on free loopback ports, batching up to 16
    requests and waiting 20 ms to fill a batch; stopped with SIGTERM in a finalizer."""
    pytest.importorskip("pytriton", reason="the server test needs ipiqa[serve] (nvidia-pytriton)")
    pytest.importorskip("tritonclient.grpc", reason="the server test needs ipiqa[serve] (tritonclient)")
    if int(np.__version__.split(".")[0]) >= 2:
        pytest.skip(f"PyTriton's python stub needs numpy<2 (numpy {np.__version__} here)")
    http, grpc_port, metrics = free_ports(3)
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ipiqa.cli", "serve", str(bundle), "--backend", "onnxruntime",
                             "--device", "cpu", "--address", "127.0.0.1", "--http-port", str(http), "--grpc-port",
                             str(grpc_port), "--metrics-port", str(metrics), "--max-batch", "16",
                             "--max-queue-delay-ms", "20", "--exit-timeout", "5"], stdout=log, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{grpc_port}"
    try:
        from ipiqa.runtime.serve.client import RemoteScorer

        deadline = time.monotonic() + 120
        while True:
            try:
                RemoteScorer(url).close()  # connects, reads the served model's description: ready to score
                break
            except IPIQAError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"ipiqa serve did not become ready:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_an_image_gets_the_same_bits_through_the_server_while_8_clients_send_others(server, bundle, images):
    from ipiqa.runtime.serve.client import RemoteScorer

    with Scorer(bundle, backend="onnxruntime", device="cpu") as local:
        alone = _scores(local, local.score([images[0]], [TARGET_PROMPT]), 0)
    stop = threading.Event()
    traffic: list[int] = []

    def other_client(k: int) -> None:
        with RemoteScorer(server, concurrency=2) as client:
            i = 0
            while not stop.is_set():
                rows = [Row(str(images[1 + (k * 5 + i + j) % 40]), f"client {k} prompt {i}") for j in range(3)]
                traffic.extend(int(r.error is None) for r in client.iter_results(rows))
                i += 1

    clients = [threading.Thread(target=other_client, args=(k,), daemon=True) for k in range(8)]
    for t in clients:
        t.start()
    try:
        with RemoteScorer(server, concurrency=1) as remote:
            while len(traffic) < 16:  # the others are sending
                time.sleep(0.05)
            got = []
            for _ in range(12):
                result = remote.score_row(Row(str(images[0]), TARGET_PROMPT))
                assert result.error is None, result.error
                got.append(list(result.scores))
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
    assert sum(traffic) >= 16
    assert all(scores == alone for scores in got)
