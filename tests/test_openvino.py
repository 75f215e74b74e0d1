"""The OpenVINO backend: FP32 equal to ONNX Runtime on any CPU; BF16 only where the CPU has it and the bundle's
BF16 gate passed; the gate runs the three graphs as served and catches the text graph at BF16."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CPU_FAMILIES, fp32_rule_tolerance, hardware_flags_only, make_image, needs_hardware, read_csv
from ipiqa.bundle import read_bundle
from ipiqa.errors import IPIQAError
from ipiqa.runtime import cpu
from ipiqa.runtime.scorer import Scorer, select_backend

pytest.importorskip("openvino", reason="the OpenVINO backend needs ipiqa[openvino]")
from ipiqa.runtime.backends.openvino import OpenVinoBackend, cache_folder, cache_key, inference_precisions  # noqa: E402
from ipiqa.runtime.backends.ort import OrtBackend  # noqa: E402

BF16_HERE = cpu.bf16_refusal(cpu.hardware_flags())  # numerics: the hardware's flags, never injected ones
needs_bf16 = needs_hardware(*cpu.BF16_FLAGS)
NO_BF16 = frozenset({"sse4_2", "avx2", "fma", "avx512f"})  # an AVX-512 CPU without BF16 (Skylake-X, Zen 3 has no 512)
PROMPTS = ["a red fox in snow", "", "日本の桜、水彩画 🎨", "word " * 90]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ov_images")
    return [make_image(folder / f"{i}.png", size=(80 + 7 * i, 64), seed=20 + i) for i in range(4)]


@pytest.fixture(scope="module")
def arrays(images, tiny_bundle):
    from ipiqa.runtime.pipeline import load_input

    return np.stack([load_input(str(p), read_bundle(tiny_bundle).config.resolution) for p in images])


@pytest.fixture(scope="module")
def tokens(tiny_bundle):
    from ipiqa.runtime.tokenizer import ClipTokenizer

    m = read_bundle(tiny_bundle)
    return ClipTokenizer(m.root / m.tokenizer.file, m.config.context_length)(PROMPTS)


@pytest.fixture(scope="module")
def bf16_bundle(tiny_model_file, tmp_path_factory):
    """The tiny model exported with the BF16 gate (only where this CPU has BF16)."""
    if BF16_HERE is not None:
        pytest.skip(f"the BF16 gate runs only where BF16 runs natively: {BF16_HERE}")
    from ipiqa.checkpoint import load_model
    from ipiqa.export.bundle_export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bf16_bundle") / "bundle"
    with hardware_flags_only():  # made on this CPU's BF16, whichever family the suite runs as
        report = export_bundle(load_model(tiny_model_file), [tiny_model_file], out,
                               ExportOptions(onnx_only=True, bf16=True), progress=lambda m: None)
    return out, report


def test_cpu_flags_decide_bf16_and_the_refusal_names_the_missing_flags():
    assert cpu.bf16_flags(frozenset({"avx2", "avx512_bf16"})) == ("avx512_bf16",)
    assert cpu.bf16_flags(frozenset({"amx_bf16", "avx512_bf16"})) == ("amx_bf16", "avx512_bf16")
    assert cpu.bf16_refusal(frozenset({"amx_bf16"})) is None
    reason = cpu.bf16_refusal(NO_BF16, model="Some CPU")
    assert "Some CPU" in reason and "amx_bf16" in reason and "avx512_bf16" in reason and "--precision fp32" in reason


def test_every_graph_runs_fp32_except_image_and_fusion_at_bf16():
    assert inference_precisions("fp32") == inference_precisions("int8") == dict.fromkeys(
        ("image_encoder", "text_encoder", "fusion"), "fp32")
    assert inference_precisions("bf16") == {"image_encoder": "bf16", "text_encoder": "fp32", "fusion": "bf16"}
    with pytest.raises(IPIQAError, match="unknown openvino precision 'fp16'"):
        inference_precisions("fp16")


def test_openvino_fp32_equals_onnxruntime_fp32_within_the_fp32_rule(tiny_bundle, tiny_model_file, images, arrays,
                                                                    tokens):
    m = read_bundle(tiny_bundle)
    with OpenVinoBackend(m, "fp32", cache_dir="") as ov, OrtBackend(m) as ort:
        assert ov.name == "openvino-cpu"
        text_ov, text_ort = ov.encode_text(tokens), ort.encode_text(tokens)
        scale = max(1.0, float(np.abs(text_ort).max()))
        assert np.abs(text_ov - text_ort).max() <= 2 * 1e-4 * scale  # each within the rule's fixed part
        emb_ov, emb_ort = ov.embed_images(arrays), ort.embed_images(arrays)
        assert np.abs(emb_ov - emb_ort).max() <= 2 * 1e-4 * max(1.0, float(np.abs(emb_ort).max()))
        scores_ov, scores_ort = ov.score(arrays, text_ort), ort.score(arrays, text_ort)
    assert np.abs(scores_ov - scores_ort).max() <= 2 * fp32_rule_tolerance(tiny_model_file, images, PROMPTS)


def test_a_file_run_on_openvino_names_its_backend_and_matches_onnxruntime(tiny_bundle, tiny_model_file, images,
                                                                          tmp_path):
    sheet = tmp_path / "rows.csv"
    sheet.write_text("image,prompt\n" + "".join(f'{p},"{q}"\n' for p, q in zip(images, PROMPTS)) + "missing.png,x\n")
    outputs = {}
    for backend in ("openvino", "onnxruntime"):
        with Scorer(tiny_bundle, backend=backend, device="cpu", precision="fp32") as s:
            s.score_files(sheet, tmp_path / f"{backend}.csv")
            outputs[backend] = read_csv(tmp_path / f"{backend}.csv")
            assert s.backend.name == ("openvino-cpu" if backend == "openvino" else "onnxruntime-cpu")
    ov, ort = outputs["openvino"], outputs["onnxruntime"]
    assert [r["error"] for r in ov] == [r["error"] for r in ort] and ov[-1]["error"]  # the bad row is its own
    scored = [(a, b) for a, b in zip(ov, ort) if not a["error"]]  # an empty prompt cell is a missing prompt
    assert len(scored) == 3
    d = max(abs(float(a["quality"]) - float(b["quality"])) for a, b in scored)
    assert d <= 2 * fp32_rule_tolerance(tiny_model_file, images, PROMPTS)


def test_bf16_is_refused_naming_the_flags_or_else_the_missing_gate_record(tiny_bundle, cpu_family):
    """The CPU's refusal on the families without BF16; elsewhere the bundle's (no BF16 gate record)."""
    why = ("records no passing BF16 gate.*ipiqa-export MODEL.safetensors -o BUNDLE --onnx-only --bf16"
           if cpu_family.bf16 else "neither AMX \\(amx_bf16\\) nor AVX512-BF16")
    with pytest.raises(IPIQAError, match=why):
        Scorer(tiny_bundle, backend="openvino", device="cpu", precision="bf16")
    with pytest.raises(IPIQAError, match=why):
        Scorer(tiny_bundle, device="cpu", precision="bf16")  # backend auto: bf16 is OpenVINO's


def test_fp16_and_cuda_are_refused_on_openvino(tiny_bundle):
    with pytest.raises(IPIQAError, match="FP16 graphs are for GPUs; the openvino backend serves fp32, bf16 or int8"):
        Scorer(tiny_bundle, backend="openvino", device="cpu", precision="fp16")
    with pytest.raises(IPIQAError, match="openvino backend runs on the CPU"):
        select_backend(read_bundle(tiny_bundle), "openvino", "cuda")


def test_without_openvino_the_refusal_names_the_extra(tiny_bundle, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    with pytest.raises(IPIQAError, match=r"pip install 'ipiqa\[openvino\]'"):
        Scorer(tiny_bundle, backend="openvino", device="cpu", precision="fp32")


def test_compiled_models_are_cached_beside_the_bundle_or_where_the_user_says(tiny_bundle, tmp_path, monkeypatch):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    m = read_bundle(bundle)
    OpenVinoBackend(m).close()
    assert cache_folder(bundle) == bundle / "cache" / "openvino" and any((bundle / "cache" / "openvino").iterdir())
    read_bundle(bundle)  # the cache is not a bundle file: the manifest still verifies
    monkeypatch.setenv("IPIQA_OPENVINO_CACHE", str(tmp_path / "mine"))
    OpenVinoBackend(m).close()
    assert any((tmp_path / "mine").iterdir())
    assert cache_folder(bundle, "") is None


def test_new_weights_at_the_same_graph_paths_never_meet_the_old_compiled_blob(tiny_bundle, arrays, tmp_path):
    """The cache folder is keyed by the graphs' SHA-256 (the manifest's record), not their paths: the graph files
    unchanged, their external weights (``.onnx.data``) another model's, as a re-export leaves them."""
    from conftest import TINY
    from ipiqa.bundle import sha256_file
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import demo_model
    from ipiqa.export.bundle_export import ExportOptions, export_bundle

    other = tmp_path / "other"
    export_bundle(demo_model(IPIQAConfig(**TINY), seed=7), [], other, ExportOptions(onnx_only=True), progress=lambda m: None)
    bundle, cache = shutil.copytree(tiny_bundle, tmp_path / "bundle"), tmp_path / "cache"
    with OpenVinoBackend(read_bundle(bundle), "fp32", cache_dir=cache) as ov:
        old = ov.embed_images(arrays)
    data = json.loads((bundle / "manifest.json").read_text())
    for rel in [k for k in data["files"] if k.endswith(".onnx.data")]:
        shutil.copy(other / rel, bundle / rel)
        data["files"][rel] = sha256_file(bundle / rel)
    (bundle / "manifest.json").write_text(json.dumps(data))
    m = read_bundle(bundle)
    with OpenVinoBackend(m, "fp32", cache_dir=cache) as cached, OpenVinoBackend(m, "fp32", cache_dir="") as fresh:
        new = cached.embed_images(arrays)
        assert np.array_equal(new, fresh.embed_images(arrays)) and not np.allclose(new, old)
    keys = {cache_key(m.graph_path(g), m.files, m.root) for g in m.onnx.graphs}
    assert keys <= {p.name for p in cache.iterdir()} and len(list(cache.iterdir())) == 2 * len(keys)


