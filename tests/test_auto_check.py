"""``auto`` measured, not assumed (issue 30.3): the auto row within 10% of the fastest gated row, per prompt mix."""
from __future__ import annotations

from types import SimpleNamespace

from benchmarks.auto_check import AutoCheck, auto_reason, check_auto, markdown


def _row(backend, rate, batch=8, mix=10, **kw):
    return {"backend": backend, "batch": batch, "images_per_prompt": mix, "images_per_s": rate, **kw}


def _auto(rate, batch=8, mix=10):
    return _row("auto", rate, batch, mix, picked="openvino-cpu-int8")


def test_auto_within_ten_percent_of_the_fastest_gated_row_passes():
    (check,) = check_auto([_row("onnxruntime-cpu", 3.4), _row("openvino-cpu-int8", 10.0), _auto(9.1)])
    assert check.passed is True and check.fastest == "openvino-cpu-int8" and check.picked == "openvino-cpu-int8"
    assert check.ratio == 9.1 / 10.0


def test_auto_more_than_ten_percent_below_the_fastest_gated_row_fails():
    (check,) = check_auto([_row("onnxruntime-cpu-int8", 10.0), _row("openvino-cpu-int8", 7.0), _auto(8.9)])
    assert check.passed is False and check.fastest == "onnxruntime-cpu-int8" and "cpu_auto_choice" in check.note


def test_without_gated_rows_there_is_no_verdict():
    (check,) = check_auto([_row("reference-eager-fp32", 1.4), _row("onnxruntime-cpu-int8", None), _auto(9.0)])
    assert check.passed is None and check.fastest is None and "no gated row" in check.note


def test_without_an_auto_figure_there_is_no_verdict():
    (check,) = check_auto([_row("onnxruntime-cpu", 3.0), _row("auto", None)])
    assert check.passed is None and "no auto figure" in check.note


def test_best_batch_is_compared_with_best_batch_and_ungated_rows_are_ignored():
    runs = [_row("openvino-cpu-int8", 8.0, batch=1), _row("openvino-cpu-int8", 11.0, batch=8),
            _row("runtime-torch-fp32", 50.0), _row("onnxruntime-cpu-straightforward-pools", 40.0),
            _auto(7.0, batch=1), _auto(10.5, batch=8)]
    (check,) = check_auto(runs)
    assert (check.auto_batch, check.fastest_batch, check.passed) == (8, 8, True)


def test_each_prompt_mix_gets_its_own_verdict():
    runs = [_row("openvino-cpu-int8", 11.0, mix=10), _auto(10.8, mix=10),
            _row("openvino-cpu-int8", 6.0, mix=1), _row("onnxruntime-cpu-int8", 9.0, mix=1), _auto(6.1, mix=1)]
    verdicts = {c.images_per_prompt: c.passed for c in check_auto(runs)}
    assert verdicts == {10: True, 1: False}


def test_the_report_names_the_pick_the_reason_and_the_verdict():
    checks = check_auto([_row("openvino-cpu-int8", 10.0), _auto(9.5)]) + [
        AutoCheck(1, "openvino-cpu-int8", 5.0, 8, "onnxruntime-cpu-int8", 8.0, 8, 0.625, False, "below")]
    text = markdown(checks, "because")
    assert "| 10 | openvino-cpu-int8 | 9.50 (8) | openvino-cpu-int8 | 10.00 (8) | 0.95 | pass:" in text
    assert "| **FAIL**: below |" in text and "Why: because." in text


def test_the_reason_names_the_bundle_gates_and_the_cpu_flags_the_rule_reads():
    manifest = SimpleNamespace(onnx=SimpleNamespace(int8={"cpu": SimpleNamespace(openvino_passed=False)}),
                               onnx_precisions=("fp32", "int8"))
    text = auto_reason(manifest, frozenset({"avx2", "avx512_vnni", "avx512_bf16"}))
    assert "INT8 image graph gated: yes" in text and "OpenVINO INT8 gate passed: no" in text and "BF16 gate recorded: no" in text
    assert "INT8 dot flags avx512_vnni" in text and "BF16 flags avx512_bf16" in text
