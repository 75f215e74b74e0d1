"""The Triton model repository: strict config parsing, names/shapes equal the ONNX graphs, a wired ensemble."""
from __future__ import annotations

import importlib.util
import io
import json
import py_compile
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from ipiqa.bundle import read_bundle
from ipiqa.errors import IPIQAError
from ipiqa.export.triton import MODEL_NAMES, write_triton_repository
from ipiqa.preprocess import resized

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs ipiqa[triton]")
text_format = pytest.importorskip("google.protobuf.text_format")

DTYPES = {"tensor(float)": model_config_pb2.TYPE_FP32, "tensor(int64)": model_config_pb2.TYPE_INT64}


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return read_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory):
    return write_triton_repository(bundle, tmp_path_factory.mktemp("repo") / "models", max_batch=64)


def _config(repo, name):
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_repository_has_the_five_models_with_their_files(repo):
    assert {p.name for p in repo.iterdir() if p.is_dir()} == {*MODEL_NAMES.values(), "ipiqa_preprocess", "ipiqa"}
    for graph, name in MODEL_NAMES.items():
        assert {f.name for f in (repo / name / "1").iterdir()} == {"model.onnx", f"{graph}.onnx.data"}
    assert (repo / "ipiqa_preprocess" / "1" / "tokenizer.json").is_file()


@pytest.mark.parametrize("graph", list(MODEL_NAMES))
def test_config_names_types_and_shapes_equal_the_onnx_graph(repo, graph):
    cfg = _config(repo, MODEL_NAMES[graph])
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert cfg.dynamic_batching.preferred_batch_size and cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    sess = ort.InferenceSession(str(repo / MODEL_NAMES[graph] / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in ((cfg.input, sess.get_inputs()), (cfg.output, sess.get_outputs())):
        assert [t.name for t in declared] == [a.name for a in actual]
        for t, a in zip(declared, actual):
            assert list(t.dims) == a.shape[1:] and t.data_type == DTYPES[a.type]


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


def test_preprocess_model_equals_the_runtime_preprocessing(repo, bundle, monkeypatch):
    """Run the python-backend model against a minimal stand-in for triton_python_backend_utils."""
    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    fake = types.SimpleNamespace(Tensor=Tensor, TritonError=str,
                                 InferenceResponse=lambda output_tensors=(), error=None: (output_tensors, error),
                                 get_input_tensor_by_name=lambda req, name: req[name])
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("ipiqa_pre", repo / "ipiqa_preprocess" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model_config = json.dumps({"parameters": {"resolution": {"string_value": "64"}, "context_length": {"string_value": "77"}}})
    model.initialize({"model_config": model_config, "model_repository": str(repo / "ipiqa_preprocess"), "model_version": "1"})
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    request = {"IMAGE": Tensor("IMAGE", np.array([[buf.getvalue()]], dtype=object)),
               "PROMPT": Tensor("PROMPT", np.array([["a red fox".encode()]], dtype=object))}
    (outputs, error), (_, bad) = model.execute([request, {"IMAGE": Tensor("IMAGE", np.array([[b"junk"]], dtype=object)),
                                                          "PROMPT": request["PROMPT"]}])
    assert error is None and bad.startswith("ipiqa_preprocess:")
    image, tokens = (t.array for t in outputs)
    assert image.dtype == np.uint8 and np.array_equal(image[0], resized(img, 64))
    assert tokens[0, :3].tolist()[0] == 49406 and tokens.shape == (1, 77)


def test_client_example_is_valid_python(repo):
    py_compile.compile(str(repo / "client.py"), doraise=True)
    assert "['quality', 'alignment']" in (repo / "client.py").read_text()


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
