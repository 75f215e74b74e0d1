"""The Triton model repository: strict config parsing, names/shapes equal the ONNX graphs, a wired ensemble;
the python model and the client follow the runtime's row rules (run against stand-ins: no Triton here)."""
from __future__ import annotations

import importlib.util
import io
import json
import runpy
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from ipiqa.bundle import read_bundle
from ipiqa.errors import IPIQAError, MissingDependencyError
from ipiqa.runtime.serve import triton_client, triton_model
from ipiqa.export.triton import MODEL_NAMES, SERVED_OUTPUTS, write_triton_repository
from ipiqa.runtime.pipeline import load_input
from ipiqa.runtime.rows import MISSING_PROMPT
from ipiqa.runtime.scorer import Scorer

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs ipiqa[triton]")
text_format = pytest.importorskip("google.protobuf.text_format")
json_format = pytest.importorskip("google.protobuf.json_format")
grpc = pytest.importorskip("tritonclient.grpc", reason="needs ipiqa[triton]")
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor  # noqa: E402

DTYPES = {"tensor(float)": model_config_pb2.TYPE_FP32, "tensor(int64)": model_config_pb2.TYPE_INT64,
          "tensor(uint8)": model_config_pb2.TYPE_UINT8}
PROMPT = "a red fox"


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return read_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory):
    return write_triton_repository(bundle, tmp_path_factory.mktemp("repo") / "models", max_batch=64)


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    """The runtime the Triton path must agree with."""
    with Scorer(tiny_bundle, backend="onnxruntime", device="cpu") as scorer:
        yield scorer


def _config(repo, name):
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _png(seed: int = 0) -> bytes:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- a stand-in for triton_python_backend_utils, which exists only inside Triton's python stub ---------------

class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class TritonError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str | None = None):
        self.message, self.code = message, code


class Response:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


def _request(images: list[bytes], prompts: list[bytes]) -> dict[str, Tensor]:
    """One request as Triton hands it to the model: BYTES tensors of shape (batch, 1)."""
    return {"IMAGE": Tensor("IMAGE", np.array([[b] for b in images], dtype=object)),
            "PROMPT": Tensor("PROMPT", np.array([[p] for p in prompts], dtype=object))}


@pytest.fixture
def preprocess(repo, monkeypatch):
    """The repository's model.py, loaded as Triton loads it, initialized with its own config.pbtxt as JSON."""
    stand_in = types.SimpleNamespace(Tensor=Tensor, TritonError=TritonError, InferenceResponse=Response,
                                     get_input_tensor_by_name=lambda request, name: request[name])
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in)
    spec = importlib.util.spec_from_file_location("model", repo / "ipiqa_preprocess" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = json_format.MessageToDict(_config(repo, "ipiqa_preprocess"), preserving_proto_field_name=True)
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / "ipiqa_preprocess"),
                      "model_version": "1", "model_name": "ipiqa_preprocess"})
    return model


# --- the repository ---------------------------------------------------------------------------------------

def test_repository_has_the_five_models_with_their_files(repo):
    assert {p.name for p in repo.iterdir() if p.is_dir()} == {*MODEL_NAMES.values(), "ipiqa_preprocess", "ipiqa"}
    for graph, name in MODEL_NAMES.items():
        assert {f.name for f in (repo / name / "1").iterdir()} == {"model.onnx", f"{graph}.onnx.data"}
    assert (repo / "ipiqa_preprocess" / "1" / "tokenizer.json").is_file()


