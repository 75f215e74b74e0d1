"""The TensorRT path: everything that runs without TensorRT, and the engine build where it is installed."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ipiqa.bundle import Manifest, check_engine_compat, parse_batch_profile
from ipiqa.errors import BundleError, MissingDependencyError
from ipiqa.export.trt import EngineSpec, build_engine, fp32_layer_names, input_profiles

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_batch_profile_parses_min_opt_max():
    assert parse_batch_profile("1,32,128") == (1, 32, 128)


@pytest.mark.parametrize("text", ["0,1,2", "4,2,8", "1,2", "a,b,c", "1,2,3,4"])
def test_batch_profile_refuses_invalid(text):
    with pytest.raises(ValueError):
        parse_batch_profile(text)


@pytest.mark.parametrize("kwargs", [dict(precision="int8", batch=(1, 2, 4)), dict(precision="fp16", batch=(2, 1, 4)),
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


class _Tensor(SimpleNamespace):
    pass


class _Layer:
    def __init__(self, name, type_, inputs, outputs):
        self.name, self.type, self.precision = name, type_, None
        self._in, self._out = [_Tensor(name=n) for n in inputs], [_Tensor(name=n) for n in outputs]
        self.output_types = {}

    num_inputs = property(lambda self: len(self._in))
    num_outputs = property(lambda self: len(self._out))

    def get_input(self, i):
        return self._in[i]

    def get_output(self, i):
        return self._out[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


def _fake_trt_network():
    trt = SimpleNamespace(float32="f32", LayerType=SimpleNamespace(
        NORMALIZATION="norm", SOFTMAX="softmax", MATRIX_MULTIPLY="mm", ELEMENTWISE="ew", CONVOLUTION="conv"))
    layers = [_Layer("conv", "conv", ["x"], ["c"]), _Layer("ln", "norm", ["c"], ["n"]),
              _Layer("qk", "mm", ["n", "k"], ["s"]), _Layer("mask", "ew", ["s", "m"], ["sm"]),
              _Layer("softmax", "softmax", ["sm"], ["p"]), _Layer("pv", "mm", ["p", "v"], ["o"])]
    net = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    return trt, net, {layer.name: layer for layer in layers}


def test_fp16_engines_pin_norms_softmax_and_its_producer_to_fp32():
    trt, net, layers = _fake_trt_network()
    assert fp32_layer_names(net, trt) == ["ln", "softmax", "mask"]
    assert layers["ln"].precision == "f32" and layers["mask"].output_types == {0: "f32"}
    assert layers["conv"].precision is None and layers["pv"].precision is None  # the FLOPs stay FP16


def _manifest(engines):
    return Manifest(root=Path("/b"), data={"engines": engines})


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
