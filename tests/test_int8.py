"""INT8 image graph: calibrated on images through the exact preprocessing, gated on held-out images, able to fail."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="INT8 quantization needs ipiqa[export]")
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from ipiqa.errors import IPIQAError  # noqa: E402
from ipiqa.export.calibration import calibration_batches, image_input, split_calibration  # noqa: E402
from ipiqa.export.int8 import Int8GateError, int8_gate, quantize_and_gate  # noqa: E402
from ipiqa.export.int8_settings import SETTINGS_KEY, TARGETS, QuantSettings, settings_for  # noqa: E402
from ipiqa.export.quantize import quantize_image_graph  # noqa: E402
from ipiqa.preprocess import load_resized  # noqa: E402

R = 64  # the tiny model's resolution


def natural_image(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """Smooth gradient, a few flat shapes, a little blur: activations like photos', not like noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b, c = rng.uniform(0, 1, 3), rng.uniform(-0.6, 0.6, 3), rng.uniform(-0.6, 0.6, 3)
    img = Image.fromarray((np.clip(a + b * yy[..., None] + c * xx[..., None], 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 8))):
        x, y, r = *rng.integers(0, size, 2).tolist(), int(rng.integers(size // 12, size // 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 256, 3).tolist()))
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 2))))


def write_images(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i:03d}.png" for i in range(n)]
    for p in paths:
        natural_image(rng).save(p)
    return paths


def trained_like(model, images: np.ndarray):
    """A seeded model whose embeddings depend on the image, as a trained model's do.

    The demo model's random BatchNorm statistics leave its embeddings nearly constant (pairwise cosine
    0.99995), so any graph, badly calibrated or not, has cosine ~1 to it. Re-estimating BatchNorm on
    natural-looking images and shrinking each residual branch's last BN (trained ResNets' branches are
    small next to the identity path) gives image-dependent embeddings (pairwise cosine down to ~0.93).
    """
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batch
    model.train()
    with torch.no_grad():
        model.encode_pixels(torch.from_numpy(images))
    model.eval()
    with torch.no_grad():
        for name, m in model.visual.named_modules():
            if name.endswith("bn3"):
                m.weight.mul_(0.2)
                m.bias.zero_()
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_fp16 import export_graphs, tiny_model

    from ipiqa.model import tokenize

    root = tmp_path_factory.mktemp("int8")
    calibration = write_images(root / "calibration", 24, seed=0)
    held_files = write_images(root / "held_out", 16, seed=1)  # other seed: never the calibration images
    held = np.stack([image_input(p, R) for p in held_files])
    model = trained_like(tiny_model(), np.concatenate(list(calibration_batches(calibration[:16], R, 16))))
    graphs = export_graphs(model, root / "fp32")
    tokens = tokenize(["a photo of a cat"] * len(held), model.cfg.context_length).numpy()
    return root, graphs, calibration, held, tokens, model.cfg


def test_cpu_defaults_are_u8s8_per_channel_with_reduced_range_and_tensorrt_symmetric_s8s8():
    cpu, trt = settings_for("cpu"), settings_for("tensorrt")
    assert (cpu.activation_type, cpu.weight_type, cpu.per_channel, cpu.reduce_range) == ("uint8", "int8", True, True)
    assert (trt.activation_type, trt.weight_type, trt.per_channel) == ("int8", "int8", True)
    assert trt.activation_symmetric and trt.weight_symmetric and not trt.reduce_range


def test_settings_take_overrides_and_refuse_unknown_keys_and_asymmetric_tensorrt():
    assert settings_for("cpu", calibration_size=8, calibrate_method="percentile").calibration_size == 8
    with pytest.raises(ValueError, match="unknown INT8 settings"):
        settings_for("cpu", bits=4)
    with pytest.raises(ValueError, match="TensorRT takes symmetric int8"):
        settings_for("tensorrt", activation_type="uint8", activation_symmetric=False)
    with pytest.raises(ValueError, match="target must be"):
        QuantSettings("gpu", "int8")