@pytest.mark.parametrize("graph", list(MODEL_NAMES))
def test_config_names_types_and_shapes_equal_the_onnx_graph(repo, graph):
    """Every input, and every output the ensemble reads (a gate-only graph output is left undeclared). A
    symbolic graph axis (the text graph's ``sequence``) takes the fixed size the config declares (Triton's
    ONNX Runtime backend matches a variable model dim against any config dim): the preprocess model sends 77."""
    cfg = _config(repo, MODEL_NAMES[graph])
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert cfg.dynamic_batching.preferred_batch_size and cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    sess = ort.InferenceSession(str(repo / MODEL_NAMES[graph] / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    served = [o for o in sess.get_outputs() if o.name in SERVED_OUTPUTS[graph]]
    assert [o.name for o in served] == list(SERVED_OUTPUTS[graph])
    for declared, actual in ((cfg.input, sess.get_inputs()), (cfg.output, served)):
        assert [t.name for t in declared] == [a.name for a in actual]
        for t, a in zip(declared, actual):
            assert len(t.dims) == len(a.shape[1:]) and t.data_type == DTYPES[a.type]
            assert all(d == g or isinstance(g, str) for d, g in zip(t.dims, a.shape[1:]))


def test_ensemble_wires_every_tensor_from_an_earlier_step(repo):
    cfg = _config(repo, "ipiqa")
    available = {i.name for i in cfg.input}
    for step in cfg.ensemble_scheduling.step:
        model = _config(repo, step.model_name)
        assert set(step.input_map) == {i.name for i in model.input}
        assert set(step.input_map.values()) <= available, step.model_name
        assert set(step.output_map) <= {o.name for o in model.output}
        available |= set(step.output_map.values())
    assert {o.name for o in cfg.output} <= available and cfg.output[0].dims == [2]


def test_tensorrt_backend_without_engines_is_refused(bundle, tmp_path):
    with pytest.raises(IPIQAError, match="no TensorRT engines"):
        write_triton_repository(bundle, tmp_path / "r", backend="tensorrt")


def test_export_cli_writes_the_repository(tiny_model_file, tmp_path):
    from click.testing import CliRunner

    from ipiqa.export.cli import main

    res = CliRunner().invoke(main, [str(tiny_model_file), "-o", str(tmp_path / "b"), "--onnx-only", "--batch", "1,8,32",
                                    "--triton", str(tmp_path / "triton")])
    assert res.exit_code == 0, res.output
    assert _config(tmp_path / "triton", "ipiqa_fusion").max_batch_size == 32


# --- the python model -------------------------------------------------------------------------------------

def test_model_py_runs_the_packaged_model(preprocess):
    assert type(preprocess) is triton_model.TritonPythonModel


def test_preprocess_model_equals_the_runtime_preprocessing(preprocess, runtime, tmp_path):
    path = tmp_path / "fox.png"
    path.write_bytes(_png())
    (response,) = preprocess.execute([_request([path.read_bytes()], [PROMPT.encode()])])
    assert response.error is None
    image, tokens = response.outputs["image"], response.outputs["tokens"]
    assert image.dtype == np.uint8 and image.shape == (1, 64, 64, 3)
    assert np.array_equal(image[0], load_input(str(path), 64))  # what the runtime feeds its image graph
    assert np.array_equal(tokens, runtime.tokenizer([PROMPT])) and tokens.shape == (1, 77) and tokens[0, 0] == 49406


@pytest.mark.parametrize("prompt", ["", "   ", "\t\n"])
def test_missing_prompt_gets_an_error_response_with_the_runtime_text(preprocess, runtime, tmp_path, prompt):
    path = tmp_path / "fox.png"
    path.write_bytes(_png())
    (response,) = preprocess.execute([_request([path.read_bytes()], [prompt.encode()])])
    runtime_error = runtime.score([str(path)], [prompt])[0]["error"]
    assert runtime_error == MISSING_PROMPT
    assert response.error.message == f"ipiqa_preprocess: {runtime_error}" and not response.outputs


@pytest.mark.parametrize("word", ["NaN", "null", "None"])
def test_the_words_nan_null_and_none_are_prompts(preprocess, runtime, word):
    (response,) = preprocess.execute([_request([_png()], [word.encode()])])
    assert response.error is None
    assert np.array_equal(response.outputs["tokens"], runtime.tokenizer([word]))


@pytest.mark.parametrize("content", [b"", b"junk", _png()[:200]], ids=["empty", "not-an-image", "truncated"])
def test_bad_image_bytes_are_refused_with_the_runtime_cause(preprocess, runtime, tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    runtime_error = runtime.score([str(path)], [PROMPT])[0]["error"]
    (response,) = preprocess.execute([_request([content], [PROMPT.encode()])])
    assert runtime_error.startswith(f"{path}: ")
    assert response.error.message == "ipiqa_preprocess: " + runtime_error.replace(str(path), "IMAGE[0]", 1)


def test_a_prompt_above_the_limit_is_refused_before_tokenizing(preprocess, monkeypatch):
    from ipiqa.runtime.rows import MAX_PROMPT_CHARS

    monkeypatch.setattr(preprocess, "tokenizer", lambda prompts: pytest.fail("tokenized an oversized prompt"))
    (response,) = preprocess.execute([_request([_png()], [b"a red fox " * 400_000])])
    assert response.error.code == TritonError.INVALID_ARG
    assert f"above the {MAX_PROMPT_CHARS}-character limit" in response.error.message


def test_row_errors_are_the_clients_fault_not_the_servers(preprocess):
    (bad_image, no_prompt) = preprocess.execute([_request([b"junk"], [PROMPT.encode()]), _request([_png()], [b" "])])
    assert bad_image.error.code == no_prompt.error.code == TritonError.INVALID_ARG


def test_one_bad_request_leaves_the_others_of_the_batch_scored(preprocess):
    good = _request([_png(0), _png(1)], [PROMPT.encode(), b"a cat"])
    first, bad, last = preprocess.execute([good, _request([b"junk"], [PROMPT.encode()]), good])
    assert first.error is None and last.error is None and bad.error is not None
    assert first.outputs["image"].shape == (2, 64, 64, 3) and np.array_equal(first.outputs["image"], last.outputs["image"])


# --- the client -------------------------------------------------------------------------------------------

@pytest.fixture
def server(monkeypatch):
    """tritonclient.grpc's client replaced by a recorder that answers with fixed scores (or raises ``error``)."""
    seen = types.SimpleNamespace(urls=[], calls=[], closed=0, error=None, outputs=["SCORES"], row_error=b"",
                                 scores=np.array([[0.25, 0.75]], dtype=np.float32))

    class Client:
        def __init__(self, url):
            seen.urls.append(url)

        def get_model_metadata(self, model_name, as_json=False):
            return {"name": model_name, "outputs": [{"name": n} for n in seen.outputs]}

        def infer(self, model_name, inputs, outputs=None):
            seen.calls.append((model_name, inputs, outputs))
            if seen.error is not None:
                raise seen.error
            answers = {"SCORES": seen.scores, "ERROR": np.array([[seen.row_error]], dtype=object)}
            return types.SimpleNamespace(as_numpy=lambda name: answers.get(name) if name in seen.outputs else None)

        def close(self):
            seen.closed += 1

    monkeypatch.setattr(grpc, "InferenceServerClient", Client)
    return seen


def _sent(tensor) -> list[bytes]:
    """What a tritonclient input carries on the wire (its serialized BYTES content), decoded back."""
    return deserialize_bytes_tensor(tensor._get_content()).tolist()


def test_client_builds_the_ensemble_request_and_returns_the_runtime_record(server, tmp_path):
    path = tmp_path / "fox.png"
    path.write_bytes(_png())
    record = triton_client.score("triton:8001", path, PROMPT)
    assert record == {"quality": 0.25, "alignment": 0.75, "error": None}
    (model, inputs, outputs), = server.calls
    assert server.urls == ["triton:8001"] and server.closed == 1 and model == "ipiqa"
    assert [(i.name(), i.shape(), i.datatype()) for i in inputs] == [("IMAGE", [1, 1], "BYTES"), ("PROMPT", [1, 1], "BYTES")]
    assert _sent(inputs[0]) == [path.read_bytes()] and _sent(inputs[1]) == [PROMPT.encode()]
    assert [o.name() for o in outputs] == ["SCORES"]


def test_client_request_is_what_the_preprocess_model_reads(server, preprocess, tmp_path):
    path = tmp_path / "fox.png"
    path.write_bytes(_png())
    triton_client.score("triton:8001", path, PROMPT)
    (_, inputs, _), = server.calls
    request = {i.name(): Tensor(i.name(), np.array(_sent(i), dtype=object).reshape(i.shape())) for i in inputs}
    (response,) = preprocess.execute([request])
    assert response.error is None and response.outputs["image"].shape == (1, 64, 64, 3)


@pytest.mark.parametrize("prompt", [None, "", "  "])
def test_client_refuses_a_missing_prompt_before_sending(server, tmp_path, prompt):
    path = tmp_path / "fox.png"
    path.write_bytes(_png())
    assert triton_client.score("triton:8001", path, prompt) == {"quality": None, "alignment": None, "error": MISSING_PROMPT}
    assert server.urls == []


def test_client_refuses_an_unreadable_file_as_the_runtime_does(server, runtime, tmp_path):
    record = triton_client.score("triton:8001", tmp_path, PROMPT)  # a directory
    assert record["error"] == runtime.score([str(tmp_path)], [PROMPT])[0]["error"] and server.urls == []


def test_client_server_refusal_becomes_the_row_error(server, tmp_path):
    path = tmp_path / "fox.png"
    path.write_bytes(b"junk")
    server.error = InferenceServerException("ipiqa_preprocess: IMAGE[0]: not a readable image")
    record = triton_client.score("triton:8001", path, PROMPT)
    assert record["quality"] is None and record["error"].startswith("scoring failed: ")
    assert "IMAGE[0]: not a readable image" in record["error"] and server.closed == 1


def test_client_non_finite_scores_are_an_error_row(server, tmp_path):
    path = tmp_path / "fox.png"
    path.write_bytes(_png())
    server.scores = np.array([[np.nan, 0.5]], dtype=np.float32)
    record = triton_client.score("triton:8001", path, PROMPT)
    assert record["quality"] is None and record["error"].startswith("non-finite score")


def test_client_without_tritonclient_names_the_triton_extra(monkeypatch, tmp_path):
    path = tmp_path / "fox.png"
    path.write_bytes(_png())
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ipiqa\[triton\]'"):
        triton_client.score("triton:8001", path, PROMPT)


def test_repository_client_py_prints_the_record_with_the_bundle_output_names(repo, server, tmp_path, monkeypatch, capsys):
    path = tmp_path / "fox.png"
    path.write_bytes(_png())
    assert "['quality', 'alignment']" in (repo / "client.py").read_text()
    monkeypatch.setattr(sys, "argv", ["client.py", str(path), PROMPT, "--url", "triton:8001"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(repo / "client.py"), run_name="__main__")
    assert exit_.value.code == 0 and server.urls == ["triton:8001"]
    assert json.loads(capsys.readouterr().out) == {"quality": 0.25, "alignment": 0.75, "error": None}


def test_client_main_exits_1_on_an_error_row(server, tmp_path, capsys):
    assert triton_client.main([str(tmp_path / "missing.png"), PROMPT]) == 1
    assert "file not found" in json.loads(capsys.readouterr().out)["error"] and server.urls == []


def test_client_reads_ipiqa_serves_error_output_as_the_row_error(server, tmp_path):
    """The same client talks to ``ipiqa serve``, which answers a bad row in ERROR instead of refusing the request."""
    path = tmp_path / "fox.png"
    path.write_bytes(b"junk")
    server.outputs, server.row_error = ["SCORES", "ERROR"], b"IMAGE[0]: not a readable image"
    server.scores = np.array([[np.nan, np.nan]], dtype=np.float32)
    record = triton_client.score("triton:8001", path, PROMPT)
    assert record == {"quality": None, "alignment": None, "error": "IMAGE[0]: not a readable image"}
    (_, _, outputs), = server.calls
    assert [o.name() for o in outputs] == ["SCORES", "ERROR"]


def test_ensemble_config_describes_the_model_as_ipiqa_serve_does(repo, bundle, tiny_bundle):
    from ipiqa.runtime.serve.contract import bundle_sha256, served_model

    config = json_format.MessageToDict(_config(repo, "ipiqa"), preserving_proto_field_name=True)
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    served = served_model(params, [o["name"] for o in config["output"]], "repo")
    assert served.outputs == bundle.config.outputs and served.bundle_sha256 == bundle_sha256(tiny_bundle)
    assert served.needs_prompt is True and served.resolution == bundle.config.resolution
    assert served.has_error_output is False  # the ensemble refuses a bad request instead
