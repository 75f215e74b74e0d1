"""One FP32 text reference per export: every text gate (INT8 at each reduce_range, BF16) reads the same FP32
embeddings, computed once, and judges exactly as it did with its own."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the text gates need ipiqa[export]")

from ipiqa.export import text_int8  # noqa: E402
from ipiqa.export.text_int8 import quantize_text_graph, text_gate_prompts, text_int8_gate  # noqa: E402
from ipiqa.export.text_reference import TextReference  # noqa: E402

from conftest import needs_hardware  # noqa: E402


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from test_fp16 import export_graphs, tiny_model

    model = tiny_model()
    out = tmp_path_factory.mktemp("text_reference")
    fp32 = export_graphs(model, out)
    quantize_text_graph(fp32["text_encoder"], out / "int8" / "text_encoder.onnx")
    return model.cfg, fp32, out / "int8" / "text_encoder.onnx"


def _tokenize(cfg):
    from ipiqa.model import tokenize

    return lambda prompts: tokenize(prompts, cfg.context_length).numpy()


def _prompts() -> list[str]:
    own, _ = text_gate_prompts(None)
    return own + [f"{w} photo number {i}" for i, w in enumerate(["a red", "an old", "the blue"] * 30)]


def test_the_reference_rows_are_the_fp32_backends_text_embeddings(graphs):
    from ipiqa.export.graph_runs import graph_backend

    cfg, fp32, _ = graphs
    prompts, tok = _prompts(), _tokenize(cfg)
    ref = TextReference(fp32, prompts, tok, batch=16)
    seen = 0
    with graph_backend(dict(fp32)) as backend:
        for start, tokens, rows in ref.batches():
            assert np.array_equal(tokens, tok(prompts[start:start + 16]))
            assert np.array_equal(rows, backend.encode_text(tokens))
            seen += len(rows)
    assert seen == len(prompts)


def test_gates_sharing_a_reference_run_the_fp32_graph_once_and_judge_as_with_their_own(graphs):
    cfg, fp32, int8 = graphs
    prompts, tok = _prompts(), _tokenize(cfg)
    ref = TextReference(fp32, prompts, tok)
    shared = [text_int8_gate(fp32, int8, prompts, tok, "test", reference=ref) for _ in range(2)]
    own = text_int8_gate(fp32, int8, prompts, tok, "test")
    assert ref.computed == 1
    assert shared[0] == shared[1] == own


def test_a_reference_of_no_prompts_yields_nothing(graphs):
    cfg, fp32, _ = graphs
    ref = TextReference(fp32, [], _tokenize(cfg))
    assert list(ref.batches()) == [] and ref.computed == 0


def _count_computes(monkeypatch) -> list:
    calls = []
    real = TextReference._compute
    monkeypatch.setattr(TextReference, "_compute", lambda self: calls.append(1) or real(self))
    return calls


def test_an_int8_text_stage_that_tries_twice_runs_the_fp32_text_graph_once(tiny_model_file, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from test_int8 import write_images

    from ipiqa.bundle import read_bundle
    from ipiqa.export.cli import main as export_cli

    calls = _count_computes(monkeypatch)
    real = text_int8.text_int8_gate  # a bound no graph meets: both reduce_range settings are tried
    monkeypatch.setattr(text_int8, "text_int8_gate", lambda *a, **k: dataclasses.replace(real(*a, **k), bound=2.0))
    monkeypatch.setenv("IPIQA_PROMPT_DATASETS", str(tmp_path / "none"))  # the gate's own prompts only
    write_images(tmp_path / "imgs", 8, seed=0)
    res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", str(tmp_path / "bundle"), "--onnx-only",
                                          "--int8", "--int8-text", "--calibration", str(tmp_path / "imgs"),
                                          "--calibration-size", "8"])
    assert res.exit_code == 0, res.output
    assert len(read_bundle(tmp_path / "bundle").onnx.int8_text.attempts) == 2
    assert len(calls) == 1


@needs_hardware("avx512_bf16", "amx_bf16")
def test_an_export_gating_the_text_graph_at_int8_and_bf16_runs_the_fp32_text_graph_once(tiny_model_file, tmp_path,
                                                                                         monkeypatch):
    from test_int8 import write_images

    from conftest import hardware_flags_only
    from ipiqa.checkpoint import load_model
    from ipiqa.export.bundle_export import ExportOptions, export_bundle
    from ipiqa.export.options import Int8Options

    calls = _count_computes(monkeypatch)
    monkeypatch.setenv("IPIQA_PROMPT_DATASETS", str(tmp_path / "none"))
    write_images(tmp_path / "imgs", 8, seed=0)
    with hardware_flags_only():
        report = export_bundle(load_model(tiny_model_file), [tiny_model_file], tmp_path / "bundle",
                               ExportOptions(onnx_only=True, int8=Int8Options(tmp_path / "imgs", 8), int8_text=True,
                                             bf16=True, bf16_text=True))
    assert report.int8_text is not None and report.bf16_text is not None
    assert report.bf16_text["prompts"] == report.int8_text["prompts"]
    assert len(calls) == 1


def test_a_failure_while_computing_leaves_no_half_filled_reference(graphs, monkeypatch):
    from ipiqa.runtime.backends.ort import OrtBackend

    cfg, fp32, _ = graphs
    ref = TextReference(fp32, _prompts(), _tokenize(cfg), batch=16)
    real, calls = OrtBackend.encode_text, []

    def second_call_fails(self, tokens):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the FP32 text graph failed")
        return real(self, tokens)

    monkeypatch.setattr(OrtBackend, "encode_text", second_call_fails)
    with pytest.raises(RuntimeError, match="FP32 text graph failed"):
        next(ref.batches())
    monkeypatch.undo()
    assert ref.computed == 0
    fresh = TextReference(fp32, _prompts(), _tokenize(cfg), batch=16)
    for (_, _, got), (_, _, want) in zip(ref.batches(), fresh.batches(), strict=True):
        assert np.array_equal(got, want)  # recomputed in full, never the unfilled rows
    assert ref.computed == 1


def test_a_gate_handed_a_reference_of_other_prompts_is_refused(graphs):
    cfg, fp32, int8 = graphs
    ref = TextReference(fp32, _prompts()[:-1], _tokenize(cfg))
    with pytest.raises(ValueError, match="other prompts"):
        text_int8_gate(fp32, int8, _prompts(), _tokenize(cfg), "test", reference=ref)


def test_a_closed_reference_has_no_file_and_computes_again_when_read(graphs):
    cfg, fp32, _ = graphs
    ref = TextReference(fp32, _prompts(), _tokenize(cfg))
    first = [rows.copy() for _, _, rows in ref.batches()]
    ref.close()
    assert ref._file is None
    again = [rows for _, _, rows in ref.batches()]
    assert ref.computed == 2 and all(np.array_equal(a, b) for a, b in zip(first, again))
