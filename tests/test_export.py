"""ipiqa-export: each ONNX graph equals its PyTorch module, the gate can fail, the bundle refuses tampering."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY
from ipiqa.bundle import check_graph_metadata, read_bundle
from ipiqa.checkpoint import save_model
from ipiqa.config import IPIQAConfig
from ipiqa.demo import demo_model
from ipiqa.errors import BundleError
from ipiqa.export.bundle_export import ExportOptions, ParityGateError, export_bundle, onnx_parity
from ipiqa.export.gate import gate_inputs
from ipiqa.export.checks import ParityResult
from ipiqa.export.parity import compare
from ipiqa.export.cli import main as export_cli
from ipiqa.model import tokenize

ONNX_ONLY = ExportOptions(onnx_only=True)
VARIANTS = {
    "512-2out-mlp": dict(resolution=512),
    "224-1out-linear": dict(resolution=224, outputs=("quality",), head="linear"),
    "224-2out-linear": dict(resolution=224, head="linear"),
    "512-1out-mlp": dict(resolution=512, outputs=("mos",)),
}


def _export(tmp_path_factory, cfg, seed=0):
    model = demo_model(cfg, seed=seed)
    root = tmp_path_factory.mktemp("bundle")
    src = save_model(root / "model.safetensors", model.state_dict(), cfg)
    report = export_bundle(model, [src], root / "bundle", ONNX_ONLY, progress=lambda m: None)
    return model, src, report


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    """Reduced-width backbone (fast) at each resolution/head/output variant."""
    return _export(tmp_path_factory, IPIQAConfig(**{**TINY, **VARIANTS[request.param]}))


@pytest.fixture(scope="module")
def exported_rn50(tmp_path_factory):
    """The real RN50 architecture at 224 px."""
    return _export(tmp_path_factory, IPIQAConfig(resolution=224), seed=2)


@pytest.fixture(scope="module")
def rn50_float64(exported_rn50):
    """The same RN50 in float64: its difference from the FP32 model is the reference's own error (the floor)."""
    return _float64(exported_rn50[0])


def _float64(model):
    return copy.deepcopy(model).double().eval()


def _assert_fp32_rule(name, ref, out, ref64, scores=False, relative=False):
    """The gate's FP32 rule (``export.parity.compare``): ``max(1e-4 x max(1, scale), k x floor)``, the floor being
    ``max |ref - ref64|`` on these inputs, measured on this machine: never a figure tuned on one CPU.

    ``relative``: in units of the tensor's largest magnitude, as the gate checks the cross pool (``fusion/pooled``),
    whose values stay far below 1 (see ``export.gate._relative``)."""
    ref, out, ref64 = (np.asarray(v, np.float64) for v in (ref, out, ref64))
    if relative:
        scale = float(np.abs(ref).max()) or 1.0
        ref, out, ref64 = ref / scale, out / scale, ref64 / scale
    result = compare(name, ref, out, scores=scores, ref64=ref64)
    assert result, result.line()


def _sessions(bundle):
    manifest = read_bundle(bundle)
    return manifest, {g: ort.InferenceSession(str(manifest.graph_path(g)), providers=["CPUExecutionProvider"])
                      for g in manifest.onnx.graphs}


