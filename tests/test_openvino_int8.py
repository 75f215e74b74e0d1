"""OpenVINO's own INT8 image graph (NNCF): an IR the runtime's metadata check reads, calibrated one image at a
time, gated like the QDQ graph, layers kept FP32 through ignored_scope, and every failure a recorded fallback."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("onnx", reason="INT8 quantization needs ipiqa[export]")
pytest.importorskip("openvino", reason="OpenVINO's INT8 graph needs ipiqa[openvino]")
pytest.importorskip("nncf", reason="OpenVINO's INT8 graph needs NNCF (ipiqa[openvino])")

from test_int8 import R, trained_like, write_images  # noqa: E402

from ipiqa.bundle import METADATA_CONFIG_KEY, METADATA_PRECISION_KEY  # noqa: E402
from ipiqa.export import int8_stage, openvino_int8  # noqa: E402
from ipiqa.export.calibration import calibration_batches, image_input  # noqa: E402
from ipiqa.export.int8 import Int8Gate  # noqa: E402
from ipiqa.export.openvino_int8 import (NNCF_FILE, NNCF_SETTINGS_KEY, NncfSettings, calibration_images,  # noqa: E402
                                        nncf_version, quantize_and_gate_openvino, quantize_openvino)
from ipiqa.runtime.backends.openvino import _input_shapes, _metadata  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An image-dependent tiny model's FP32 graphs, its calibration batches, held-out images and tokens."""
    from test_fp16 import export_graphs, tiny_model

    from ipiqa.export.graph_runs import run_graphs
    from ipiqa.model import tokenize

    root = tmp_path_factory.mktemp("openvino_int8")
    calibration = write_images(root / "calibration", 16, seed=0)
    held = np.stack([image_input(p, R) for p in write_images(root / "held_out", 8, seed=1)])
    batches = list(calibration_batches(calibration, R, 16))
    model = trained_like(tiny_model(), np.concatenate(batches))
    graphs = export_graphs(model, root / "fp32")
    tokens = tokenize(["a photo of a cat"] * len(held), model.cfg.context_length).numpy()
    return SimpleNamespace(root=root, graphs=graphs, batches=batches, held=held, tokens=tokens, cfg=model.cfg,
                           reference=run_graphs(graphs, held, tokens))


def read_ir(path):
    import openvino as ov

    return ov.Core().read_model(str(path))


def fake_quantize_inputs(model, name: str) -> int:
    """How many inputs of layer ``name`` a FakeQuantize feeds (0: NNCF left its inputs FP32)."""
    node = next(op for op in model.get_ordered_ops() if op.get_friendly_name() == name)
    return sum(i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in node.inputs())


def stage_ctx(setup, out, lines):
    """What ``int8_stage._openvino_gate`` reads of the export's context."""
    return SimpleNamespace(fp32_graphs=lambda: setup.graphs, out=out, cfg=setup.cfg, progress=lines.append)


def stage_inputs(setup) -> dict:
    """The stage's calibration batches and held-out images and tokens (``int8_stage.prepared``)."""
    return {"batches": setup.batches, "held": setup.held, "tokens": setup.tokens}


def qdq_graph(setup, out):
    from ipiqa.export.quantize import quantize_image_graph

    rel = "int8/image_encoder.cpu.onnx"
    return rel, quantize_image_graph(setup.graphs["image_encoder"], out / rel, setup.batches, "cpu")


def test_the_nncf_graph_is_an_ir_carrying_the_fp32_config_precision_int8_and_its_settings(setup, tmp_path):
    xml = tmp_path / "image_encoder.openvino.xml"
    settings = quantize_openvino(setup.graphs["image_encoder"], xml, setup.batches, NncfSettings(nncf_version(), 64))
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    model, fp32 = read_ir(xml), read_ir(setup.graphs["image_encoder"])
    metadata = _metadata(model)
    assert metadata[METADATA_PRECISION_KEY] == "int8"
    assert metadata[METADATA_CONFIG_KEY] == _metadata(fp32)[METADATA_CONFIG_KEY]
    assert json.loads(metadata[NNCF_SETTINGS_KEY]) == settings.to_dict()
    assert settings.calibration_size == 16 and settings.quantizer == nncf_version()  # the 16 images there are
    assert _input_shapes(model) == _input_shapes(fp32)
    assert any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())