def test_calibration_images_come_from_a_csv_image_column_or_a_folder(tmp_path):
    files = write_images(tmp_path / "imgs", 3, seed=2)
    sheet = tmp_path / "images.csv"
    with open(sheet, "w", newline="") as fh:
        csv.writer(fh).writerows([["image", "prompt"], *[[f"imgs/{p.name}", "x"] for p in files]])
    def image_files(source):  # every image, held out or calibrated on, in list order
        split = split_calibration(source, held_out=1)
        return sorted(split.calibration + split.held_out)

    assert image_files(sheet) == [Path(p) for p in files] and image_files(tmp_path / "imgs") == files
    (tmp_path / "bad.csv").write_text("path\nimgs/000.png\n")
    with pytest.raises(IPIQAError, match=r"bad.csv: missing column\(s\) \['image'\]"):
        image_files(tmp_path / "bad.csv")


def test_calibration_batches_are_the_exact_preprocessing_and_respect_the_size(tmp_path):
    files = write_images(tmp_path, 5, seed=3)
    batches = list(calibration_batches(files, R, size=4, batch=3))
    assert [len(b) for b in batches] == [3, 1]
    np.testing.assert_array_equal(batches[0][0], load_resized(files[0], R))
    np.testing.assert_array_equal(batches[1][0], load_resized(files[-1], R))  # spread over the whole list


def test_cpu_int8_gate_passes_on_held_out_images_and_records_its_settings(setup):
    root, graphs, calibration, held, tokens, cfg = setup
    out = root / "cpu" / "image_encoder.int8.onnx"
    settings = quantize_image_graph(graphs["image_encoder"], out, calibration_batches(calibration, R, 24), "cpu")
    gate = int8_gate(graphs, out, settings, held, tokens, cfg.outputs)
    assert gate, gate.table()
    assert settings == settings_for("cpu", calibration_size=24) and gate.to_dict()["settings"]["reduce_range"]
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert QuantSettings.from_dict(json.loads(meta[SETTINGS_KEY])) == settings and meta["ipiqa.precision"] == "int8"
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(out)).graph.node)


def test_tensorrt_int8_graph_is_symmetric_s8s8_qdq_and_passes_the_gate(setup):
    from onnx import numpy_helper

    root, graphs, calibration, held, tokens, cfg = setup
    out = root / "trt" / "image_encoder.int8.onnx"
    settings = quantize_image_graph(graphs["image_encoder"], out, calibration_batches(calibration, R, 24), "tensorrt")
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert int8_gate(graphs, out, settings, held, tokens, cfg.outputs)


def test_int8_gate_fails_after_calibrating_on_one_constant_image(setup):
    root, graphs, calibration, held, tokens, cfg = setup
    grey = np.full((1, R, R, 3), 128, np.uint8)
    out = root / "bad" / "image_encoder.int8.onnx"
    settings = quantize_image_graph(graphs["image_encoder"], out, [grey], "cpu")
    gate = int8_gate(graphs, out, settings, held, tokens, cfg.outputs)
    assert settings.calibration_size == 1 and not gate
    assert not gate.results[0] and "FAIL  int8/image_embedding" in gate.table()


def test_an_unrescuable_int8_graph_raises_with_the_table_after_excluding_the_worst_layers(setup):
    root, graphs, calibration, held, tokens, cfg = setup
    grey = np.full((1, R, R, 3), 128, np.uint8)
    with pytest.raises(Int8GateError, match="image_encoder.int8.onnx: the INT8 gate failed on 16 held-out") as err:
        quantize_and_gate(graphs, root / "worse" / "image_encoder.int8.onnx", [grey], held, tokens, max_excluded=2)
    assert len(err.value.gate.settings.nodes_to_exclude) == 2  # the two most damaged layers were tried in FP32
    assert "FAIL  int8/image_embedding" in str(err.value)


def test_excluded_layers_stay_in_fp32(setup):
    root, graphs, calibration, held, tokens, cfg = setup
    conv = next(n.name for n in onnx.load(str(graphs["image_encoder"])).graph.node if n.op_type == "Conv")
    out = root / "exclude" / "image_encoder.int8.onnx"
    settings = quantize_image_graph(graphs["image_encoder"], out, calibration_batches(calibration, R, 8), "cpu",
                                    nodes_to_exclude=(conv,))
    nodes = onnx.load(str(out)).graph.node
    producers = {o: n.op_type for n in nodes for o in n.output}
    kept = next(n for n in nodes if n.name == conv)
    assert settings.nodes_to_exclude == (conv,) and producers.get(kept.input[0]) != "DequantizeLinear"
    assert kept.input[1] in {t.name for t in onnx.load(str(out)).graph.initializer}  # float weight, not Q/DQ


