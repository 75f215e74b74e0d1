"""The TensorRT path: everything that runs without TensorRT, and the engine build where it is installed."""
from __future__ import annotations

import ast
import ctypes
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from ipiqa.bundle import Manifest, check_engine_compat, parse_batch_profile
from ipiqa.errors import BundleError, IPIQAError, MissingDependencyError
from ipiqa.export.trt import EngineSpec, build_engine, input_profiles

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_batch_profile_parses_min_opt_max():
    assert parse_batch_profile("1,32,128") == (1, 32, 128)


@pytest.mark.parametrize("text", ["0,1,2", "4,2,8", "1,2", "a,b,c", "1,2,3,4"])
def test_batch_profile_refuses_invalid(text):
    with pytest.raises(ValueError):
        parse_batch_profile(text)


@pytest.mark.parametrize("kwargs", [dict(precision="bf16", batch=(1, 2, 4)), dict(precision="fp16", batch=(2, 1, 4)),
                                    dict(precision="fp16", batch=(1, 2, 4), workspace_gib=0)])
def test_engine_spec_refuses_bad_options(kwargs):
    with pytest.raises(ValueError):
        EngineSpec(**kwargs)


def test_profiles_vary_only_the_batch_axis():
    profiles = input_profiles({"image": (None, 3, 512, 512), "tokens": ("batch", 77)}, (1, 32, 128))
    assert profiles["image"] == ((1, 3, 512, 512), (32, 3, 512, 512), (128, 3, 512, 512))
    assert profiles["tokens"] == ((1, 77), (32, 77), (128, 77))


def test_profiles_refuse_a_dynamic_non_batch_axis():
    with pytest.raises(Exception, match="only batch may vary"):
        input_profiles({"image": (None, 3, -1, 512)}, (1, 2, 4))


# --- TensorRT API removed in 11.x (weakly typed builds) must not come back --------------------------------

REMOVED_ATTRS = {"platform_has_fast_fp16", "platform_has_fast_int8", "platform_has_tf32", "set_output_type",
                 "output_type_is_set", "reset_output_type", "precision_is_set", "reset_precision",
                 "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "EXPLICIT_BATCH", "int8_calibrator",
                 "set_dynamic_range", "dynamic_range"}
REMOVED_BUILDER_FLAGS = {"FP16", "INT8", "BF16", "FP8", "INT4"}
REMOVED_NAMES = {"IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
                 "IInt8LegacyCalibrator"}
SCANNED = ("export", "runtime", "benchmarks")


def removed_tensorrt_api(source: str, filename: str = "<snippet>") -> list[str]:
    """Uses of API TensorRT 11 no longer has, found in the syntax tree (comments and docstrings are fine)."""
    hits = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute):
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            if node.attr in REMOVED_ATTRS | REMOVED_NAMES:
                hits.append(f"{where} .{node.attr}")
            elif owner == "BuilderFlag" and node.attr in REMOVED_BUILDER_FLAGS:
                hits.append(f"{where} BuilderFlag.{node.attr}")
            elif node.attr == "precision" and isinstance(node.ctx, ast.Store) and owner != "self":
                hits.append(f"{where} ILayer.precision assignment")
        elif isinstance(node, ast.Name) and node.id in REMOVED_NAMES:
            hits.append(f"{where} {node.id}")
        elif isinstance(node, ast.Constant) and node.value in REMOVED_ATTRS:  # getattr(trt, "...") spelled out
            hits.append(f"{where} {node.value!r}")
    return hits


def test_no_removed_tensorrt_api_is_referenced():
    root = Path(__file__).resolve().parents[1]
    files = [f for d in SCANNED for f in sorted((root / d).rglob("*.py"))]
    assert any(f.name == "trt.py" for f in files)  # the scan sees the engine builder
    hits = [h for f in files for h in removed_tensorrt_api(f.read_text(encoding="utf-8"), str(f.relative_to(root)))]
    assert not hits, "API removed in TensorRT 11 (build strongly typed; precision comes from the graph):\n" + "\n".join(hits)