@pytest.mark.parametrize("batch", [1, 7])
def test_each_graph_matches_its_module_at_batch_1_and_7(exported, batch):
    model, _, report = exported
    _, run = _sessions(report.bundle)
    r = model.cfg.resolution
    x = torch.randint(0, 256, (batch, r, r, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(batch))
    tokens = tokenize([f"prompt number {i}" for i in range(batch)])
    model64 = _float64(model)
    with torch.no_grad():
        fmap, emb = model.encode_pixels(x)
        text = model.encode_text(tokens)
        scores = model.fuse(fmap, emb, text)
        pooled = model.txt_attnpool(fmap, text)
        fmap64, emb64 = model64.encode_pixels(x)
        text64 = model64.encode_text(tokens)
        scores64 = model64.fuse(fmap.double(), emb.double(), text.double())  # the fusion step's own floor
        pooled64 = model64.txt_attnpool(fmap.double(), text.double())
    fmap_o, emb_o = run["image_encoder"].run(None, {"image": x.numpy()})
    (text_o,) = run["text_encoder"].run(None, {"tokens": tokens.numpy()})
    scores_o, pooled_o = run["fusion"].run(["scores", "pooled"], {"feature_map": fmap.numpy(),
                                                                  "image_embedding": emb.numpy(),
                                                                  "text_embedding": text.numpy()})
    _assert_fp32_rule("fusion/pooled", pooled, pooled_o, pooled64, relative=True)
    _assert_fp32_rule("image_encoder/feature_map", fmap, fmap_o, fmap64)
    _assert_fp32_rule("image_encoder/image_embedding", emb, emb_o, emb64)
    _assert_fp32_rule("text_encoder/text_embedding", text, text_o, text64)
    assert scores_o.shape == (batch, model.cfg.num_outputs)
    _assert_fp32_rule("fusion/scores", scores, scores_o, scores64, scores=True)


def test_recorded_parity_equals_a_fresh_gate_run_on_the_written_bundle(exported):
    """The manifest's figures describe the files it hashes: re-run on the read-back bundle, the gate agrees."""
    model, _, report = exported
    manifest = read_bundle(report.bundle)
    recorded = [ParityResult.from_dict(r) for r in manifest.parity.onnx]
    assert recorded == onnx_parity(model, manifest)


def test_bare_sessions_composed_match_the_model_within_the_recorded_tolerance(exported):
    """Outside the gate's code: the three graphs chained by hand on fresh inputs, against the model's forward."""
    model, _, report = exported
    manifest, run = _sessions(report.bundle)
    x = gate_inputs(model.cfg, 5, seed=7)
    fmap, emb = run["image_encoder"].run(None, {"image": x.image})
    (text,) = run["text_encoder"].run(None, {"tokens": x.tokens})
    (scores,) = run["fusion"].run(["scores"], {"feature_map": fmap, "image_embedding": emb, "text_embedding": text})
    with torch.no_grad():
        ref = model(x.model_images, x.model_tokens).numpy()
    (e2e,) = [r for r in manifest.parity.onnx if r["name"] == "end_to_end/scores"]
    assert np.abs(scores - ref).max() <= e2e["tolerance"]


def test_real_rn50_graphs_compose_to_model_forward(exported_rn50, rn50_float64):
    model, _, report = exported_rn50
    _, run = _sessions(report.bundle)
    x = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(["a cat", "", "ein Hund im Schnee"])
    fmap, emb = run["image_encoder"].run(None, {"image": x.numpy()})
    (text,) = run["text_encoder"].run(None, {"tokens": tokens.numpy()})
    (scores,) = run["fusion"].run(["scores"], {"feature_map": fmap, "image_embedding": emb, "text_embedding": text})
    with torch.no_grad():
        ref = model.fuse(*model.encode_pixels(x), model.encode_text(tokens)).numpy()
        ref64 = rn50_float64.fuse(*rn50_float64.encode_pixels(x), rn50_float64.encode_text(tokens)).numpy()
    _assert_fp32_rule("end_to_end/scores", ref, scores, ref64, scores=True)


@pytest.mark.parametrize("prompt", ["", " ".join(["word"] * 200), "日本の桜 — café &amp; 🎨", "   \t\n  "])
def test_text_graph_matches_for_empty_long_and_non_ascii_prompts(exported_rn50, rn50_float64, prompt):
    model, _, report = exported_rn50
    _, run = _sessions(report.bundle)
    tokens = tokenize([prompt, "a plain prompt"])
    (text,) = run["text_encoder"].run(None, {"tokens": tokens.numpy()})
    with torch.no_grad():
        ref, ref64 = model.encode_text(tokens).numpy(), rn50_float64.encode_text(tokens).numpy()
    _assert_fp32_rule("text_encoder/text_embedding", ref, text, ref64)


def test_text_graph_has_no_int64_argmax(exported_rn50):
    onnx = pytest.importorskip("onnx")
    _, _, report = exported_rn50
    graph = onnx.load(str(report.bundle / "text_encoder.onnx"), load_external_data=False).graph
    argmax_inputs = [n.input[0] for n in graph.node if n.op_type == "ArgMax"]
    assert argmax_inputs and "tokens" not in argmax_inputs  # ArgMax reads a float cast, not the int64 ids


def test_gate_fails_when_a_weight_changes_after_export(exported):
    model, _, report = exported
    manifest = read_bundle(report.bundle)
    bias = model.head.out_proj.bias if model.cfg.head == "mlp" else model.head.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.add_(0.01)
    try:
        results = onnx_parity(model, manifest)
        assert not all(results) and any(r.name == "end_to_end/scores" and not r for r in results)
    finally:
        with torch.no_grad():
            bias.copy_(saved)  # bit for bit: later tests re-run the gate on this model


def test_failed_gate_leaves_no_manifest(tmp_path, monkeypatch):
    import ipiqa.export.gate as gate

    cfg = IPIQAConfig(**TINY)
    model = demo_model(cfg)
    src = save_model(tmp_path / "m.safetensors", model.state_dict(), cfg)
    real = gate.compare
    monkeypatch.setattr(gate, "compare", lambda name, ref, out, **kw: real(name, ref, np.asarray(out) + 1.0, **kw))
    with pytest.raises(ParityGateError, match="end_to_end/scores"):
        export_bundle(model, [src], tmp_path / "b", ONNX_ONLY, progress=lambda m: None)
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_reexport_of_unchanged_model_reuses_graphs(exported):
    model, src, report = exported
    again = export_bundle(model, [src], report.bundle, ONNX_ONLY, progress=lambda m: None)
    assert again.reused_onnx and again.parity == report.parity  # every field, floors included, read back


def test_manifest_records_what_the_runtime_needs(exported):
    model, _, report = exported
    data = json.loads((report.bundle / "manifest.json").read_text())
    # outputs and preprocessing are the config's (format 3 stores no copies)
    assert IPIQAConfig.from_dict(data["config"]) == model.cfg and data["config"]["outputs"] == list(model.cfg.outputs)
    assert data["config"]["resolution"] == model.cfg.resolution
    assert data["onnx"]["opset"] >= 17 and data["precision"] == "fp32" and data["engines"] is None
    assert (report.bundle / data["tokenizer"]["files"]["bpe"]).is_file()
    assert {"ipiqa", "torch", "onnx", "onnxruntime"} <= set(data["versions"])
    assert set(data["files"]) >= {"image_encoder.onnx", "image_encoder.onnx.data", "tokenizer/bpe_simple_vocab_16e6.txt.gz"}


@pytest.fixture
def bundle_copy(exported, tmp_path):
    return shutil.copytree(exported[2].bundle, tmp_path / "copy")


def test_changed_file_is_refused_naming_it(bundle_copy):
    with open(bundle_copy / "fusion.onnx.data", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="fusion.onnx.data: SHA-256 does not match.*ipiqa-export"):
        read_bundle(bundle_copy)


def test_wrong_resolution_in_manifest_is_refused_by_the_graph_check(bundle_copy):
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["config"]["resolution"] = 96 if data["config"]["resolution"] != 96 else 128
    path.write_text(json.dumps(data))
    manifest = read_bundle(bundle_copy)
    sess = ort.InferenceSession(str(manifest.graph_path("image_encoder")), providers=["CPUExecutionProvider"])
    with pytest.raises(BundleError, match="another config"):
        check_graph_metadata(manifest, "image_encoder", sess.get_modelmeta().custom_metadata_map,
                             {i.name: i.shape for i in sess.get_inputs()})


def test_bundle_from_another_ipiqa_version_is_refused(bundle_copy):
    with pytest.raises(BundleError, match="built by ipiqa 0.1.*this is ipiqa 9.9.*ipiqa-export"):
        read_bundle(bundle_copy, ipiqa_version="9.9.0")


def test_missing_manifest_says_how_to_rebuild(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json.*ipiqa-export"):
        read_bundle(tmp_path)


def test_export_cli_writes_bundle_and_parity_table(tiny_model_file, tmp_path):
    res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", str(tmp_path / "b"), "--onnx-only"])
    assert res.exit_code == 0, res.output
    assert "end_to_end/scores" in res.output and (tmp_path / "b" / "manifest.json").is_file()


def test_export_cli_without_tensorrt_fails_fast_and_suggests_onnx_only(tiny_model_file, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", str(tmp_path / "b")])
    assert res.exit_code == 1 and "ipiqa[tensorrt]" in res.output and "--onnx-only" in res.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args,message", [
    (["--batch", "8,4,16"], "MIN <= OPT <= MAX"),
    (["--batch", "1,2"], "three integers"),
    (["--workspace", "0"], "workspace"),
    (["--atol", "inf"], "finite number >= 0"),
    (["--rtol", "-1"], "x>=0"),
])
def test_export_cli_refuses_bad_options(tiny_model_file, tmp_path, args, message):
    res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", str(tmp_path / "b"), *args])
    assert res.exit_code == 2 and message in res.output


def test_export_cli_needs_exactly_one_source(tmp_path):
    res = CliRunner().invoke(export_cli, ["-o", str(tmp_path / "b")])
    assert res.exit_code == 2 and "--official" in res.output


def test_image_only_model_exports_without_text_graph(tmp_path):
    cfg = IPIQAConfig(**TINY, text=False)
    model = demo_model(cfg)
    src = save_model(tmp_path / "m.safetensors", model.state_dict(), cfg)
    report = export_bundle(model, [src], tmp_path / "b", ONNX_ONLY, progress=lambda m: None)
    assert all(report.parity) and set(read_bundle(tmp_path / "b").onnx.graphs) == {"image_encoder", "fusion"}


def test_official_checkpoint_exports_directly(authors_224_linear, tmp_path):
    ft, clip, _, _ = authors_224_linear
    res = CliRunner().invoke(export_cli, ["--official", str(ft), "--clip", str(clip), "-o", str(tmp_path / "b"),
                                          "--onnx-only"])
    assert res.exit_code == 0, res.output
    assert read_bundle(tmp_path / "b").config.head == "linear"


def test_export_leaves_the_callers_pooling_mode_alone(tmp_path):
    cfg = IPIQAConfig(**TINY)
    model = demo_model(cfg)
    src = save_model(tmp_path / "m.safetensors", model.state_dict(), cfg)
    export_bundle(model, [src], tmp_path / "b", ExportOptions(onnx_only=True, single_query_pooling=False),
                  progress=lambda m: None)
    assert model.single_query_pooling and read_bundle(tmp_path / "b").onnx.pooling == "straightforward"


def test_the_stage_rules_import_no_torch():
    """``export/stages.py`` (context, reuse rule, gate rule) is what its docstring says: torch-free."""
    import subprocess
    import sys

    code = "import sys, ipiqa.export.stages; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