def test_the_gate_says_when_untrained_embeddings_cannot_judge_the_calibration(setup, tmp_path):
    from test_fp16 import export_graphs, tiny_model

    _, _, calibration, held, tokens, cfg = setup
    graphs = export_graphs(tiny_model(), tmp_path)  # the demo model as it is: embeddings ~constant
    out = tmp_path / "image_encoder.int8.onnx"
    settings = quantize_image_graph(graphs["image_encoder"], out, calibration_batches(calibration, R, 8), "cpu")
    gate = int8_gate(graphs, out, settings, held, tokens, cfg.outputs)
    assert "embeddings barely depend on the input" in gate.table()
    assert "spearman not gated: held-out scores barely spread" in gate.table()


def test_no_calibration_images_is_an_error_naming_the_graph(setup, tmp_path):
    _, graphs, *_ = setup
    with pytest.raises(IPIQAError, match="image_encoder.onnx: no calibration images"):
        quantize_image_graph(graphs["image_encoder"], tmp_path / "x.onnx", [], "cpu")


def test_targets_are_cpu_and_tensorrt():
    assert set(TARGETS) == {"cpu", "tensorrt"}


def test_an_unreadable_calibration_file_is_skipped_with_a_warning(tmp_path, caplog):
    files = write_images(tmp_path, 2, seed=4)
    broken = tmp_path / "broken.png"
    broken.write_bytes(files[0].read_bytes()[:40])
    batches = list(calibration_batches([files[0], broken, files[1]], R, size=3))
    assert [len(b) for b in batches] == [2] and "skipped" in caplog.text and "broken.png" in caplog.text


def test_the_cpu_int8_gate_runs_through_the_backend_that_serves_the_int8_graph(setup, monkeypatch):
    from ipiqa.runtime.backends.ort import OrtBackend

    root, graphs, calibration, held, tokens, cfg = setup
    out = root / "through" / "image_encoder.int8.onnx"
    settings = quantize_image_graph(graphs["image_encoder"], out, calibration_batches(calibration, R, 24), "cpu")
    assert int8_gate(graphs, out, settings, held, tokens, cfg.outputs)
    served = OrtBackend._encode_image

    def broken(self, images):  # the INT8 backend's image call, and only it, returns another image's outputs
        side = served(self, images)
        return {k: v[::-1].copy() for k, v in side.items()} if self.precision == "int8" else side

    monkeypatch.setattr(OrtBackend, "_encode_image", broken)
    failed = [r.name for r in int8_gate(graphs, out, settings, held, tokens, cfg.outputs).results if not r]
    assert "int8/image_embedding" in failed


def test_an_exception_from_openvino_in_its_int8_gate_is_a_failed_gate_with_its_reason_and_the_export_goes_on(
        tiny_model_file, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="the OpenVINO INT8 gate runs where ipiqa[openvino] is installed")
    from ipiqa.bundle import read_bundle
    from ipiqa.checkpoint import load_model
    from ipiqa.export.bundle_export import ExportOptions, Int8Options, export_bundle
    from ipiqa.runtime.backends.openvino import OpenVinoBackend
    from ipiqa.runtime.scorer import Scorer

    def refuse(cls, *args, **kwargs):
        raise RuntimeError("Exception from src/plugins/intel_cpu/src/node.cpp:1: Unsupported operation\nstack ...")

    monkeypatch.setattr(OpenVinoBackend, "from_graphs", classmethod(refuse))
    write_images(tmp_path / "calibration", 12, seed=4)
    lines: list[str] = []
    out = tmp_path / "bundle"
    export_bundle(load_model(tiny_model_file), [tiny_model_file], out,
                  ExportOptions(onnx_only=True, int8=Int8Options(tmp_path / "calibration", size=8)), progress=lines.append)
    entry = read_bundle(out).onnx.int8["cpu"]  # the export finished: the CPU INT8 graph is served
    assert entry.gate["passed"] and not entry.openvino_passed
    assert entry.openvino["gate"]["error"] == ("RuntimeError: Exception from src/plugins/intel_cpu/src/node.cpp:1: "
                                               "Unsupported operation")
    assert any("OpenVINO INT8 gate failed (RuntimeError: " in line for line in lines)
    with Scorer(out, device="cpu") as s:  # auto keeps INT8 on the runtime whose gate passed
        assert s.backend.name == "onnxruntime-cpu-int8"
