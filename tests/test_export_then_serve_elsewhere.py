"""A bundle exported on one CPU family, scored on another, as a user types it: ``ipiqa-export --int8`` run under one
family's flags, then ``ipiqa score`` under each family's. What the export recorded about its own CPU (INT8 dot
products while its OpenVINO gate ran) decides what the scoring CPU may serve; nothing in between edits the bundle."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import CPU_FAMILIES, read_csv
from test_int8 import write_images
from ipiqa.runtime.cpu import FLAGS_ENV

pytest.importorskip("openvino", reason="needs ipiqa[openvino]")
pytest.importorskip("nncf", reason="needs ipiqa[openvino] (NNCF makes OpenVINO's INT8 graph)")

EXPORTED_ON = [f for f in CPU_FAMILIES if f.name in ("icelake", "avx2")]  # with and without dot products


@pytest.fixture(scope="module", params=EXPORTED_ON, ids=lambda f: f"exported-on-{f.name}")
def exported(request, tiny_model_file, tmp_path_factory):
    """(family the export ran under, the bundle ``ipiqa-export --int8`` wrote there)."""
    from ipiqa.export.cli import main as export_cli

    family = request.param
    root = tmp_path_factory.mktemp(f"exported_on_{family.name}")
    write_images(root / "calibration", 12, seed=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FLAGS_ENV, ",".join(sorted(family.flags)))
        res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", str(root / "bundle"), "--onnx-only",
                                              "--int8", "--calibration", str(root / "calibration"),
                                              "--calibration-size", "8"])
    assert res.exit_code == 0, res.output
    return family, root / "bundle"


def _score(bundle, images, out, *options):
    from ipiqa.cli import cli

    return CliRunner().invoke(cli, ["score", str(bundle), "--images", str(images), "--prompt", "a fox",
                                    "-o", str(out), "-q", *options])


def test_the_export_records_whether_its_cpu_had_int8_dot_products(exported):
    from ipiqa.bundle import read_bundle

    family, bundle = exported
    record = read_bundle(bundle).onnx.int8["cpu"]
    assert record.openvino_passed, "the OpenVINO gate of the tiny model passes on every CPU"
    assert record.openvino["cpu_int8_dot"] is family.vnni


def test_openvino_int8_scores_where_the_export_and_this_cpu_agree_and_is_refused_naming_the_fix_elsewhere(
        exported, cpu_family, tmp_path):
    exported_on, bundle = exported
    images = write_images(tmp_path / "images", 2, seed=9)[0].parent
    res = _score(bundle, images, tmp_path / "s.csv", "--backend", "openvino", "--precision", "int8")
    if exported_on.vnni and not cpu_family.vnni:
        assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output  # a clean error, no crash
        assert "no INT8 dot products" in res.output and "--backend onnxruntime" in res.output, res.output
        assert not (tmp_path / "s.csv").exists()
        return
    assert res.exit_code == 0, res.output
    assert "backend openvino-cpu-int8" in res.output
    assert all(not r["error"] and r["quality"] for r in read_csv(tmp_path / "s.csv"))


def test_auto_serves_int8_on_every_cpu_and_openvino_only_where_this_cpu_has_int8_dot_products(
        exported, cpu_family, tmp_path):
    _, bundle = exported
    images = write_images(tmp_path / "images", 2, seed=9)[0].parent
    res = _score(bundle, images, tmp_path / "s.csv", "--precision", "auto")
    assert res.exit_code == 0, res.output
    runtime = "openvino" if cpu_family.vnni else "onnxruntime"
    assert f"backend {runtime}-cpu-int8" in res.output, (cpu_family.name, res.output)
    assert all(not r["error"] for r in read_csv(tmp_path / "s.csv"))

