"""``RemoteScorer`` against a scripted stand-in for tritonclient's gRPC client: which failures are a row's and
which the connection's, the retries, the stop line and what the client learns from the server's description.
(The real server, killed and restarted, is ``test_serve_outage.py``.)"""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

from conftest import make_image, read_csv
from ipiqa.errors import IPIQAError
from ipiqa.runtime.io import RowSource
from ipiqa.runtime.serve import client as client_module
from ipiqa.runtime.serve.client import RemoteScorer, ServerUnavailable, is_connection_failure
from ipiqa.runtime.serve.contract import DESCRIBE_MODEL, DESCRIPTION, ERROR, SCORES, ServedModel

grpc = pytest.importorskip("tritonclient.grpc", reason="needs ipiqa[serve] (tritonclient)")
from tritonclient.utils import InferenceServerException  # noqa: E402

URL = "127.0.0.1:8001"


def _failure(code: str, text: str = "failed") -> InferenceServerException:
    return InferenceServerException(msg=text, status=f"StatusCode.{code}")


class Server:
    """What the stand-in client answers: ``fail(call_number)`` returns an exception to raise, or None to score."""

    def __init__(self, needs_prompt: bool = True):
        self.description = ServedModel.parameters(("quality", "alignment"), "ab" * 32, needs_prompt, 64)
        self.calls = 0
        self.fail = lambda call: None
        self.describe_loading = 0  # probes of the description model that answer "not ready"

    def client(self, url, channel_args=None):
        server = self

        class Client:
            def is_model_ready(self, name):
                if name == DESCRIBE_MODEL and server.describe_loading:
                    server.describe_loading -= 1
                    return False
                return True

            def get_model_metadata(self, name, as_json=False):
                return {"outputs": [{"name": SCORES}, {"name": ERROR}]}

            def get_model_config(self, name, as_json=False):
                return {"config": {"parameters": {"workspace-path": {"string_value": "/tmp/x"}}}}

            def infer(self, model, inputs, outputs=None, client_timeout=None):
                if model == DESCRIBE_MODEL:
                    answer = np.array([json.dumps(server.description).encode()], dtype=object)
                    return types.SimpleNamespace(as_numpy=lambda name: answer if name == DESCRIPTION else None)
                server.calls += 1
                exc = server.fail(server.calls)
                if exc is not None:
                    raise exc
                answers = {SCORES: np.array([[0.25, 0.75]], dtype=np.float32),
                           ERROR: np.array([[b""]], dtype=object)}
                return types.SimpleNamespace(as_numpy=answers.get)

            def close(self):
                pass

        return Client()


@pytest.fixture
def server(monkeypatch):
    fake = Server()
    monkeypatch.setattr(grpc, "InferenceServerClient", fake.client)
    monkeypatch.setattr(client_module, "_FIRST_DELAY_S", 0.01)
    return fake


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote_rows")
    for i in range(8):
        make_image(d / f"img{i}.png", seed=i)
    return d


def _scorer(**kw) -> RemoteScorer:
    return RemoteScorer(URL, concurrency=1, **kw)


@pytest.mark.parametrize("code", ["UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND", "RESOURCE_EXHAUSTED"])
def test_connection_codes_say_nothing_about_the_row(code):
    assert is_connection_failure(_failure(code))


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "INTERNAL", "UNKNOWN"])
def test_the_servers_answer_about_a_request_is_not_a_connection_failure(code):
    assert not is_connection_failure(_failure(code))


def test_a_reset_connection_is_a_connection_failure():
    assert is_connection_failure(ConnectionResetError("reset by peer")) and not is_connection_failure(ValueError("x"))


def test_a_call_failing_for_the_connection_is_retried_and_its_row_scored(server, folder, tmp_path):
    server.fail = lambda call: _failure("UNAVAILABLE", "connection refused") if call in (3, 4) else None
    with _scorer(retry_s=30) as scorer:
        summary = scorer.score_files(RowSource(folder, "a fox"), tmp_path / "o.csv")
    rows = read_csv(tmp_path / "o.csv")
    assert summary.rows == 8 and summary.errors == 0 and all(r["error"] == "" for r in rows)
    assert server.calls == 8 + 2


