"""INT8 export in flat memory: calibration ranges merged run by run, the layer ranking summed image by image.

Each test pins a mechanism on the tiny model (not the RSS of a shared 2-core machine): the streamed result
equals ONNX Runtime's all-at-once result, and what is held does not grow with the number of images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="INT8 quantization needs ipiqa[export]")
from onnxruntime.quantization import calibrate  # noqa: E402
from onnxruntime.quantization import qdq_loss_debug as dbg  # noqa: E402

from ipiqa.export import quantize  # noqa: E402
from ipiqa.export.calibration import calibration_batches  # noqa: E402
from ipiqa.export.int8_settings import settings_for  # noqa: E402
from ipiqa.export.quantize import quantize_image_graph  # noqa: E402

R = 64  # the tiny model's resolution


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny image graph with image-dependent activations, its INT8 graph, and 12 calibration images."""
    from test_fp16 import export_graphs, tiny_model
    from test_int8 import trained_like, write_images

    root = tmp_path_factory.mktemp("int8mem")
    files = write_images(root / "calibration", 12, seed=5)
    images = np.concatenate(list(calibration_batches(files, R, 12)))
    graphs = export_graphs(trained_like(tiny_model(), images), root / "fp32")
    out = root / "int8" / "image_encoder.int8.onnx"
    quantize_image_graph(graphs["image_encoder"], out, [images[:8]], "cpu")  # ranked on all 12: some unseen
    return root, graphs["image_encoder"], out, images


def batches_of(images: np.ndarray, sizes) -> list[np.ndarray]:
    edges = np.cumsum([0, *sizes])
    return [images[a:b] for a, b in zip(edges[:-1], edges[1:])]


class ListReader(calibrate.CalibrationDataReader):
    """The batches as given, all in one pass: what ONNX Runtime's tools read without streaming."""

    def __init__(self, batches, name="image"):
        self._it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self._it, None)


def ort_ranking(fp32: Path, qdq: Path, batches, op_types, tmp: Path) -> tuple[list[str], dict[str, float]]:
    """The ranking as ONNX Runtime's QDQ loss debugger gives it: every tensor of both graphs, every image held."""
    aug32, aug8 = tmp / "fp32.onnx", tmp / "int8.onnx"
    dbg.modify_model_output_intermediate_tensors(str(fp32), str(aug32), save_as_external_data=True)
    dbg.modify_model_output_intermediate_tensors(str(qdq), str(aug8), save_as_external_data=True)
    acts8 = dbg.collect_activations(str(aug8), ListReader(batches))
    acts32 = dbg.collect_activations(str(aug32), ListReader(batches))
    errors = dbg.compute_activation_error(dbg.create_activation_matching(acts8, acts32))
    ranked = {}
    for node in onnx.load(str(fp32), load_external_data=False).graph.node:
        if node.op_type in op_types and node.name:
            err = errors.get(node.input[0], {}).get("qdq_err")
            if err is not None and np.isfinite(err):
                ranked[node.name] = float(err)
    return sorted(ranked, key=ranked.get), {k: v["qdq_err"] for k, v in errors.items()}


def test_streamed_layer_ranking_equals_the_qdq_loss_debuggers(tiny, tmp_path):
    _, fp32, qdq, images = tiny
    batches = batches_of(images, (5, 4, 3))  # several batches of several images: concatenation across both
    op_types = settings_for("cpu").op_types
    expected, ort_sqnr = ort_ranking(fp32, qdq, batches, op_types, tmp_path)
    got = quantize.sensitive_nodes(fp32, qdq, batches, op_types)
    assert len(expected) > 5 and got == expected
    ours = quantize._activation_sqnr(qdq, batches, ort_sqnr)
    assert set(ours) == set(ort_sqnr)
    for name, value in ours.items():
        assert value == pytest.approx(ort_sqnr[name], rel=1e-4, abs=1e-4), name


def test_streamed_calibration_ranges_equal_the_unbounded_calibrators(tiny, tmp_path, monkeypatch):
    _, fp32, _, images = tiny
    batches = batches_of(images, (8, 4))
    final = []
    compute = calibrate.MinMaxCalibrater.compute_data

    def spy(self):
        final.append(compute(self))
        return final[-1]

    monkeypatch.setattr(calibrate.MinMaxCalibrater, "compute_data", spy)
    quantize_image_graph(fp32, tmp_path / "streamed.onnx", batches, "cpu")
    monkeypatch.undo()

    ref = calibrate.create_calibrator(fp32, list(settings_for("cpu").op_types),
                                      augmented_model_path=str(tmp_path / "augmented.onnx"))
    ref.collect_data(ListReader(batches))  # every batch's outputs held, reduced once
    expected = ref.compute_data()
    got = final[-1]
    assert set(got.data) == set(expected.data) and len(expected.data) > 10
    for name, r in expected.data.items():
        np.testing.assert_allclose(np.asarray(got.data[name].range_value, np.float64),
                                   np.asarray(r.range_value, np.float64), rtol=1e-5, atol=1e-6, err_msg=name)


def test_calibration_holds_one_image_run_at_a_time_however_many_images(tiny, tmp_path, monkeypatch):
    _, fp32, _, images = tiny
    held, runs = [], []
    compute, collect = calibrate.MinMaxCalibrater.compute_data, calibrate.MinMaxCalibrater.collect_data

    def spy_compute(self):
        held.append(len(self.intermediate_outputs))  # run outputs waiting to be reduced
        return compute(self)

    def spy_collect(self, reader):
        runs.append(0)
        return collect(self, reader)

    monkeypatch.setattr(calibrate.MinMaxCalibrater, "compute_data", spy_compute)
    monkeypatch.setattr(calibrate.MinMaxCalibrater, "collect_data", spy_collect)
    for n in (3, 12):
        held.clear(), runs.clear()
        quantize_image_graph(fp32, tmp_path / f"q{n}.onnx", batches_of(images[:n], (n,)), "cpu")
        assert len(runs) == n and max(held) <= 1, (n, len(runs), max(held))


def test_layer_ranking_runs_one_image_with_only_the_compared_tensors_and_keeps_two_sums(tiny, monkeypatch):
    import onnxruntime

    _, fp32, qdq, images = tiny
    feeds, sums = [], []
    run = onnxruntime.InferenceSession.run

    def spy_run(self, output_names, input_feed, *a, **k):
        feeds.append((len(output_names), next(iter(input_feed.values())).shape[0]))
        return run(self, output_names, input_feed, *a, **k)

    init = quantize._SqnrSums.__init__

    def spy_init(self, pairs):
        init(self, pairs)
        sums.append(self)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", spy_run)
    monkeypatch.setattr(quantize._SqnrSums, "__init__", spy_init)
    op_types = settings_for("cpu").op_types
    for n in (2, 12):
        feeds.clear(), sums.clear()
        quantize.sensitive_nodes(fp32, qdq, batches_of(images[:n], (n,)), op_types)
        (acc,) = sums
        assert len(feeds) == n and {b for _, b in feeds} == {1}  # one image per run
        tensors = {t for pair in acc.pairs.values() for t in pair}
        assert {k for k, _ in feeds} == {len(tensors)} and len(tensors) <= 2 * len(acc.pairs)  # only the pairs
        assert acc.runs == n and set(acc.signal) == set(acc.noise) == set(acc.pairs)
        state = [v for d in (acc.signal, acc.noise) for v in d.values()]
        assert all(type(v) is float for v in state)  # two floats per activation, no tensor kept
        assert not any(isinstance(v, (np.ndarray, list)) for v in vars(acc).values())
