"""The text graph at BF16 on OpenVINO (issue 30.1): its end-of-text search on integer ids, gated per prompt."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ipiqa.bundle import read_bundle
from ipiqa.model import tokenize

from conftest import needs_hardware

ov = pytest.importorskip("openvino")

PROMPTS = ["a cat", "", "word " * 100, "中文提示词，高清", "🎉🔥 emoji 😀", "<start_of_text> literal <end_of_text>",
           "a painting of a fox in the snow, highly detailed, trending on artstation"]


def _fp32(bundle: Path) -> dict[str, Path]:
    manifest = read_bundle(bundle)
    return {name: manifest.graph_path(name) for name in manifest.onnx.graphs}


def _tokenize(prompts):
    return tokenize(prompts, 77).numpy()


def _search_input_type(model) -> str:
    topk = [op for op in model.get_ops() if op.get_type_name() == "TopK"]
    assert len(topk) == 1
    return topk[0].input_value(0).get_element_type().get_type_name()


def test_the_end_of_text_search_is_moved_onto_int32_ids(tiny_bundle):
    from ipiqa.runtime.backends.openvino_text import integer_end_of_text

    model = ov.Core().read_model(str(_fp32(tiny_bundle)["text_encoder"]))
    assert _search_input_type(model) == "f32"
    assert integer_end_of_text(model) is None
    assert _search_input_type(model) == "i32"


def test_a_graph_without_the_float_search_is_refused_with_the_reason(tiny_bundle):
    from ipiqa.runtime.backends.openvino_text import integer_end_of_text

    model = ov.Core().read_model(str(_fp32(tiny_bundle)["text_encoder"]))
    integer_end_of_text(model)
    assert "0 end-of-text searches" in integer_end_of_text(model)


def test_the_moved_search_reads_the_same_row_at_fp32(tiny_bundle):
    """The rewrite alone changes nothing: at f32 the moved search gives the graph's own embeddings."""
    from ipiqa.runtime.backends.openvino_text import integer_end_of_text

    core, path = ov.Core(), _fp32(tiny_bundle)["text_encoder"]
    model = core.read_model(str(path))
    integer_end_of_text(model)
    tokens = _tokenize(PROMPTS)
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    before = core.compile_model(str(path), "CPU", config)({"tokens": tokens})[0]
    after = core.compile_model(model, "CPU", config)({"tokens": tokens})[0]
    np.testing.assert_array_equal(before, after)


@needs_hardware("avx512_bf16", "amx_bf16")
def test_the_text_graph_at_bf16_passes_the_gate_on_real_prompts(tiny_bundle):
    from ipiqa.export.prompt_sets import datasets_folder, distinct_prompts
    from ipiqa.export.text_bf16 import text_bf16_gate

    real = distinct_prompts(datasets_folder())[::50] if datasets_folder() else []
    gate = text_bf16_gate(_fp32(tiny_bundle), [*PROMPTS, *real], _tokenize, "test subset")
    assert gate.passed, gate.line()
    assert gate.min_cosine >= 0.999 and gate.label == "bf16"


@needs_hardware("avx512_bf16", "amx_bf16")
def test_the_whole_graph_bf16_hint_with_the_float_search_is_refused_by_the_gate(tiny_bundle, monkeypatch):
    """The known trap: without the move, BF16 ids near 49407 tie and the wrong row is read."""
    from ipiqa.export.text_bf16 import text_bf16_gate
    from ipiqa.runtime.backends import openvino_text

    monkeypatch.setattr(openvino_text, "integer_end_of_text", lambda model: None)  # the search left on floats
    gate = text_bf16_gate(_fp32(tiny_bundle), PROMPTS, _tokenize, "test subset")
    assert not gate.passed and gate.min_cosine < 0.999, gate.line()


def test_an_openvino_refusal_is_a_failed_gate_with_its_reason(tiny_bundle, monkeypatch):
    from ipiqa.export.text_bf16 import text_bf16_gate
    from ipiqa.runtime.backends import openvino_text

    monkeypatch.setattr(openvino_text, "integer_end_of_text", lambda model: "a graph of another shape")
    gate = text_bf16_gate(_fp32(tiny_bundle), PROMPTS, _tokenize, "test subset")
    assert not gate.passed and "a graph of another shape" in gate.line()


# ---------------------------------------------------------------- export record and serving


class _Recorded:
    def __init__(self, passed: bool):
        self.bf16_text_passed = passed