def test_calibration_iterates_one_image_at_a_time_as_views_of_the_batches(setup, tmp_path, monkeypatch):
    import nncf

    images = calibration_images(setup.batches, limit=11)
    assert not isinstance(images, (list, tuple)) and len(images) == 11
    items = list(images)
    assert len(items) == 11 and all(item.shape == (1, R, R, 3) for item in items)
    assert all(any(np.shares_memory(item, b) for b in setup.batches) for item in items)  # no copies
    assert len(list(images)) == 11  # re-iterable: NNCF may pass over it more than once
    seen = []
    dataset = nncf.Dataset

    def recording(source, *args):
        seen.append(source)
        return dataset(source, *args)

    monkeypatch.setattr(nncf, "Dataset", recording)
    quantize_openvino(setup.graphs["image_encoder"], tmp_path / "x.xml", setup.batches, NncfSettings(nncf_version(), 5))
    assert len(seen) == 1 and not isinstance(seen[0], (list, tuple)) and len(seen[0]) == 5
    assert all(any(np.shares_memory(item, b) for b in setup.batches) for item in seen[0])


@pytest.fixture(scope="module")
def nncf_bundle(tiny_model_file, tmp_path_factory):
    """The tiny model exported with --int8 where NNCF is installed: its bundle folder."""
    from ipiqa.checkpoint import load_model
    from ipiqa.export.bundle_export import ExportOptions, Int8Options, export_bundle

    root = tmp_path_factory.mktemp("nncf_bundle")
    write_images(root / "calibration", 12, seed=4)
    export_bundle(load_model(tiny_model_file), [tiny_model_file], root / "bundle",
                  ExportOptions(onnx_only=True, int8=Int8Options(root / "calibration", size=8)), progress=lambda m: None)
    return root / "bundle"


def test_the_gate_passes_and_the_bundle_records_nncf_its_ir_settings_and_attempts(nncf_bundle):
    from ipiqa.bundle import check_graph_metadata, read_bundle
    from ipiqa.runtime.backends.openvino import OpenVinoBackend

    out = nncf_bundle
    manifest = read_bundle(out)
    record = manifest.onnx.int8["cpu"].openvino
    assert manifest.onnx.int8["cpu"].openvino_passed and "nncf" not in record
    assert record["quantizer"] == nncf_version() and record["file"] == NNCF_FILE
    assert record["settings"]["quantizer"] == nncf_version() and record["settings"]["calibration_size"] == 8
    assert record["attempts"][0].startswith("0 ignored: ")
    assert {r["name"] for r in record["gate"]["results"]} >= {"openvino-int8/image_embedding"}
    model = read_ir(out / record["file"])  # the served graph passes the runtime's own metadata check
    check_graph_metadata(manifest, "image_encoder", _metadata(model), _input_shapes(model), "int8")
    graphs = {**{n: out / g.file for n, g in manifest.onnx.graphs.items()}, "image_encoder": out / record["file"]}
    with OpenVinoBackend.from_graphs(graphs, "int8") as backend:
        x = np.zeros((2, manifest.config.resolution, manifest.config.resolution, 3), np.uint8)
        assert np.isfinite(backend.image_outputs(x)["image_embedding"]).all()


