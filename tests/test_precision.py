"""Precision end to end: the export writes gated FP16 and INT8 graphs into the bundle, the runtime serves them
where they can run and refuses them, naming the rebuild command, where they cannot."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnx", reason="FP16/INT8 export needs ipiqa[export]")

from conftest import TINY  # noqa: E402
from ipiqa.bundle import read_bundle, rebuild_command  # noqa: E402
from ipiqa.checkpoint import save_model  # noqa: E402
from ipiqa.config import IPIQAConfig  # noqa: E402
from ipiqa.demo import demo_model  # noqa: E402
from ipiqa.errors import BundleError, IPIQAError  # noqa: E402
from ipiqa.export.cli import main as export_cli  # noqa: E402
from ipiqa.export.calibration import image_input, split_calibration  # noqa: E402
from ipiqa.runtime.scorer import Scorer, select_backend  # noqa: E402
from test_int8 import trained_like, write_images  # noqa: E402

R = TINY["resolution"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Generated-looking images and a CSV naming them with prompts."""
    root = tmp_path_factory.mktemp("calibration")
    files = write_images(root / "imgs", 30, seed=0)
    with open(root / "images.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["image", "prompt"], *[[f"imgs/{p.name}", f"a photo number {i}"]
                                                         for i, p in enumerate(files)]])
    return root


@pytest.fixture(scope="module")
def trained_model_file(images, tmp_path_factory) -> Path:
    """A seeded tiny model whose embeddings depend on the image (test_int8.trained_like), as a model file."""
    cfg = IPIQAConfig(**TINY)
    calib = np.stack([image_input(p, R) for p in sorted((images / "imgs").iterdir())[:16]])
    model = trained_like(demo_model(cfg, seed=3), calib)
    return save_model(tmp_path_factory.mktemp("trained") / "trained.safetensors", model.state_dict(), cfg)


@pytest.fixture(scope="module")
def precise_bundle(trained_model_file, images, tmp_path_factory) -> tuple[Path, object]:
    """--onnx-only --fp16-onnx --int8 on the trained-like tiny model, through the CLI."""
    out = tmp_path_factory.mktemp("precise") / "bundle"
    res = CliRunner().invoke(export_cli, [str(trained_model_file), "-o", str(out), "--onnx-only", "--fp16-onnx",
                                          "--int8", "--calibration", str(images / "images.csv"),
                                          "--calibration-size", "16"])
    assert res.exit_code == 0, res.output
    return out, res


# ---------------------------------------------------------------- export


def test_fp16_graphs_are_written_gated_hashed_and_recorded(precise_bundle):
    out, res = precise_bundle
    manifest = read_bundle(out)  # every listed file hashed, fp16/ and int8/ included
    fp16 = manifest.onnx.fp16
    assert set(fp16.graphs) == {"image_encoder", "text_encoder", "fusion"}
    assert all(f"fp16/{g}.onnx" in manifest.files and f"fp16/{g}.onnx.data" in manifest.files
               for g in fp16.graphs)
    assert fp16.gate and all(r["passed"] for r in fp16.gate) and fp16.gate_images == 16
    assert any(r["name"] == "fp16[end_to_end]/pooled" for r in fp16.gate)
    assert "fp32_layers" not in manifest.to_json()
    assert "FP16 graphs (fp16/image_encoder.onnx" in res.output and manifest.onnx_precisions == ("fp32", "fp16", "int8")


def test_int8_cpu_graph_is_recorded_with_settings_gate_and_criterion(precise_bundle):
    out, res = precise_bundle
    entry = read_bundle(out).onnx.int8["cpu"]
    assert entry.file == "int8/image_encoder.cpu.onnx" and set(read_bundle(out).onnx.int8) == {"cpu"}
    assert entry.settings["activation_type"] == "uint8" and entry.settings["reduce_range"]
    assert entry.calibration.images == 16 and entry.calibration.held_out == 6
    assert entry.calibration.held_out_prompts == "the CSV's prompt column"
    assert entry.gate["passed"] and entry.attempts and entry.excluded_nodes == ()
    assert entry.criterion == entry.gate["criterion"]
    assert "INT8 [cpu] int8/image_encoder.cpu.onnx" in res.output