def test_the_ensembles_refusal_is_that_rows_error_and_never_retried(server, folder, tmp_path):
    server.fail = lambda call: _failure("INVALID_ARGUMENT", "ipiqa_preprocess: IMAGE[0]: corrupt") if call == 2 else None
    with _scorer() as scorer:
        summary = scorer.score_files(RowSource(folder, "a fox"), tmp_path / "o.csv")
    errors = [r["error"] for r in read_csv(tmp_path / "o.csv")]
    assert summary.errors == 1 and "IMAGE[0]: corrupt" in errors[1] and server.calls == 8


def test_past_the_retry_time_the_run_stops_naming_the_server_and_the_resume_command(server, folder, tmp_path):
    server.fail = lambda call: _failure("UNAVAILABLE", "connection refused") if call > 5 else None
    out = tmp_path / "o.csv"
    with _scorer(retry_s=0.3) as scorer, pytest.raises(ServerUnavailable) as stop:
        scorer.score_files(RowSource(folder, "a fox"), out, batch_size=1)
    assert isinstance(stop.value, IPIQAError)
    text = str(stop.value)
    assert URL in text and "--resume" in text and str(out) in text and "5 rows" in text, text
    rows = read_csv(out)  # the rows answered before the outage, in input order; nothing for the rest
    assert [r["image"] for r in rows] == [str(folder / f"img{i}.png") for i in range(5)]
    assert all(r["error"] == "" for r in rows)


def test_resume_after_an_outage_writes_every_row_once(server, folder, tmp_path):
    out = tmp_path / "o.csv"
    server.fail = lambda call: _failure("UNAVAILABLE") if call > 3 else None
    with _scorer(retry_s=0.2) as scorer, pytest.raises(ServerUnavailable):
        scorer.score_files(RowSource(folder, "a fox"), out, batch_size=1)
    server.fail = lambda call: None
    with _scorer() as scorer:
        summary = scorer.score_files(RowSource(folder, "a fox"), out, resume=True)
    rows = read_csv(out)
    assert summary.skipped == 3 and [r["image"] for r in rows] == [str(folder / f"img{i}.png") for i in range(8)]
    assert all(r["error"] == "" for r in rows)


def test_progress_callback_gets_every_written_batch(server, folder, tmp_path):
    seen: list[int] = []
    with _scorer() as scorer:
        scorer.score_files(RowSource(folder, "a fox"), tmp_path / "o.csv", batch_size=3,
                           on_results=lambda batch: seen.append(len(batch)))
    assert seen == [3, 3, 2]


def test_needs_prompt_comes_from_the_servers_description(monkeypatch, folder, tmp_path):
    image_only = Server(needs_prompt=False)
    monkeypatch.setattr(grpc, "InferenceServerClient", image_only.client)
    with _scorer() as scorer:
        assert scorer.needs_prompt is False and scorer.served.resolution == 64
        summary = scorer.score_files(folder, tmp_path / "o.csv")  # a folder, no --prompt
    assert summary.rows == 8 and summary.errors == 0


def test_a_text_model_still_refuses_a_folder_without_prompts(server, folder, tmp_path):
    with _scorer() as scorer, pytest.raises(IPIQAError, match="no prompts"):
        scorer.score_files(folder, tmp_path / "o.csv")