def test_a_failing_gate_keeps_1_2_4_layers_fp32_through_ignored_scope_and_records_each_attempt(setup, tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setattr(openvino_int8, "int8_gate",
                        lambda fp32, xml, settings, images, *a, **k: Int8Gate(settings, (), len(images), error="forced"))
    result = quantize_and_gate_openvino(setup.graphs, tmp_path / "x.xml", setup.batches, setup.held, setup.tokens,
                                        setup.cfg.outputs, max_excluded=7, reference=setup.reference)
    assert not result.gate and len(result.settings.ignored) == 7
    assert [a.split(" ignored")[0] for a in result.attempts] == ["0", "1", "3", "7"]
    assert all(a.endswith(": FAIL") for a in result.attempts)
    model = read_ir(result.path)
    assert json.loads(_metadata(model)[NNCF_SETTINGS_KEY])["ignored"] == list(result.settings.ignored)
    for name in result.settings.ignored:  # a real layer NNCF then leaves FP32, not an op a quantizer passes through
        assert fake_quantize_inputs(model, name) == 0, name


def test_nncf_raising_falls_back_to_the_qdq_graph_on_openvino_with_the_reason(setup, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Exception from nncf: Unsupported operation\nstack ...")

    monkeypatch.setattr(openvino_int8, "quantize_openvino", broken)
    out, lines = tmp_path / "bundle", []
    rel, settings = qdq_graph(setup, out)
    record = int8_stage._openvino_gate(stage_ctx(setup, out, lines), rel, settings,
                                       stage_inputs(setup), setup.reference, 16)
    assert record["quantizer"] == "onnxruntime-qdq" and "file" not in record
    assert record["nncf"] == f"{nncf_version()} raised RuntimeError: Exception from nncf: Unsupported operation"
    assert record["gate"]["passed"] and record["gate"]["settings"] == settings.to_dict()
    assert any("OpenVINO's own INT8 graph not used" in line for line in lines)


def test_a_gate_nncf_cannot_pass_falls_back_to_the_qdq_graph_and_leaves_no_ir(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_int8, "int8_gate",
                        lambda fp32, xml, settings, images, *a, **k: Int8Gate(settings, (), len(images), error="forced"))
    out = tmp_path / "bundle"
    rel, settings = qdq_graph(setup, out)
    record = int8_stage._openvino_gate(stage_ctx(setup, out, []), rel, settings,
                                       stage_inputs(setup),
                                       setup.reference, 16)
    assert record["quantizer"] == "onnxruntime-qdq" and record["gate"]["passed"]
    assert "missed the INT8 bounds with 16 layers FP32" in record["nncf"]
    assert record["nncf_attempts"][0] == "0 ignored: FAIL" and len(record["nncf_attempts"]) == 6
    assert not (out / NNCF_FILE).exists() and not (out / NNCF_FILE).with_suffix(".bin").exists()


def test_without_nncf_the_record_and_the_reuse_key_are_todays_qdq_gate(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_int8, "nncf_version", lambda: None)
    out = tmp_path / "bundle"
    rel, settings = qdq_graph(setup, out)
    record = int8_stage._openvino_gate(stage_ctx(setup, out, []), rel, settings,
                                       stage_inputs(setup), setup.reference, 16)
    assert set(record) == {"runtime", "quantizer", "nncf", "gate"} and record["quantizer"] == "onnxruntime-qdq"
    assert record["nncf"].startswith("NNCF is not installed") and record["gate"]["passed"]
    assert int8_stage._openvino_kernels() == int8_stage._openvino_version()  # bundles exported before NNCF are reused


def test_the_ranking_names_layers_nncf_can_keep_fp32_never_ops_a_quantizer_passes_through(setup, tmp_path):
    from ipiqa.export.openvino_int8 import sensitive_layers

    xml = tmp_path / "x.xml"
    quantize_openvino(setup.graphs["image_encoder"], xml, setup.batches, NncfSettings(nncf_version(), 16))
    ranked = sensitive_layers(xml, setup.batches)
    kinds = {op.get_friendly_name(): op.get_type_name() for op in read_ir(xml).get_ordered_ops()}
    assert len(ranked) > 8 and len(set(ranked)) == len(ranked)
    assert {kinds[name] for name in ranked} <= {"Convolution", "MatMul", "Add", "AvgPool", "ReduceMean", "Multiply"}


def test_the_manifest_lists_and_hashes_the_nncf_ir_and_its_weights(nncf_bundle):
    from ipiqa.bundle import read_bundle

    manifest = read_bundle(nncf_bundle)
    weights = NNCF_FILE[:-len(".xml")] + ".bin"
    assert NNCF_FILE in manifest.listed_files() and {NNCF_FILE, weights} <= set(manifest.files)
    assert all(len(manifest.files[f]) == 64 for f in (NNCF_FILE, weights))


def test_a_changed_nncf_weights_file_is_refused_when_the_bundle_is_read(nncf_bundle, tmp_path):
    import shutil

    from ipiqa.bundle import read_bundle
    from ipiqa.errors import BundleError

    copy = tmp_path / "bundle"
    shutil.copytree(nncf_bundle, copy, ignore=shutil.ignore_patterns("cache"))
    weights = copy / (NNCF_FILE[:-len(".xml")] + ".bin")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="image_encoder.openvino.bin"):
        read_bundle(copy)


def test_openvino_int8_serves_the_nncf_ir_and_onnxruntime_int8_the_qdq_graph(nncf_bundle):
    from ipiqa.bundle import read_bundle
    from ipiqa.runtime.backends.openvino import OpenVinoBackend

    manifest = read_bundle(nncf_bundle)
    qdq = nncf_bundle / manifest.onnx.int8["cpu"].file
    assert manifest.graph_path("image_encoder", "int8", runtime="openvino") == nncf_bundle / NNCF_FILE
    assert manifest.graph_path("image_encoder", "int8") == qdq
    r = manifest.config.resolution
    x = np.random.default_rng(3).integers(0, 256, (3, r, r, 3), np.uint8)
    fp32 = {n: nncf_bundle / g.file for n, g in manifest.onnx.graphs.items()}
    with OpenVinoBackend(manifest, "int8", cache_dir=None) as served, \
            OpenVinoBackend.from_graphs({**fp32, "image_encoder": nncf_bundle / NNCF_FILE}, "int8") as ir, \
            OpenVinoBackend.from_graphs({**fp32, "image_encoder": qdq}, "int8") as qdq_backend:
        got = served.image_outputs(x)["image_embedding"]
        assert np.array_equal(got, ir.image_outputs(x)["image_embedding"])  # the IR, not the QDQ graph
        assert not np.array_equal(got, qdq_backend.image_outputs(x)["image_embedding"])


def test_a_fallback_record_without_a_file_keeps_openvino_on_the_qdq_graph(nncf_bundle):
    from dataclasses import replace

    from ipiqa.bundle import read_bundle

    manifest = read_bundle(nncf_bundle)
    cpu = manifest.onnx.int8["cpu"]
    record = {k: v for k, v in cpu.openvino.items() if k not in ("file", "settings")}
    fallback = manifest.replace(onnx=replace(manifest.onnx, int8={"cpu": replace(
        cpu, openvino={**record, "quantizer": "onnxruntime-qdq", "nncf": "forced"})}))
    assert fallback.onnx.int8["cpu"].openvino_file is None
    assert fallback.graph_path("image_encoder", "int8", runtime="openvino") == nncf_bundle / cpu.file
    failed = manifest.replace(onnx=replace(manifest.onnx, int8={"cpu": replace(
        cpu, openvino={**cpu.openvino, "gate": {**cpu.openvino["gate"], "passed": False}})}))
    assert failed.onnx.int8["cpu"].openvino_file is None  # a file whose gate failed is never served


@pytest.mark.parametrize("file", ["/abs/image_encoder.xml", "../image_encoder.xml", "int8/image_encoder.onnx"])
def test_a_manifest_naming_an_ir_outside_the_bundle_or_not_an_ir_is_refused(nncf_bundle, tmp_path, file):
    import shutil

    from ipiqa.bundle import read_bundle
    from ipiqa.errors import BundleError

    copy = tmp_path / "bundle"
    shutil.copytree(nncf_bundle, copy, ignore=shutil.ignore_patterns("cache"))
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    data["onnx"]["int8"]["cpu"]["openvino"]["file"] = file
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="onnx.int8.cpu.openvino.file"):
        read_bundle(copy)


