"""FP16 ONNX graphs: type-consistent, FP32 islands where FP16 breaks, and a gate on ONNX Runtime CPU that can fail."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="FP16 conversion needs ipiqa[export]")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ipiqa.config import IPIQAConfig  # noqa: E402
from ipiqa.export.checks import bounds_for  # noqa: E402
from ipiqa.export.fp16 import convert_to_fp16, graph_precision  # noqa: E402
from ipiqa.export.fp16_gate import fp16_emulation, fp16_gate  # noqa: E402
from ipiqa.export.graph_runs import graph_session, run_graphs  # noqa: E402
from ipiqa.export.measures import cosine_result  # noqa: E402

GRAPHS = ("image_encoder", "text_encoder", "fusion")


def export_graphs(model, out: Path) -> dict[str, Path]:
    """The three FP32 graphs as the bundle export writes them (single-query pooling traced in)."""
    import torch

    from ipiqa.export.graphs import build_graphs, graph_specs
    from ipiqa.export.to_onnx import export_onnx
    from ipiqa.model import pooling_mode, tokenize

    model = model.eval()
    r = model.cfg.resolution
    images = torch.randint(0, 256, (2, r, r, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(["a photo", "a cat"], model.cfg.context_length)
    with torch.no_grad():
        fmap, emb = model.encode_pixels(images)
        text = model.encode_text(tokens)
    examples = {"image_encoder": (images,), "text_encoder": (tokens,), "fusion": (fmap, emb, text)}
    specs, paths = graph_specs(model), {}
    with pooling_mode(model, True):
        for name, module in build_graphs(model).items():
            paths[name] = export_onnx(module, examples[name], out / f"{name}.onnx", specs[name].inputs,
                                      specs[name].outputs, model.cfg)
    return paths


def gate_feeds(cfg: IPIQAConfig, n: int = 16, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from ipiqa.model import tokenize

    images = np.random.default_rng(seed).integers(0, 256, (n, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    prompts = ["", "a photo of a cat wearing a tiny hat", "castles " * 40, "日本の桜 — café 🎨"]
    return images, tokenize([prompts[i % 4] + f" {i}" for i in range(n)], cfg.context_length).numpy()


def tiny_model(**changes):
    from conftest import TINY

    from ipiqa.demo import demo_model

    return demo_model(IPIQAConfig(**{**TINY, **changes}), seed=3)


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory) -> tuple[IPIQAConfig, dict[str, Path], dict[str, Path]]:
    model = tiny_model()
    out = tmp_path_factory.mktemp("fp16")
    fp32 = export_graphs(model, out)
    fp16 = {g: convert_to_fp16(p, out / "fp16" / p.name).path for g, p in fp32.items()}
    return model.cfg, fp32, fp16


def _types(path: Path) -> dict[str, int]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _nodes(path: Path):
    return onnx.load(str(path), load_external_data=False).graph.node


@pytest.mark.parametrize("graph", GRAPHS)
def test_fp16_graphs_pass_the_full_onnx_checker(tiny_graphs, graph):
    onnx.checker.check_model(str(tiny_graphs[2][graph]), full_check=True)
    assert graph_precision(tiny_graphs[2][graph]) == "fp16" and graph_precision(tiny_graphs[1][graph]) == "fp32"


@pytest.mark.parametrize("graph", GRAPHS)
def test_fp16_graphs_keep_the_fp32_graphs_input_and_output_types(tiny_graphs, graph):
    def io(path):
        g = onnx.load(str(path), load_external_data=False).graph
        return [(v.name, v.type.tensor_type.elem_type) for v in list(g.input) + list(g.output)]

    assert io(tiny_graphs[2][graph]) == io(tiny_graphs[1][graph])


@pytest.mark.parametrize("graph", GRAPHS)
def test_conv_and_matmul_weights_are_stored_in_fp16(tiny_graphs, graph):
    path = tiny_graphs[2][graph]
    inits = {t.name: t.data_type for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    weights = [n.input[1] for n in _nodes(path) if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits]
    assert weights and all(inits[w] == TensorProto.FLOAT16 for w in weights)


def test_norms_softmax_reductions_and_attention_logits_compute_in_fp32(tiny_graphs):
    for graph in GRAPHS:
        path, types = tiny_graphs[2][graph], _types(tiny_graphs[2][graph])
        nodes = list(_nodes(path))
        producer = {o: n for n in nodes for o in n.output}
        islands = [n for n in nodes if n.op_type in ("LayerNormalization", "Softmax", "ReduceMean")]
        for softmax in (n for n in nodes if n.op_type == "Softmax"):
            src = producer[softmax.input[0]]
            while src.op_type != "MatMul":  # scale and mask between the logits product and the softmax
                islands.append(src)
                src = producer[src.input[0]]
            islands.append(src)
        assert islands, graph
        for node in islands:
            assert types[node.input[0]] == TensorProto.FLOAT, f"{graph}: {node.op_type} {node.name} runs in FP16"
    convs = [n for n in _nodes(tiny_graphs[2]["image_encoder"]) if n.op_type == "Conv"]
    assert all(_types(tiny_graphs[2]["image_encoder"])[n.input[0]] == TensorProto.FLOAT16 for n in convs)


def test_fp16_graphs_load_and_run_on_onnx_runtime_cpu(tiny_graphs):
    cfg, fp32, fp16 = tiny_graphs
    images, tokens = gate_feeds(cfg, 4)
    ref, out = run_graphs(fp32, images, tokens), run_graphs(fp16, images, tokens)
    assert set(out) == set(ref) and all(np.isfinite(v).all() for v in out.values())
    # The FP16 row of the bounds table: every output within its absolute bound, every tensor but the scores at
    # its per-row cosine (what the gate holds them to), never a figure measured on one CPU's FP16 rounding.
    fp16_bounds = bounds_for("fp16")
    for k in ref:
        assert np.abs(out[k] - ref[k]).max() <= fp16_bounds.atol, k
        if k != "scores":
            result = cosine_result(k, ref[k], out[k], fp16_bounds.cosine_min)
            assert result, result.line()


def test_fp16_gate_passes_on_the_tiny_model(tiny_graphs):
    cfg, fp32, fp16 = tiny_graphs
    results = fp16_gate(fp32, fp16, *gate_feeds(cfg), columns=cfg.outputs)
    assert all(results), "\n".join(r.line() for r in results)
    assert any("scores barely spread" in r.name for r in results)  # untrained: ranks not gated, said so
    assert any("barely depend on the input" in r.line() for r in results)  # nor is a constant embedding


def test_fp16_gate_fails_when_attention_logits_overflow_in_fp16(tmp_path):
    """Large q/k in the text attention: the logits pass 65504 in FP16 but not in the FP32 island."""
    import torch

    model = tiny_model()
    with torch.no_grad():
        for block in model.text.transformer.resblocks:
            width = block.attn.in_proj_weight.shape[1]
            block.attn.in_proj_weight[: 2 * width].mul_(300.0)
    fp32 = export_graphs(model, tmp_path)
    feeds = gate_feeds(model.cfg, 8)
    good = {g: convert_to_fp16(p, tmp_path / "good" / p.name).path for g, p in fp32.items()}
    assert all(fp16_gate(fp32, good, *feeds))
    bad = {g: convert_to_fp16(p, tmp_path / "bad" / p.name, attention_logits_fp32=False).path for g, p in fp32.items()}
    failed = [r.name for r in fp16_gate(fp32, bad, *feeds) if not r]
    assert any("text_embedding" in n for n in failed) and any(n.startswith("fp16[text_encoder]") for n in failed)
    assert not any(n.startswith("fp16[image_encoder]") for n in failed)  # the failure names its graph


def _save(nodes, inputs, outputs, inits, path: Path) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_a_uint8_image_input_is_left_untouched(tmp_path):
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    scale = numpy_helper.from_array(np.array(1 / 255, np.float32), "scale")
    src = _save([helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["x", "scale"], ["xs"]),
                 helper.make_node("Conv", ["xs", "w"], ["y"])],
                [helper.make_tensor_value_info("image", TensorProto.UINT8, ["b", 3, 8, 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 6, 6])], [w, scale], tmp_path / "u8.onnx")
    dst = convert_to_fp16(src, tmp_path / "u8.fp16.onnx").path
    assert onnx.load(str(dst)).graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    image = np.random.default_rng(1).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    ref, (out,) = graph_session(src).run(None, {"image": image})[0], graph_session(dst).run(None, {"image": image})
    assert out.dtype == np.float32 and np.abs(out - ref).max() <= bounds_for("fp16").atol


def test_the_gate_emulation_rounds_where_onnx_runtime_cpu_does_not(tmp_path):
    """ORT CPU runs FP16 MatMul/Mul in FP32 and skips the FP16 round trip between them; the emulation keeps it."""
    f16 = TensorProto.FLOAT16
    path = _save([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "c"], ["y"])],
                 [helper.make_tensor_value_info("x", f16, [1, 4])], [helper.make_tensor_value_info("y", f16, None)],
                 [numpy_helper.from_array(np.full((4, 4), 200, np.float16), "w"),
                  numpy_helper.from_array(np.array(0.01, np.float16), "c")], tmp_path / "overflow.onnx")
    x = np.full((1, 4), 100, np.float16)  # x @ w = 80000: beyond FP16's 65504
    assert np.isfinite(graph_session(path).run(None, {"x": x})[0]).all()
    emulated = graph_session(fp16_emulation(path)).run(None, {"x": x.astype(np.float32)})[0]
    assert np.isinf(emulated).all()


def test_the_fp16_spearman_minimum_leaves_out_columns_the_reference_cannot_rank_in_either_column_order():
    from ipiqa.export.parity import compare

    rng = np.random.default_rng(0)
    ranked = rng.normal(size=64)
    ref = np.stack([ranked, np.full(64, 0.5)], 1)  # column 1 is constant: no rank order, Spearman NaN
    out = ref + rng.normal(scale=1e-4, size=ref.shape)
    for order in ([0, 1], [1, 0]):
        result = compare("fp16/scores", ref[:, order], out[:, order], scores=True, fp16=True)
        assert result.spearman == pytest.approx(1.0) and result.passed, result.line()
    flat = out.copy()
    flat[:, 0] = 0.25  # the output cannot rank a column the reference ranks: fails, in either order
    for order in ([0, 1], [1, 0]):
        assert not compare("fp16/scores", ref[:, order], flat[:, order], scores=True, fp16=True).passed