def test_an_untrained_model_says_the_embedding_criterion_decided(tiny_model_file, images, tmp_path):
    res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", str(tmp_path / "b"), "--onnx-only", "--int8",
                                          "--calibration", str(images / "imgs"), "--calibration-size", "8"])
    assert res.exit_code == 0, res.output
    entry = read_bundle(tmp_path / "b").onnx.int8["cpu"]
    assert entry.criterion.startswith("image-embedding cosine only: the held-out scores barely spread")
    assert entry.calibration.held_out_prompts == "the gate's prompts (PARITY_PROMPTS)"
    ranks = [r for r in entry.gate["results"] if "spearman" in r]
    assert ranks and all(r["spearman"] is None and "embedding criterion decides" in r["note"] for r in ranks)
    assert read_bundle(tmp_path / "b").onnx.fp16 is None  # FP16 graphs only on request without engines


def test_held_out_images_are_never_calibrated_on(images):
    split = split_calibration(images / "images.csv")
    assert len(split.held_out) == 6 and not set(split.held_out) & set(split.calibration)
    assert len(split.held_out) + len(split.calibration) == 30 and split.prompts[0].startswith("a photo number")


def test_a_file_listed_twice_is_held_out_or_calibrated_on_as_a_whole(images, tmp_path):
    files = sorted((images / "imgs").iterdir())[:6]
    sheet = tmp_path / "twice.csv"
    with open(sheet, "w", newline="") as fh:
        csv.writer(fh).writerows([["image"], *[[str(p)] for p in files + files]])
    split = split_calibration(sheet, held_out=2)
    assert len(split.calibration) == 4 and not set(split.held_out) & set(split.calibration) and split.prompts is None


def test_too_few_calibration_images_is_an_error_naming_the_count(images, tmp_path):
    (tmp_path / "few").mkdir()
    for p in sorted((images / "imgs").iterdir())[:3]:
        shutil.copy(p, tmp_path / "few")
    with pytest.raises(IPIQAError, match="3 distinct images; the INT8 gate holds out 4.*at least 5"):
        split_calibration(tmp_path / "few")


def test_a_failing_int8_gate_is_one_clean_error_and_writes_no_manifest(trained_model_file, tmp_path):
    from PIL import Image

    natural = write_images(tmp_path / "natural", 4, seed=5)
    Image.new("RGB", (96, 96), (128, 128, 128)).save(tmp_path / "grey.png")
    sheet = tmp_path / "bad.csv"  # 5 files: the split holds out rows 0, 1, 3, 4 and calibrates on row 2 alone
    with open(sheet, "w", newline="") as fh:
        csv.writer(fh).writerows([["image"], *[[str(p)] for p in natural[:2] + [tmp_path / "grey.png"] + natural[2:]]])
    assert split_calibration(sheet).calibration == (tmp_path / "grey.png",)
    out = tmp_path / "b"
    res = CliRunner().invoke(export_cli, [str(trained_model_file), "-o", str(out), "--onnx-only", "--int8",
                                          "--calibration", str(sheet)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "the INT8 gate failed on 4 held-out images" in res.output and "FAIL  int8/image_embedding" in res.output
    assert "no manifest was written" in res.output and not (out / "manifest.json").exists()


def test_a_failing_fp16_gate_stops_the_export_before_a_manifest(tiny_model_file, tmp_path, monkeypatch):
    import ipiqa.export.fp16_gate as fp16_gate
    from ipiqa.export.checks import CosineResult

    monkeypatch.setattr(fp16_gate, "fp16_gate", lambda *a, **k: [CosineResult("fp16[end_to_end]/pooled", 0.5, 0.999, 1.0)])
    res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", str(tmp_path / "b"), "--onnx-only", "--fp16-onnx"])
    assert res.exit_code == 1 and "FP16 gate failed; the bundle was not written" in res.output, res.output
    assert "FAIL  fp16[end_to_end]/pooled" in res.output and not (tmp_path / "b" / "manifest.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--int8"], "--int8 needs --calibration"),
    (["--int8-setting", "bits=4", "--int8", "--calibration", "."], "KEY one of"),
    (["--calibration", "."], "go with --int8"),
    (["--int8", "--calibration", ".", "--fp32"], "drop --fp32"),
])
def test_export_cli_refuses_inconsistent_int8_options(tiny_model_file, tmp_path, args, message):
    res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", str(tmp_path / "b"), *args])
    assert res.exit_code == 2 and message in res.output, res.output