def test_the_compile_cache_key_of_the_ir_changes_with_its_weights(nncf_bundle, tmp_path):
    import shutil

    from ipiqa.bundle import read_bundle
    from ipiqa.runtime.backends.openvino import cache_key

    manifest = read_bundle(nncf_bundle)
    xml, weights = nncf_bundle / NNCF_FILE, NNCF_FILE[:-len(".xml")] + ".bin"
    recorded = cache_key(xml, manifest.files, manifest.root)
    assert cache_key(xml, {**manifest.files, weights: "0" * 64}, manifest.root) != recorded  # from the manifest
    copy = tmp_path / "x"
    copy.mkdir()
    shutil.copy(xml, copy / xml.name)
    data = bytearray(xml.with_suffix(".bin").read_bytes())
    shutil.copy(xml.with_suffix(".bin"), copy / "image_encoder.openvino.bin")
    unchanged = cache_key(copy / xml.name)
    data[0] ^= 0xFF
    (copy / "image_encoder.openvino.bin").write_bytes(bytes(data))
    assert cache_key(copy / xml.name) != unchanged  # hashed from the files


def test_score_on_openvino_int8_from_the_command_line_after_the_export_names_the_backend(nncf_bundle, tmp_path):
    from click.testing import CliRunner

    from ipiqa.cli import cli

    images = write_images(tmp_path / "images", 3, seed=9)
    out = tmp_path / "scores.csv"
    res = CliRunner().invoke(cli, ["score", str(nncf_bundle), "--images", str(images[0].parent), "--prompt", "a fox",
                                   "--backend", "openvino", "--precision", "int8", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "backend openvino-cpu-int8" in res.output
    assert len(out.read_text().strip().splitlines()) == 4


@pytest.mark.parametrize("gated_with_dot", [True, False])
def test_the_nncf_ir_gated_with_int8_dot_products_is_refused_on_a_cpu_without_them(nncf_bundle, tmp_path, cpu_family,
                                                                                    gated_with_dot):
    import shutil

    from ipiqa.bundle import read_bundle
    from ipiqa.errors import IPIQAError
    from ipiqa.runtime.backends.openvino import OpenVinoBackend
    from ipiqa.runtime.cpu import INT8_DOT_FLAGS

    copy = tmp_path / "bundle"
    shutil.copytree(nncf_bundle, copy, ignore=shutil.ignore_patterns("cache"))
    data = json.loads((copy / "manifest.json").read_text())
    assert isinstance(data["onnx"]["int8"]["cpu"]["openvino"]["cpu_int8_dot"], bool)  # the export records it
    data["onnx"]["int8"]["cpu"]["openvino"]["cpu_int8_dot"] = gated_with_dot
    (copy / "manifest.json").write_text(json.dumps(data))
    manifest = read_bundle(copy)
    if gated_with_dot and not cpu_family.flags & set(INT8_DOT_FLAGS):
        with pytest.raises(IPIQAError, match="no INT8 dot products.*--backend onnxruntime"):
            OpenVinoBackend(manifest, "int8", cache_dir=None)
        return
    with OpenVinoBackend(manifest, "int8", cache_dir=None) as backend:
        assert backend.name.startswith("openvino-cpu-int8")