@pytest.mark.parametrize("snippet", [
    "config.set_flag(trt.BuilderFlag.FP16)", "config.set_flag(tensorrt.BuilderFlag.INT8)",
    "config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)", "if builder.platform_has_fast_fp16: pass",
    "layer.precision = trt.float32", "layer.set_output_type(0, trt.float32)", "class C(trt.IInt8EntropyCalibrator2): pass",
    "getattr(builder, 'platform_has_fast_fp16')", "net = b.create_network(1 << int(F.EXPLICIT_BATCH))",
])
def test_the_removed_api_scan_catches(snippet):
    assert removed_tensorrt_api(snippet)


def test_the_removed_api_scan_allows_the_strongly_typed_path():
    assert not removed_tensorrt_api("b.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))\n"
                                    "p = spec.precision\nself.precision = 'fp16'\n# layer.precision = trt.float32")


# --- the builder's call sequence, on a fake tensorrt holding only API present in both 10.x and 11.x ---------

class _Recorder:
    def __init__(self, calls: list, name: str, **returns):
        self._calls, self._name, self._returns = calls, name, returns

    def _method(self, method: str):
        def call(*args, **kwargs):
            self._calls.append((f"{self._name}.{method}", args, kwargs))
            value = self._returns.get(method)
            return value() if callable(value) else value
        return call


class _Builder(_Recorder):
    def __init__(self, calls, logger, built=b"ENGINE"):
        super().__init__(calls, "builder")
        calls.append(("Builder", (logger,), {}))
        self.network = _Network(calls)
        self.config = _Config(calls)
        self.profile = _Profile(calls)
        self.built = built

    def create_network(self, flags):
        self._calls.append(("builder.create_network", (flags,), {}))
        return self.network

    def create_builder_config(self):
        self._calls.append(("builder.create_builder_config", (), {}))
        return self.config

    def create_optimization_profile(self):
        self._calls.append(("builder.create_optimization_profile", (), {}))
        return self.profile

    def build_serialized_network(self, network, config):
        self._calls.append(("builder.build_serialized_network", (network, config), {}))
        return self.built


class _Network:  # nothing may be called on it: precision is not set per layer any more
    def __init__(self, calls):
        pass


class _Profile(_Recorder):
    def __init__(self, calls):
        super().__init__(calls, "profile")

    def set_shape(self, *args):
        self._method("set_shape")(*args)


class _Cache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return self.data + b"+new"


class _Config(_Recorder):
    def __init__(self, calls):
        super().__init__(calls, "config")
        self.cache = None

    def set_memory_pool_limit(self, pool, size):
        self._method("set_memory_pool_limit")(pool, size)

    def add_optimization_profile(self, profile):
        self._method("add_optimization_profile")(profile)

    def create_timing_cache(self, data):
        self._method("create_timing_cache")(data)
        return _Cache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self._method("set_timing_cache")(cache, ignore_mismatch=ignore_mismatch)
        self.cache = cache

    def get_timing_cache(self):
        return self.cache


class _Parser:
    def __init__(self, calls, network, logger, ok=True):
        calls.append(("OnnxParser", (network, logger), {}))
        self._calls, self._ok = calls, ok
        self.num_errors = 0 if ok else 1

    def parse_from_file(self, path):
        self._calls.append(("parser.parse_from_file", (path,), {}))
        return self._ok

    def get_error(self, i):
        return "In node 3 (Foo): unsupported"