def test_the_cli_prints_the_stop_line_and_exits_1(server, folder, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ipiqa.cli import cli

    monkeypatch.setattr(client_module, "RETRY_S", 0.2)
    server.fail = lambda call: _failure("UNAVAILABLE", "connection refused") if call > 2 else None
    out = tmp_path / "o.csv"
    result = CliRunner().invoke(cli, ["score", "--server", URL, "--images", str(folder), "--prompt", "a fox",
                                      "-o", str(out), "-q", "--batch", "1", "--concurrency", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--resume" in result.output and URL in result.output
    assert len(read_csv(out)) == 2


def test_an_image_file_above_the_byte_limit_is_refused_before_sending(server, folder, tmp_path, monkeypatch):
    from ipiqa import preprocess

    monkeypatch.setattr(preprocess, "MAX_IMAGE_BYTES", 1)
    with _scorer() as scorer:
        summary = scorer.score_files(RowSource(folder, "a fox"), tmp_path / "o.csv")
    assert summary.errors == 8 and server.calls == 0
    assert all("MiB limit" in r["error"] for r in read_csv(tmp_path / "o.csv"))


def test_a_server_back_with_another_bundle_stops_the_run(server, folder, tmp_path):
    from ipiqa.runtime.serve.client import ServerChanged

    def fail(call):
        if call == 4:
            server.description = {**server.description, "ipiqa_bundle_sha256": "cd" * 32}  # restarted, other bundle
            return _failure("UNAVAILABLE", "connection refused")
        return None

    server.fail = fail
    out = tmp_path / "o.csv"
    with _scorer(retry_s=30) as scorer, pytest.raises(ServerChanged, match="another model.*bundle_sha256") as stop:
        scorer.score_files(RowSource(folder, "a fox"), out, batch_size=1)
    assert "3 rows" in str(stop.value) and len(read_csv(out)) == 3


def test_a_server_back_with_the_same_model_goes_on(server, folder, tmp_path):
    server.fail = lambda call: _failure("UNAVAILABLE") if call == 4 else None
    with _scorer(retry_s=30) as scorer:
        summary = scorer.score_files(RowSource(folder, "a fox"), tmp_path / "o.csv", batch_size=1)
    assert summary.rows == 8 and summary.errors == 0


def test_a_server_back_before_its_description_model_is_ready_is_waited_for(server, folder, tmp_path):
    def fail(call):
        if call == 4:  # restarted: model ipiqa answers, its description model is still loading for two probes
            server.describe_loading = 2
            return _failure("UNAVAILABLE")
        return None

    server.fail = fail
    with _scorer(retry_s=30) as scorer:
        summary = scorer.score_files(RowSource(folder, "a fox"), tmp_path / "o.csv", batch_size=1)
    assert summary.rows == 8 and summary.errors == 0 and server.describe_loading == 0


def test_server_retry_sets_how_long_the_cli_retries_before_it_stops(server, folder, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ipiqa.cli import cli

    monkeypatch.setattr(client_module, "RETRY_S", 0.5)  # the default here; the option must win
    server.fail = lambda call: _failure("UNAVAILABLE", "connection refused") if call > 2 else None
    result = CliRunner().invoke(cli, ["score", "--server", URL, "--images", str(folder), "--prompt", "a fox",
                                      "-o", str(tmp_path / "o.csv"), "-q", "--batch", "1", "--concurrency", "1",
                                      "--server-retry", "0.2"])
    assert result.exit_code == 1 and "did not answer for 0.2 s" in result.output


def test_a_parquet_row_holding_only_a_path_sends_that_files_bytes(server, folder, tmp_path, monkeypatch):
    """A Hugging Face ``Image`` struct with ``bytes=None`` names its file: the request carries the file's bytes, not
    the row's ``FILE::ROW`` label (which every such row sent before: 'file not found')."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    sent = []
    real = client_module.build_inputs
    monkeypatch.setattr(client_module, "build_inputs", lambda g, image, prompt: sent.append(image) or real(g, image, prompt))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": None, "path": str(folder / "img0.png")}, {"bytes": None, "path": str(folder / "img1.png")}]
    pq.write_table(pa.table({"image": pa.array(cells, type=struct), "prompt": ["a fox", "a cat"]}), tmp_path / "d.parquet")
    with _scorer() as scorer:
        summary = scorer.score_files(tmp_path / "d.parquet", tmp_path / "o.csv")
    assert summary.errors == 0
    assert sent == [(folder / "img0.png").read_bytes(), (folder / "img1.png").read_bytes()]
