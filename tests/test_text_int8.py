"""INT8 text graph: MatMul/Gemm quantized with the end-of-text lookup exact, gated per prompt on real prompts,
refused when wrong, recorded in the manifest and served by --precision int8 on ONNX Runtime only where it passed."""
from __future__ import annotations

import csv
import dataclasses
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx", reason="INT8 quantization needs ipiqa[export]")

from ipiqa.bundle import read_bundle  # noqa: E402
from ipiqa.export import text_int8  # noqa: E402
from ipiqa.export.cli import main as export_cli  # noqa: E402
from ipiqa.export.gate import PARITY_PROMPTS  # noqa: E402
from ipiqa.export.prompt_sets import DATASETS, dataset_prompts, datasets_folder, distinct_prompts  # noqa: E402
from ipiqa.export.text_int8 import (TEXT_GATE_PROMPTS, eot_path_problem, quantize_text_graph,  # noqa: E402
                                    text_gate_prompts, text_int8_gate)

SUBSET = 300  # real prompts the tests gate on (the export gates on all of them)
HAVE_DATASETS = (DATASETS / "aigcqa-20k" / "info_train.csv").is_file()


def _prompts(n: int = SUBSET) -> list[str]:
    """The gate's own prompts and, where the label files are beside the checkout, ``n`` real ones spread over them."""
    own, _ = text_gate_prompts(None)
    if not HAVE_DATASETS:
        return own
    real = distinct_prompts()
    return own + real[:: max(1, len(real) // n)][:n]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from test_fp16 import export_graphs, tiny_model

    model = tiny_model()
    out = tmp_path_factory.mktemp("text_int8")
    fp32 = export_graphs(model, out)
    quantize_text_graph(fp32["text_encoder"], out / "int8" / "text_encoder.onnx")  # the stage's first: 7-bit weights
    return model.cfg, fp32, out / "int8" / "text_encoder.onnx"


def _tokenize(cfg):
    from ipiqa.model import tokenize

    return lambda prompts: tokenize(prompts, cfg.context_length).numpy()


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of the graph ``src`` (weights inline) with ``edit(graph)`` applied in front of the ArgMax's users."""
    model = onnx.load(str(src))
    edit(model.graph)
    onnx.save_model(model, str(dst))
    return dst


def _argmax(graph):
    return next(n for n in graph.nodes if n.op_type == "ArgMax") if hasattr(graph, "nodes") else \
        next(n for n in graph.node if n.op_type == "ArgMax")


def shift_eot_index(graph) -> None:
    """Gather the row before end-of-text: ArgMax(...) - 1 feeds what the ArgMax fed."""
    node = _argmax(graph)
    out = node.output[0]
    for n in graph.node:
        n.input[:] = [f"{out}_shifted" if i == out else i for i in n.input]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1, np.int64), "one"))
    graph.node.insert(list(graph.node).index(node) + 1, onnx.helper.make_node("Sub", [out, "one"], [f"{out}_shifted"]))


def argmax_in_fp16(graph) -> None:
    """The end-of-text search over token ids rounded to FP16 (what a whole-graph reduced-precision hint does)."""
    node = _argmax(graph)
    src = node.input[0]
    graph.node.insert(list(graph.node).index(node), onnx.helper.make_node(
        "Cast", [src], [f"{src}_fp16"], to=onnx.TensorProto.FLOAT16))
    graph.node.insert(list(graph.node).index(node), onnx.helper.make_node(
        "Cast", [f"{src}_fp16"], [f"{src}_back"], to=onnx.TensorProto.FLOAT))
    node.input[0] = f"{src}_back"


def test_only_weight_matmuls_are_quantized_and_the_eot_lookup_stays_exact(graphs):
    _, fp32, int8 = graphs
    before = Counter(n.op_type for n in onnx.load(str(fp32["text_encoder"]), load_external_data=False).graph.node)
    after = Counter(n.op_type for n in onnx.load(str(int8), load_external_data=False).graph.node)
    assert after["MatMulInteger"] == before["MatMul"] + before["Gemm"] - after["MatMul"] > 0
    assert after["MatMul"] == 2 * 2  # attention's activation x activation products (2 layers) stay FP32
    for op in ("LayerNormalization", "Softmax", "ArgMax", "GatherElements"):
        assert after[op] == before[op] > 0
    assert eot_path_problem(int8) is None