@pytest.mark.parametrize("passed", [True, False])
def test_the_text_graph_is_served_at_bf16_only_where_its_gate_passed_and_the_cpu_has_bf16(cpu_family, passed):
    from ipiqa.runtime.backends.openvino import inference_precisions, text_bf16_servable

    servable = text_bf16_servable(_Recorded(passed))
    assert servable == (passed and cpu_family.bf16)
    assert inference_precisions("bf16", servable)["text_encoder"] == ("bf16" if servable else "fp32")
    assert inference_precisions("int8", servable) == {"image_encoder": "fp32", "text_encoder": "bf16" if servable
                                                     else "fp32", "fusion": "fp32"}
    assert inference_precisions("fp32", True)["text_encoder"] == "fp32"  # the fp32 set is never reduced


def test_bf16_text_without_bf16_is_refused(tiny_model_file):
    from click.testing import CliRunner

    from ipiqa.export.cli import main

    result = CliRunner().invoke(main, [str(tiny_model_file), "-o", "unused", "--onnx-only", "--bf16-text"])
    assert result.exit_code == 2 and "--bf16-text goes with --bf16" in result.output


def _export(model_file, out: Path, progress=lambda m: None):
    from ipiqa.checkpoint import load_model
    from ipiqa.export.bundle_export import ExportOptions, export_bundle

    from conftest import hardware_flags_only

    with hardware_flags_only():
        return export_bundle(load_model(model_file), [model_file], out,
                             ExportOptions(onnx_only=True, bf16=True, bf16_text=True), progress=progress)


@pytest.fixture(scope="module")
def bf16_text_bundle(tiny_model_file, tmp_path_factory):
    from ipiqa.runtime.cpu import bf16_refusal, hardware_flags

    why = bf16_refusal(hardware_flags())
    if why:
        pytest.skip(f"the BF16 gates run only where BF16 runs natively: {why}")
    out = tmp_path_factory.mktemp("bf16_text") / "bundle"
    return out, _export(tiny_model_file, out)


@needs_hardware("avx512_bf16", "amx_bf16")
def test_the_export_records_the_text_gate_over_every_dataset_prompt(bf16_text_bundle):
    from ipiqa.export.prompt_sets import datasets_folder, distinct_prompts

    bundle, report = bf16_text_bundle
    entry = read_bundle(bundle).onnx.bf16_text
    assert entry is not None and entry.passed and entry.min_cosine >= 0.999 and report.bf16_text["passed"]
    assert entry.runtime.startswith("openvino ") and ("avx512_bf16" in entry.cpu or "amx_bf16" in entry.cpu)
    if datasets_folder():
        # every distinct prompt of the 18,784 strings of the label files, and the gate's own
        assert entry.prompts > len(distinct_prompts(datasets_folder())) == 15725


@needs_hardware("avx512_bf16", "amx_bf16")
def test_the_served_text_graph_runs_bf16_and_stays_within_the_bound(bf16_text_bundle):
    from ipiqa.export.checks import BOUNDS
    from ipiqa.export.measures import cosine_result
    from ipiqa.runtime.backends.openvino import OpenVinoBackend
    from ipiqa.runtime.backends.ort import OrtBackend

    m = read_bundle(bf16_text_bundle[0])
    tokens = _tokenize(PROMPTS)
    with OpenVinoBackend(m, "bf16") as ov, OrtBackend(m) as ort:
        assert ov.served["text_encoder"] == "bf16" and ov.name == "openvino-cpu-bf16+text-bf16"
        assert cosine_result("text", ort.encode_text(tokens), ov.encode_text(tokens), BOUNDS["bf16"].cosine_min)


@needs_hardware("avx512_bf16", "amx_bf16")
def test_a_second_export_reuses_the_text_gate(bf16_text_bundle, tiny_model_file):
    bundle, _ = bf16_text_bundle
    again = _export(tiny_model_file, bundle)
    assert again.reused_bf16_text and again.bf16_text == bf16_text_bundle[1].bf16_text


@needs_hardware("avx512_bf16", "amx_bf16")
def test_a_failed_text_gate_is_recorded_and_the_text_graph_stays_fp32(tiny_model_file, tmp_path, monkeypatch):
    from ipiqa.export import text_bf16
    from ipiqa.export.text_int8 import TextInt8Gate
    from ipiqa.runtime.backends.openvino import OpenVinoBackend

    monkeypatch.setattr(text_bf16, "text_bf16_gate", lambda *a, **k: TextInt8Gate(0.9, 0.1, 3, "test", 0.999, None,
                                                                                 "a cat", label="bf16"))
    _export(tiny_model_file, tmp_path / "bundle")
    m = read_bundle(tmp_path / "bundle")
    assert m.onnx.bf16_text is not None and not m.onnx.bf16_text.passed
    with OpenVinoBackend(m, "bf16") as ov:
        assert ov.served["text_encoder"] == "fp32" and ov.name == "openvino-cpu-bf16"