def test_int8_settings_are_parsed_per_target_and_recorded(tiny_model_file, images, tmp_path):
    res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", str(tmp_path / "b"), "--onnx-only", "--int8",
                                          "--calibration", str(images / "imgs"), "--calibration-size", "8",
                                          "--int8-setting", "cpu.calibrate_method=percentile",
                                          "--int8-setting", "per_channel=false"])
    assert res.exit_code == 0, res.output
    settings = read_bundle(tmp_path / "b").onnx.int8["cpu"].settings
    assert settings["calibrate_method"] == "percentile" and settings["per_channel"] is False


def test_reexport_reuses_fp16_and_int8_stages(trained_model_file, images, precise_bundle, tmp_path):
    out = shutil.copytree(precise_bundle[0], tmp_path / "copy")
    res = CliRunner().invoke(export_cli, [str(trained_model_file), "-o", str(out), "--onnx-only", "--fp16-onnx",
                                          "--int8", "--calibration", str(images / "images.csv"),
                                          "--calibration-size", "16"])
    assert res.exit_code == 0, res.output
    assert "FP16 graphs unchanged: reused" in res.output and "INT8 image graph for cpu unchanged: reused" in res.output
    assert read_bundle(out).onnx.int8 == read_bundle(precise_bundle[0]).onnx.int8


# ---------------------------------------------------------------- runtime


def test_int8_scores_on_cpu_through_the_scorer_are_close_to_fp32(precise_bundle, images):
    """The scorer serves the gated INT8 graph, held to what the gate guarantees, never to a figure tuned on one CPU.

    INT8 kernels round differently from one CPU to another (u8 x s8 with or without VNNI's saturation-free
    products), so no bound measured on one machine is asserted. What holds everywhere: the gate passed on this
    machine's held-out images (image-embedding cosine >= the table's INT8 bound, on embeddings that depend on the
    image), and the scorer, given those images and prompts, reproduces the gate's own max |d| per score column:
    the same graphs on the same CPU, where only FP32 summation order (batching) can differ, which the FP32 rule's
    fixed part bounds. The spec gates Spearman only where held-out scores spread; this model's do not, and the
    gate says so (that criterion is checked in test_an_untrained_model_says_the_embedding_criterion_decided).
    """
    from ipiqa.export.checks import bounds_for
    from ipiqa.export.parity import check_tolerance

    out, _ = precise_bundle
    gate = read_bundle(out).onnx.int8["cpu"].gate
    assert gate["passed"]
    (embedding,) = [r for r in gate["results"] if r["name"] == "int8/image_embedding"]
    assert embedding["min_cosine"] >= bounds_for("int8").cosine_min and not embedding["note"]
    files = sorted((images / "imgs").iterdir())
    prompts = [f"a photo number {i}" for i in range(len(files))]  # the CSV's prompts: the gate's held-out pairs
    with Scorer(out, device="cpu", precision="int8") as int8, Scorer(out, device="cpu", precision="fp32") as fp32:
        assert int8.backend.name == "onnxruntime-cpu-int8" and fp32.backend.name == "onnxruntime-cpu"
        columns = int8.outputs
        a = np.array([[r[k] for k in columns] for r in int8.score(files, prompts)])
        b = np.array([[r[k] for k in columns] for r in fp32.score(files, prompts)])
    assert np.isfinite(a).all() and not np.array_equal(a, b)  # the INT8 image graph really ran
    held = [files.index(p) for p in split_calibration(images / "images.csv").held_out]
    for j, name in enumerate(columns):
        (recorded,) = [r["max_abs"] for r in gate["results"] if r["name"] == f"int8/scores/{name}"]
        seen = float(np.abs(a[held, j] - b[held, j]).max())
        fixed = check_tolerance(float(np.ptp(b[held, j])), None)[1]
        assert abs(seen - recorded) <= fixed, f"{name}: max |d| {seen:.3e} through the scorer, {recorded:.3e} gated"