def test_the_int8_text_graph_passes_the_gate_on_real_prompts(graphs):
    cfg, fp32, int8 = graphs
    prompts = _prompts()
    gate = text_int8_gate(fp32, int8, prompts, _tokenize(cfg), "test subset")
    assert gate.passed, gate.line()
    assert gate.prompts == len(prompts) and gate.bound == 0.995 and 0.995 <= gate.min_cosine < 1.0


def test_a_shifted_end_of_text_index_is_refused_by_the_gate(graphs, tmp_path):
    cfg, fp32, _ = graphs
    wrong = _edited(fp32["text_encoder"], tmp_path / "shifted.onnx", shift_eot_index)
    gate = text_int8_gate(fp32, wrong, _prompts(), _tokenize(cfg), "test subset")
    assert not gate.passed and gate.min_cosine < 0.9, gate.line()  # the cosine refuses it
    assert "Sub node" in gate.eot_problem  # and so does the end-of-text path check


def test_an_end_of_text_search_in_reduced_precision_is_refused_by_the_gate(graphs, tmp_path):
    cfg, fp32, int8 = graphs
    wrong = _edited(int8, tmp_path / "argmax_fp16.onnx", argmax_in_fp16)
    gate = text_int8_gate(fp32, wrong, _prompts(), _tokenize(cfg), "test subset")
    assert not gate.passed and "FLOAT16" in gate.eot_problem, gate.line()
    assert "end-of-text path not exact" in gate.line()


@pytest.mark.skipif(not HAVE_DATASETS, reason="../shared/datasets is not beside this checkout")
def test_the_gate_prompts_are_its_own_then_every_distinct_dataset_prompt():
    assert len(dataset_prompts()) == 18784 and len(distinct_prompts()) == 15725
    prompts, source = text_gate_prompts(DATASETS)
    assert prompts[: len(PARITY_PROMPTS)] == list(PARITY_PROMPTS) and len(prompts) == len(set(prompts))
    assert set(distinct_prompts()) <= set(prompts) and "15725 distinct prompts" in source


def test_without_the_label_files_the_gate_judges_its_own_prompts_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("IPIQA_PROMPT_DATASETS", str(tmp_path))
    assert datasets_folder() is None
    prompts, source = text_gate_prompts(datasets_folder())
    assert set(prompts) == set(PARITY_PROMPTS) | set(TEXT_GATE_PROMPTS) and "prompts only" in source


# ---- through the export and the runtime


def write_label_files(root: Path, prompts: list[str]) -> Path:
    """The three label files as the datasets ship them, holding ``prompts`` (a third each)."""
    (root / "agiqa-3k").mkdir(parents=True)
    (root / "aigcqa-20k").mkdir()
    (root / "agiqa-1k").mkdir()
    thirds = [prompts[i::3] for i in range(3)]
    for name, part in (("agiqa-3k/data.csv", thirds[0]), ("aigcqa-20k/info_train.csv", thirds[1])):
        with open(root / name, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([["name", "prompt"], *[[f"{i}.png", p] for i, p in enumerate(part)]])
    from xml.sax.saxutils import escape

    cells = "".join(f"<si><t>{escape(p)}</t></si>" for p in thirds[2])
    with zipfile.ZipFile(root / "agiqa-1k" / "AIGC_MOS_Zscore.xlsx", "w") as z:
        z.writestr("xl/sharedStrings.xml", f'<?xml version="1.0"?><sst>{cells}</sst>')
    return root


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory):
    """--onnx-only --int8 --int8-text on the tiny model through the CLI, gated on a subset of the real prompts."""
    from test_int8 import write_images

    from conftest import TINY
    from ipiqa.checkpoint import save_model
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import demo_model

    root = tmp_path_factory.mktemp("text_bundle")
    write_images(root / "imgs", 12, seed=0)
    labels = write_label_files(root / "datasets", _prompts()[len(text_gate_prompts(None)[0]):] or ["a photo"])
    cfg = IPIQAConfig(**TINY)
    model = save_model(root / "tiny.safetensors", demo_model(cfg, seed=3).state_dict(), cfg)
    mp = pytest.MonkeyPatch()
    mp.setenv("IPIQA_PROMPT_DATASETS", str(labels))
    try:
        res = CliRunner().invoke(export_cli, [str(model), "-o", str(root / "bundle"), "--onnx-only", "--int8",
                                              "--int8-text", "--calibration", str(root / "imgs"),
                                              "--calibration-size", "8"])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return root, res