def test_the_gates_openvino_backend_is_built_through_init_like_the_served_one(tiny_bundle, monkeypatch):
    m = read_bundle(tiny_bundle)
    graphs = {name: m.graph_path(name) for name in m.onnx.graphs}
    built = []
    init = OpenVinoBackend.__init__
    monkeypatch.setattr(OpenVinoBackend, "__init__",
                        lambda self, *a, **k: (built.append(k.get("graphs")), init(self, *a, **k))[1])
    with OpenVinoBackend.from_graphs(graphs) as gate, OpenVinoBackend(m, cache_dir="") as served:
        assert built == [graphs, None] and gate.cfg == served.cfg and gate.served == served.served
    with pytest.raises(IPIQAError, match="takes a bundle's manifest or graph files"):
        OpenVinoBackend()


def test_a_graph_swapped_for_another_config_is_refused_on_openvino(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    data = json.loads((bundle / "manifest.json").read_text())
    data["config"]["resolution"] = 96  # the manifest no longer describes the graphs
    (bundle / "manifest.json").write_text(json.dumps(data))
    from ipiqa.manifest import Manifest

    with pytest.raises(IPIQAError, match="exported for another config"):
        OpenVinoBackend(Manifest.from_dict(data, bundle), "fp32", cache_dir="")


@needs_bf16
def test_the_bf16_gate_passes_and_is_recorded_with_runtime_cpu_and_what_runs_at_bf16(bf16_bundle):
    bundle, report = bf16_bundle
    entry = read_bundle(bundle).onnx.bf16
    assert entry is not None and report.bf16["gate"] and all(r["passed"] for r in entry.gate)
    assert entry.runtime.startswith("openvino ") and any(f in entry.cpu for f in cpu.BF16_FLAGS)
    assert entry.served == {"image_encoder": "bf16", "text_encoder": "fp32", "fusion": "bf16"}
    names = {r["name"] for r in entry.gate}
    assert {"bf16/text_embedding", "bf16/image_embedding", "bf16/feature_map", "bf16/pooled"} <= names


@needs_bf16
def test_the_bf16_gate_fails_when_the_text_graph_runs_at_bf16_on_float_ids(tiny_bundle, monkeypatch):
    from ipiqa.export.bf16_gate import bf16_gate
    from ipiqa.export.gate import gate_inputs
    from ipiqa.runtime.backends import openvino_text

    m = read_bundle(tiny_bundle)
    graphs = {name: m.graph_path(name) for name in m.onnx.graphs}
    x = gate_inputs(m.config, 16, seed=1)
    assert all(bf16_gate(graphs, x.image, x.tokens, m.config.outputs))
    monkeypatch.setattr(openvino_text, "integer_end_of_text", lambda model: None)  # the search left on floats
    wrong = dict.fromkeys(graphs, "bf16")  # the whole-graph hint: the ArgMax over float token ids reads another row
    failed = [r.name for r in bf16_gate(graphs, x.image, x.tokens, m.config.outputs, served=wrong) if not r]
    assert "bf16/text_embedding" in failed


@needs_bf16
def test_bf16_scores_stay_within_the_gate_bounds_of_onnxruntime_fp32(bf16_bundle, arrays, tokens):
    from ipiqa.export.checks import BOUNDS
    from ipiqa.export.measures import cosine_result

    m = read_bundle(bf16_bundle[0])
    with OpenVinoBackend(m, "bf16") as ov, OrtBackend(m) as ort:
        assert ov.name == "openvino-cpu-bf16"
        text = ort.encode_text(tokens)
        assert np.array_equal(ov.encode_text(tokens), ov.encode_text(tokens))  # deterministic
        assert cosine_result("t", text, ov.encode_text(tokens), BOUNDS["bf16"].cosine_min)
        assert cosine_result("e", ort.embed_images(arrays), ov.embed_images(arrays), BOUNDS["bf16"].cosine_min)
        assert np.abs(ov.score(arrays, text) - ort.score(arrays, text)).max() <= BOUNDS["bf16"].atol


def test_auto_serves_a_bf16_gated_bundle_on_openvino_exactly_on_the_families_with_bf16(bf16_bundle, images, tmp_path,
                                                                                        cpu_family):
    from ipiqa.cli import cli

    expected = "openvino-cpu-bf16" if cpu_family.bf16 else "onnxruntime-cpu"  # the bundle has no INT8 graph
    with Scorer(bf16_bundle[0], device="cpu") as s:
        assert s.backend.name == expected
    res = CliRunner().invoke(cli, ["score", str(bf16_bundle[0]), "--images", str(images[0]), "--prompt", "a fox",
                                   "-o", str(tmp_path / "o.csv"), "-q"])
    assert res.exit_code == 0, res.output
    assert f"backend {expected}" in res.output


@pytest.mark.parametrize("cpu_family", [f for f in CPU_FAMILIES if not f.bf16], ids=lambda f: f.name, indirect=True)
def test_export_bf16_on_a_cpu_without_bf16_is_refused_before_any_work(tiny_model_file, tmp_path, cpu_family):
    from ipiqa.export.cli import main

    res = CliRunner().invoke(main, [str(tiny_model_file), "-o", str(tmp_path / "b"), "--onnx-only", "--bf16"])
    assert res.exit_code != 0 and "--bf16: this CPU" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()


def test_the_openvino_backend_imports_no_torch(tiny_bundle):
    import subprocess
    import sys

    code = ("import sys; from ipiqa.runtime.scorer import Scorer\n"
            f"s = Scorer({str(tiny_bundle)!r}, backend='openvino', device='cpu', precision='fp32')\n"
            "assert s.backend.name == 'openvino-cpu'\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_openvino_int8_on_a_bundle_without_int8_graphs_is_refused_naming_the_export(tiny_bundle):
    with pytest.raises(IPIQAError, match="--int8"):
        OpenVinoBackend(read_bundle(tiny_bundle), "int8", cache_dir=None)