def test_int8_on_openvino_keeps_the_int8_bounds_on_the_held_out_images(precise_bundle, images):
    """OpenVINO's int8 kernels on the bundle's INT8 image graph (opt-in: ``auto`` serves INT8 on ONNX Runtime, the
    runtime its gate ran on) hold the INT8 gate's bounds against FP32 on the gate's held-out images."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs ipiqa[openvino]")
    from ipiqa.export.int8 import int8_checks
    from ipiqa.runtime.pipeline import load_input

    out, _ = precise_bundle
    entry = read_bundle(out).onnx.int8["cpu"]  # the export gated the graph on OpenVINO too, and recorded it
    assert entry.openvino_passed and entry.openvino["runtime"].startswith("openvino ")
    assert {r["name"] for r in entry.openvino["gate"]["results"]} >= {"openvino-int8/image_embedding"}
    held = split_calibration(images / "images.csv").held_out
    with Scorer(out, backend="openvino", device="cpu", precision="int8") as ov, \
            Scorer(out, device="cpu", precision="fp32") as fp32:
        assert ov.backend.name == "openvino-cpu-int8"
        pixels = np.stack([load_input(str(p), ov.resolution) for p in held])
        prompts = [f"a photo number {sorted((images / 'imgs').iterdir()).index(p)}" for p in held]
        text = fp32.cache.lookup(fp32.tokenizer(prompts), fp32.backend.encode_text)
        checks = int8_checks("openvino-int8", fp32.backend.embed_images(pixels), ov.backend.embed_images(pixels),
                             fp32.backend.score(pixels, text), ov.backend.score(pixels, text), ov.outputs)
        assert not np.array_equal(ov.backend.embed_images(pixels), fp32.backend.embed_images(pixels))  # INT8 ran
    assert all(checks), "\n".join(c.line() for c in checks)


def test_fp16_on_cpu_is_refused_with_the_reason(precise_bundle):
    with pytest.raises(IPIQAError, match=r"FP16 graphs are for GPUs \(ONNX Runtime CPU has no FP16 conv kernels and "
                                         r"runs them at 0.87x FP32\); use fp32 or int8 on CPU"):
        Scorer(precise_bundle[0], device="cpu", precision="fp16")


def test_a_precision_the_bundle_lacks_is_refused_naming_the_rebuild(tiny_bundle):
    with pytest.raises(IPIQAError, match="no int8 ONNX graphs \\(it has fp32\\); rebuild it with: ipiqa-export "
                                         "MODEL.safetensors -o BUNDLE --onnx-only --int8 --calibration"):
        Scorer(tiny_bundle, device="cpu", precision="int8")


def test_fp16_missing_on_a_gpu_provider_is_refused_naming_the_rebuild(tiny_bundle, monkeypatch):
    import ipiqa.runtime.scorer as scorer

    monkeypatch.setattr(scorer, "_ort_gpu_provider", lambda: "cuda")
    with pytest.raises(IPIQAError, match="no fp16 ONNX graphs.*--onnx-only --fp16-onnx"):
        select_backend(read_bundle(tiny_bundle), "onnxruntime", "cuda", "fp16")


def test_int8_on_a_gpu_provider_is_refused_naming_tensorrt(precise_bundle, monkeypatch):
    import ipiqa.runtime.scorer as scorer

    monkeypatch.setattr(scorer, "_ort_gpu_provider", lambda: "cuda")
    with pytest.raises(IPIQAError, match="quantized for CPUs.*INT8 runs as TensorRT engines.*--device cpu"):
        select_backend(read_bundle(precise_bundle[0]), "onnxruntime", "cuda", "int8")


def test_device_auto_serves_int8_on_the_cpu_when_there_are_no_int8_engines(precise_bundle, monkeypatch):
    import ipiqa.runtime.scorer as scorer

    monkeypatch.setattr(scorer, "_ort_gpu_provider", lambda: None)
    backend = select_backend(read_bundle(precise_bundle[0]), "auto", "auto", "int8")
    assert backend.name == "onnxruntime-cpu-int8"


def test_engines_of_another_precision_are_refused_naming_the_rebuild(tiny_bundle):
    from ipiqa.manifest import Engines

    engines = Engines("10", "gpu", "9.0", "fp16", (1, 4, 8), 1.0, "key", {})
    manifest = read_bundle(tiny_bundle).replace(precision="fp16", engines=engines)
    with pytest.raises(IPIQAError, match="engines are fp16, not int8; rebuild them with: ipiqa-export "
                                         "MODEL.safetensors -o BUNDLE --int8 --calibration"):
        select_backend(manifest, "tensorrt", "cuda", "int8")


def test_auto_precision_on_cpu_serves_the_gated_int8_graph_when_the_bundle_has_one(precise_bundle, tiny_bundle,
                                                                                   cpu_family):
    """No BF16 gate recorded: INT8 is the fastest gated set on every family; on OpenVINO where the CPU has int8
    dot products (VNNI, AMX) and the export gated it there, else on ONNX Runtime (``cpu_auto_choice``)."""
    import importlib.util

    on_openvino = (cpu_family.vnni and importlib.util.find_spec("openvino") is not None
                   and read_bundle(precise_bundle[0]).onnx.int8["cpu"].openvino_passed)
    with Scorer(precise_bundle[0], device="cpu") as s:
        assert s.backend.name == ("openvino-cpu-int8" if on_openvino else "onnxruntime-cpu-int8")
    with Scorer(tiny_bundle, device="cpu") as s:
        assert s.backend.name == "onnxruntime-cpu" and s.backend.precision == "fp32"


def test_unknown_precision_is_refused(tiny_bundle):
    with pytest.raises(IPIQAError, match="unknown precision 'fp8'; choose from auto, fp32, fp16, bf16, int8"):
        Scorer(tiny_bundle, device="cpu", precision="fp8")


def test_a_swapped_graph_file_of_another_precision_is_refused(precise_bundle, tmp_path):
    out = shutil.copytree(precise_bundle[0], tmp_path / "copy")
    data = json.loads((out / "manifest.json").read_text())
    data["onnx"]["int8"]["cpu"]["file"] = "image_encoder.onnx"  # the FP32 graph listed as the INT8 one
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="image_encoder.onnx: graph is fp32, the manifest lists it as int8"):
        Scorer(out, device="cpu", precision="int8")


def test_score_cli_takes_precision(precise_bundle, images, tmp_path):
    from ipiqa.cli import cli

    out = tmp_path / "o.csv"
    res = CliRunner().invoke(cli, ["score", str(precise_bundle[0]), "--images", str(images / "images.csv"),
                                   "-o", str(out), "--device", "cpu", "--precision", "int8", "-q"])
    assert res.exit_code == 0, res.output
    assert "onnxruntime-cpu-int8" in res.output and len(out.read_text().splitlines()) == 31
    res = CliRunner().invoke(cli, ["score", str(precise_bundle[0]), "--images", str(images / "images.csv"),
                                   "--device", "cpu", "--precision", "fp16"])
    assert res.exit_code == 1 and "FP16 graphs are for GPUs" in res.output and "Traceback" not in res.output


def test_rebuild_commands_name_the_flags():
    assert rebuild_command("int8") == "ipiqa-export MODEL.safetensors -o BUNDLE --onnx-only --int8 --calibration IMAGES.csv|DIR"
    assert rebuild_command("fp16", engines=True).endswith("--fp16")