def test_the_export_records_the_text_gate_beside_the_image_one(text_bundle):
    root, res = text_bundle
    manifest = read_bundle(root / "bundle")
    record = manifest.onnx.int8_text
    assert record is not None and record.passed and record.min_cosine >= 0.995
    assert record.prompts == len(_prompts()) and str(root / "datasets") in record.prompt_source
    assert record.file in manifest.files and "cpu" in manifest.onnx.int8
    assert "INT8 text graph" in res.output and "served by --precision int8" in res.output


def test_int8_on_onnx_runtime_serves_the_gated_int8_text_graph_and_says_so(text_bundle):
    from ipiqa.runtime.scorer import Scorer

    root, _ = text_bundle
    prompts = _prompts(40)
    with Scorer(root / "bundle", precision="int8") as int8, Scorer(root / "bundle", precision="fp32") as fp32:
        assert int8.backend.name == "onnxruntime-cpu-int8+text-int8" and int8.backend.text_precision == "int8"
        tokens = int8.tokenizer(prompts)
        a, b = fp32.backend.encode_text(tokens), int8.backend.encode_text(tokens)
    assert not np.array_equal(a, b)  # another graph ran
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.995


def test_a_failed_text_gate_is_recorded_and_int8_keeps_the_fp32_text_graph(text_bundle, tmp_path, monkeypatch):
    from ipiqa.runtime.scorer import Scorer

    root, _ = text_bundle
    real = text_int8.text_int8_gate
    monkeypatch.setattr(text_int8, "text_int8_gate", lambda *a, **k: dataclasses.replace(real(*a, **k), bound=2.0))
    monkeypatch.setenv("IPIQA_PROMPT_DATASETS", str(tmp_path / "none"))  # the gate's own prompts only
    res = CliRunner().invoke(export_cli, [str(root / "tiny.safetensors"), "-o", str(tmp_path / "bundle"), "--onnx-only",
                                          "--int8", "--int8-text", "--calibration", str(root / "imgs"),
                                          "--calibration-size", "8"])
    assert res.exit_code == 0, res.output
    manifest = read_bundle(tmp_path / "bundle")
    assert manifest.onnx.int8_text is not None and not manifest.onnx.int8_text.passed
    assert "prompts only" in manifest.onnx.int8_text.prompt_source and len(manifest.onnx.int8_text.attempts) == 2
    assert "NOT served" in res.output
    with Scorer(tmp_path / "bundle", precision="int8") as s:
        assert s.backend.name == "onnxruntime-cpu-int8" and s.backend.text_precision == "fp32"


def test_int8_text_without_int8_is_refused_by_the_cli(text_bundle, tmp_path):
    root, _ = text_bundle
    res = CliRunner().invoke(export_cli, [str(root / "tiny.safetensors"), "-o", str(tmp_path / "b"), "--onnx-only",
                                          "--int8-text"])
    assert res.exit_code != 0 and "--int8-text goes with --int8" in res.output