def fake_tensorrt(calls: list, parse_ok: bool = True, built=b"ENGINE") -> ModuleType:
    """The intersection of TensorRT 10.x and 11.x that the builder may use; anything else is AttributeError."""
    trt = ModuleType("tensorrt")
    trt.__version__ = "11.4.0"
    trt.Logger = type("Logger", (), {"WARNING": "warning", "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
    trt.BuilderFlag = SimpleNamespace(TF32=7, DEBUG=0)  # no FP16, INT8, precision constraints
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    holder: dict = {}
    trt.Builder = lambda logger: holder.setdefault("builder", _Builder(calls, logger, built))
    trt.OnnxParser = lambda network, logger: _Parser(calls, network, logger, parse_ok)
    return trt


def _graph(tmp_path: Path, precision: str) -> Path:
    """A one-Conv graph in the given precision (fp32, fp16 via the converter, or int8 as Q/DQ)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    nodes, inits = [helper.make_node("Conv", ["image", "w"], ["y"])], [w]
    if precision == "int8":
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["image", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
                 helper.make_node("Conv", ["dq", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, 4, 4])], inits)
    path = tmp_path / f"g.{precision}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    if precision == "fp16":
        from ipiqa.export.fp16 import convert_to_fp16

        path = convert_to_fp16(path, tmp_path / "g.fp16.onnx").path
    return path


PROFILES = {"image": ((1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4))}


def test_build_is_strongly_typed_and_calls_only_api_in_tensorrt_10_and_11(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    graph, cache = _graph(tmp_path, "fp16"), tmp_path / "timing.cache"
    blob = build_engine(graph, PROFILES, EngineSpec("fp16", (1, 2, 4), workspace_gib=1.0), timing_cache=cache)
    assert blob == b"ENGINE" and cache.read_bytes() == b"+new"
    assert [c[0] for c in calls] == [
        "Builder", "builder.create_network", "OnnxParser", "parser.parse_from_file", "builder.create_builder_config",
        "config.set_memory_pool_limit", "builder.create_optimization_profile", "profile.set_shape",
        "config.add_optimization_profile", "config.create_timing_cache", "config.set_timing_cache",
        "builder.build_serialized_network"]
    args = {name: (a, k) for name, a, k in calls}
    assert args["builder.create_network"][0] == (1 << 5,)  # STRONGLY_TYPED, and nothing else
    assert args["parser.parse_from_file"][0] == (str(graph),)
    assert args["config.set_memory_pool_limit"][0] == ("workspace", 1 << 30)
    assert args["profile.set_shape"][0] == ("image", *PROFILES["image"])
    assert args["config.set_timing_cache"][1] == {"ignore_mismatch": False}


def test_build_reuses_an_existing_timing_cache(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    build_engine(_graph(tmp_path, "fp32"), PROFILES, EngineSpec("fp32", (1, 2, 4)), timing_cache=cache)
    assert ("config.create_timing_cache", (b"old",), {}) in calls and cache.read_bytes() == b"old+new"


@pytest.mark.parametrize("engine, graph", [("fp16", "fp32"), ("fp32", "fp16"), ("int8", "fp32"), ("fp16", "int8")])
def test_a_graph_of_another_precision_is_refused_before_building(tmp_path, monkeypatch, engine, graph):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    path = _graph(tmp_path, graph)
    with pytest.raises(IPIQAError, match=f"{path.name}: this graph is {graph} but a {engine} engine"):
        build_engine(path, PROFILES, EngineSpec(engine, (1, 2, 4)))
    assert calls == []


@pytest.mark.parametrize("graph", ["int8", "fp16"])
def test_int8_engines_build_from_the_qdq_graph_or_an_fp16_graph(tmp_path, monkeypatch, graph):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([]))
    assert build_engine(_graph(tmp_path, graph), PROFILES, EngineSpec("int8", (1, 2, 4))) == b"ENGINE"


def test_an_int8_graph_quantized_for_the_cpu_is_refused(tmp_path, monkeypatch):
    import onnx

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([]))
    path = _graph(tmp_path, "int8")
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "ipiqa.int8", json.dumps({"target": "cpu"})
    onnx.save(model, str(path))
    with pytest.raises(IPIQAError, match="quantized for cpu.*target='tensorrt'"):
        build_engine(path, PROFILES, EngineSpec("int8", (1, 2, 4)))


def test_a_parse_error_names_the_graph_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([], parse_ok=False))
    path = _graph(tmp_path, "fp32")
    with pytest.raises(IPIQAError, match=f"{path}: TensorRT could not parse the graph: In node 3"):
        build_engine(path, PROFILES, EngineSpec("fp32", (1, 2, 4)))


def test_a_failed_build_names_the_graph_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([], built=None))
    path = _graph(tmp_path, "fp32")
    with pytest.raises(IPIQAError, match=f"{path}: TensorRT engine build failed"):
        build_engine(path, PROFILES, EngineSpec("fp32", (1, 2, 4)))


def test_a_missing_graph_file_says_to_export_first(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([]))
    with pytest.raises(IPIQAError, match="g.onnx: no such ONNX graph; export the bundle first"):
        build_engine(tmp_path / "g.onnx", PROFILES, EngineSpec("fp32", (1, 2, 4)))


def _manifest(engines, root=Path("/b")):
    """A minimal valid manifest around ``engines`` (a partial ``engines`` entry, or None)."""
    from ipiqa.bundle import BUNDLE_FORMAT, GRAPHS
    from ipiqa.config import IPIQAConfig

    if engines is not None:
        engines = {"tensorrt": "10.3.0", "gpu": "gpu", "compute_capability": "9.0", "precision": "fp16",
                   "batch": [1, 4, 8], "workspace_gib": 1.0, "key": "k", "graphs": {}, **engines}
    return Manifest.from_dict({
        "format": BUNDLE_FORMAT, "config": IPIQAConfig().to_dict(), "engines": engines,
        "precision": engines["precision"] if engines else "fp32",
        "onnx": {"opset": 18, "pooling": "single_query",
                 "graphs": {g: {"file": f"{g}.onnx", "inputs": [], "outputs": []} for g in GRAPHS}},
        "tokenizer": {"files": {"json": "tokenizer/tokenizer.json"}}, "versions": {"ipiqa": "0.1.0"},
        "source": {"files": [], "key": "k"}, "parity": {"rule": {}}, "files": {}}, root)


def test_engines_from_another_gpu_are_refused():
    m = _manifest({"tensorrt": "10.3.0", "gpu": "NVIDIA A100", "compute_capability": "8.0"})
    with pytest.raises(BundleError, match="built for NVIDIA A100 \\(sm 8.0\\).*H100.*sm 9.0.*on this machine"):
        check_engine_compat(m, "10.3.0", "NVIDIA H100", "9.0")


def test_engines_from_another_tensorrt_version_are_refused():
    m = _manifest({"tensorrt": "10.3.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"})
    with pytest.raises(BundleError, match="TensorRT 10.3.0.*has 10.7.0"):
        check_engine_compat(m, "10.7.0", "NVIDIA H100", "9.0")


def test_onnx_only_bundle_asked_for_engines_says_how_to_build_them():
    with pytest.raises(BundleError, match="--onnx-only.*--fp16"):
        check_engine_compat(_manifest(None), "10.3.0", "NVIDIA H100", "9.0")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the missing-package message is not reachable")
def test_build_without_tensorrt_names_the_extra(tmp_path):
    with pytest.raises(MissingDependencyError, match=r"pip install 'ipiqa\[tensorrt\]'"):
        build_engine(tmp_path / "g.onnx", {}, EngineSpec("fp16", (1, 2, 4)))


def _cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


ENGINE_SKIP = ("tensorrt is not installed (pip install 'ipiqa[tensorrt]' on a GPU machine)" if not HAS_TRT
               else None if _cuda() else "TensorRT engines need a CUDA GPU")


@pytest.mark.tensorrt
@pytest.mark.skipif(ENGINE_SKIP is not None, reason=ENGINE_SKIP or "")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engines_build_strongly_typed_with_float32_io(tmp_path, precision):
    trt = pytest.importorskip("tensorrt")
    blob = build_engine(_graph(tmp_path, precision), PROFILES, EngineSpec(precision, (1, 2, 4), 1.0))
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(blob)
    assert engine.get_tensor_dtype("image") == trt.float32 and engine.get_tensor_dtype("y") == trt.float32


@pytest.mark.tensorrt
@pytest.mark.skipif(ENGINE_SKIP is not None, reason=ENGINE_SKIP or "")
def test_fp16_engines_pass_the_gate_and_are_recorded(tiny_model_file, tmp_path):
    from ipiqa.checkpoint import load_model
    from ipiqa.export.bundle_export import ExportOptions, export_bundle

    report = export_bundle(load_model(tiny_model_file), [tiny_model_file], tmp_path / "b",
                           ExportOptions(engine=EngineSpec("fp16", (1, 4, 16), 1.0)), progress=print)
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert all(report.parity) and data["precision"] == "fp16" and data["engines"]["compute_capability"]
    assert all((tmp_path / "b" / g["file"]).is_file() for g in data["engines"]["graphs"].values())
    again = export_bundle(load_model(tiny_model_file), [tiny_model_file], tmp_path / "b",
                          ExportOptions(engine=EngineSpec("fp16", (1, 4, 16), 1.0)), progress=print)
    assert again.reused_engines
    shutil.rmtree(tmp_path / "b")


def test_fp16_gate_fails_when_ranking_breaks_within_the_absolute_bound():
    from ipiqa.export.parity import compare

    ref = np.linspace(0, 0.5, 64)[:, None]  # scores 0.008 apart: a 0.015 shuffle stays under 2e-2 but reorders
    out = ref + np.where(np.arange(64) % 2 == 0, 0.015, -0.0)[:, None]
    result = compare("engines[fp16]/scores", ref, out, scores=True, fp16=True)
    assert result.max_abs <= 2e-2 and result.spearman < 0.999 and not result


def test_fp16_gate_fails_above_the_absolute_bound_even_in_order():
    from ipiqa.export.parity import compare

    ref = np.linspace(0, 5, 64)[:, None]
    assert not compare("engines[fp16]/scores", ref, ref + 0.03, scores=True, fp16=True)
    assert compare("engines[fp16]/scores", ref, ref + 0.01, scores=True, fp16=True)


# --- build_engine keeps only the outputs asked for (the fusion graph's gate-only ``pooled`` is dropped) ------

class _Tensor:
    def __init__(self, name):
        self.name = name


class _OutputsNetwork:
    def __init__(self, calls, names):
        self._calls, self._outputs = calls, [_Tensor(n) for n in names]

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_output(self, i):
        return self._outputs[i]

    def unmark_output(self, tensor):
        self._calls.append(("network.unmark_output", (tensor.name,), {}))
        self._outputs.remove(tensor)


def test_build_unmarks_the_outputs_the_runtime_does_not_read(tmp_path, monkeypatch):
    calls: list = []
    trt = fake_tensorrt(calls)
    network = _OutputsNetwork(calls, ["scores", "pooled"])
    builder = trt.Builder("logger")
    builder.network = network
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    build_engine(_graph(tmp_path, "fp32"), PROFILES, EngineSpec("fp32", (1, 2, 4)), outputs=["scores"])
    assert ("network.unmark_output", ("pooled",), {}) in calls and [t.name for t in network._outputs] == ["scores"]
    with pytest.raises(IPIQAError, match="has no output \\['logits'\\]"):
        build_engine(_graph(tmp_path, "fp32"), PROFILES, EngineSpec("fp32", (1, 2, 4)), outputs=["logits"])


def test_the_fusion_graphs_pooled_output_is_for_the_gate_only():
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import demo_model
    from ipiqa.export.graphs import graph_specs
    from conftest import TINY

    spec = graph_specs(demo_model(IPIQAConfig(**TINY)))["fusion"]
    assert spec.outputs == ("scores", "pooled") and spec.runtime_outputs == ("scores",)


# --- the runtime's TensorRT backend on a fake tensorrt and a fake CUDA runtime -----------------------------

class _Named:
    def __init__(self, name):
        self.name = name


class _FakeEngine:
    """IO tensors as (name, mode, dtype, per-row shape); the batch axis is -1 as in a dynamic-batch engine."""

    def __init__(self, io):
        self.io = io
        self.num_io_tensors = len(io)
        self.contexts = []

    def _find(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return _Named(self._find(name)[1])

    def get_tensor_dtype(self, name):
        return _Named(self._find(name)[2])

    def get_tensor_shape(self, name):
        return (-1, *self._find(name)[3])

    def create_execution_context(self):
        ctx = SimpleNamespace(addresses={}, shapes={})
        ctx.set_tensor_address = lambda tensor, ptr: ctx.addresses.__setitem__(tensor, ptr)
        ctx.set_input_shape = lambda tensor, shape: ctx.shapes.__setitem__(tensor, shape)
        ctx.execute_async_v3 = lambda stream: True
        self.contexts.append(ctx)
        return ctx


ENGINE_IO = {
    "image_encoder": [("image", "INPUT", "UINT8", (8, 8, 3)), ("feature_map", "OUTPUT", "FLOAT", (4, 1, 1)),
                      ("image_embedding", "OUTPUT", "FLOAT", (2,))],
    "text_encoder": [("tokens", "INPUT", "INT64", (77,)), ("text_embedding", "OUTPUT", "FLOAT", (2,))],
    "fusion": [("feature_map", "INPUT", "FLOAT", (4, 1, 1)), ("image_embedding", "INPUT", "FLOAT", (2,)),
               ("text_embedding", "INPUT", "FLOAT", (2,)), ("scores", "OUTPUT", "FLOAT", (2,)),
               ("pooled", "OUTPUT", "FLOAT", (2,))],  # an engine built with the gate-only output still binds
}


class _FakeCudart:
    def __init__(self):
        self.calls, self.pinned, self.next_ptr = [], [], 1000
        self.cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            if name == "cudaGetDeviceProperties":
                return 0, SimpleNamespace(name=b"NVIDIA H100", major=9, minor=0)
            if name == "cudaStreamCreate":
                return 0, 77
            if name == "cudaMalloc":
                self.next_ptr += 1
                return 0, self.next_ptr
            if name == "cudaMallocHost":
                buf = (ctypes.c_byte * args[0])()
                self.pinned.append(buf)
                return 0, ctypes.addressof(buf)
            return (0,)
        return call

    def count(self, name):
        return sum(1 for c in self.calls if c[0] == name)


@pytest.fixture
def fake_trt_backend(tmp_path, monkeypatch):
    import ipiqa.runtime.backends.trt as backend_module

    engines = {}
    trt = ModuleType("tensorrt")
    trt.__version__ = "11.4.0"
    trt.Logger = type("Logger", (), {"WARNING": 1, "__init__": lambda self, level: None})
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda blob: engines[blob.decode()])
    graphs = {}
    for name, io in ENGINE_IO.items():
        engines[name] = _FakeEngine(io)
        (tmp_path / f"{name}.plan").write_bytes(name.encode())
        graphs[name] = {"file": f"{name}.plan", "onnx": f"{name}.onnx"}
    cudart = _FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(backend_module, "_cudart", lambda: cudart)
    manifest = _manifest({"tensorrt": "11.4.0", "gpu": "NVIDIA H100", "compute_capability": "9.0",
                          "precision": "fp16", "batch": [1, 4, 8], "graphs": graphs}, tmp_path)
    return backend_module.TrtBackend(manifest), engines, cudart


def test_trt_backend_binds_every_engine_io_tensor_with_pinned_memory_only_for_host_tensors(fake_trt_backend):
    backend, engines, cudart = fake_trt_backend
    for name, engine in engines.items():
        (ctx,) = engine.contexts
        assert set(ctx.addresses) == {t[0] for t in ENGINE_IO[name]}, name
    assert engines["image_encoder"].contexts[0].addresses["feature_map"] == engines["fusion"].contexts[0].addresses["feature_map"]
    assert set(backend.host) == {"image", "tokens", "text_embedding", "scores"}  # no pinned buffer for pooled etc.
    assert backend.host["image"][1].dtype == np.uint8 and backend.host["tokens"][1].shape == (8, 77)
    assert cudart.count("cudaMalloc") == 7 and backend.name == "tensorrt-fp16"


def test_trt_backend_close_frees_everything_and_destroys_its_stream_once(fake_trt_backend):
    backend, _, cudart = fake_trt_backend
    backend.close()
    backend.close()
    assert cudart.count("cudaFree") == 7 and cudart.count("cudaFreeHost") == 4
    assert cudart.calls.count(("cudaStreamDestroy", (77,))) == 1


def test_trt_backend_runs_the_profile_batch_and_refuses_others(fake_trt_backend):
    backend, engines, _ = fake_trt_backend
    backend._encode_image(np.zeros((3, 8, 8, 3), np.uint8))
    assert engines["image_encoder"].contexts[0].shapes == {"image": (3, 8, 8, 3)}
    with pytest.raises(IPIQAError, match="batch 9 is outside the engines' profile \\[1, 8\\]"):
        backend._run("fusion", 9)
    backend.close()