def test_openvino_int8_keeps_the_fp32_text_graph(text_bundle):
    """The text gate judged ONNX Runtime's kernels: OpenVINO's int8 set keeps the FP32 text graph."""
    pytest.importorskip("openvino")
    from ipiqa.runtime.backends.openvino import OpenVinoBackend
    from ipiqa.runtime.scorer import Scorer

    manifest = read_bundle(text_bundle[0] / "bundle")
    if not manifest.onnx.int8["cpu"].openvino_passed:
        pytest.skip("the tiny bundle's INT8 image graph has no passing OpenVINO gate here")
    prompts = _prompts(20)
    with Scorer(manifest.root, precision="fp32") as fp32, OpenVinoBackend(manifest, "int8", cache_dir="") as ov:
        tokens = fp32.tokenizer(prompts)
        a, b = fp32.backend.encode_text(tokens), ov.encode_text(tokens)
    assert ov.name == "openvino-cpu-int8"
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)


def _edited_bundle(src: Path, dst: Path, edit) -> Path:
    """A copy of the bundle ``src`` whose manifest.json went through ``edit(data)`` (the files stay as hashed)."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    data = json.loads((dst / "manifest.json").read_text())
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def _full_range_text(data) -> None:
    data["onnx"]["int8_text"]["settings"]["reduce_range"] = False


def test_a_full_range_int8_text_graph_serves_only_on_cpus_with_int8_dot_products(text_bundle, tmp_path, cpu_family):
    from ipiqa.runtime.cpu import INT8_DOT_FLAGS
    from ipiqa.runtime.scorer import Scorer

    root, _ = text_bundle
    full = _edited_bundle(root / "bundle", tmp_path / "full", _full_range_text)
    dot = bool(cpu_family.flags & set(INT8_DOT_FLAGS))
    with Scorer(full, precision="int8", backend="onnxruntime") as s:
        assert s.backend.text_precision == ("int8" if dot else "fp32"), cpu_family.name
    with Scorer(root / "bundle", precision="int8", backend="onnxruntime") as s:  # 7-bit weights: every family
        assert read_bundle(root / "bundle").onnx.int8_text.settings["reduce_range"] is True
        assert s.backend.text_precision == "int8", cpu_family.name


@pytest.mark.skipif(bool({"amx_int8", "avx512_vnni", "avx_vnni"} & set(
    __import__("ipiqa.runtime.cpu", fromlist=["hardware_flags"]).hardware_flags())),
    reason="needs the real instruction set without INT8 dot products (AVX2 only); this CPU has VNNI or AMX")
def test_full_range_8bit_text_weights_miss_the_gate_on_a_cpu_without_int8_dot_products(graphs, tmp_path):
    """Why ``int8_weights_refusal`` exists: ONNX Runtime's u8 x s8 kernels on AVX2 sum pairs in 16 bits."""
    cfg, fp32, _ = graphs
    full = tmp_path / "text_encoder.onnx"
    quantize_text_graph(fp32["text_encoder"], full, reduce_range=False)
    gate = text_int8_gate(fp32, full, _prompts(), _tokenize(cfg), "test subset")
    assert not gate.passed and gate.min_cosine < 0.99, gate.line()


def test_a_full_range_int8_image_graph_is_refused_without_int8_dot_products_and_auto_avoids_it(text_bundle, tmp_path,
                                                                                               cpu_family):
    from ipiqa.errors import IPIQAError
    from ipiqa.runtime.cpu import INT8_DOT_FLAGS
    from ipiqa.runtime.scorer import Scorer, cpu_auto_choice

    root, _ = text_bundle

    def full_range(data) -> None:
        data["onnx"]["int8"]["cpu"]["settings"]["reduce_range"] = False

    full = _edited_bundle(root / "bundle", tmp_path / "full", full_range)
    if cpu_family.flags & set(INT8_DOT_FLAGS):
        with Scorer(full, precision="int8", backend="onnxruntime") as s:
            assert s.backend.precision == "int8"
        assert cpu_auto_choice(read_bundle(full))[1] == "int8"
        return
    with pytest.raises(IPIQAError, match=r"full-range 8-bit weights.*cpu.reduce_range=false"):
        Scorer(full, precision="int8", backend="onnxruntime")
    assert cpu_auto_choice(read_bundle(full)) == ("onnxruntime", "fp32")
    assert cpu_auto_choice(read_bundle(root / "bundle"))[1] == "int8"  # 7-bit weights: INT8 on every family
