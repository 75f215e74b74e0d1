"""The parity gate's tolerance: raised to what FP32 can promise for this model, never far enough to pass a wrong graph.

Rule (export/parity.py): tolerance = max(fixed, k x floor), the floor being the PyTorch reference's own FP32
error (the same model in float64 on the gate inputs); ``--atol/--rtol`` replace it and are recorded.
"""
from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, ContextManager, Iterator

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ipiqa.export.bundle_export as be
from conftest import TINY
from ipiqa.checkpoint import save_model
from ipiqa.config import IPIQAConfig
from ipiqa.demo import demo_model
from ipiqa.export.bundle_export import ExportOptions, ParityGateError, export_bundle
from ipiqa.export.cli import main as export_cli
from ipiqa.export.gate import gate_inputs
from ipiqa.export.checks import ParityResult, ToleranceOverride
from ipiqa.export.parity import FLOOR_MULTIPLE, FP32_TOL, check_tolerance, compare
from ipiqa.model import IPIQA, straightforward_pooling
from ipiqa.runtime.backends import Backend

ONNX_ONLY = ExportOptions(onnx_only=True)
FEATURE_OFFSET = 1e4  # common offset of the head's input features; the head cancels it (see _steep)


def _steep(model: IPIQA) -> IPIQA:
    """Make the head steep without changing what it computes in exact arithmetic.

    Both pooled features get a common offset the head's first layer subtracts again through its bias: the
    head now resolves score differences from input terms ~1e4 times larger, so FP32 keeps ~4 fewer digits of
    the scores than before (the authors' steep heads lose them the same way), while float64 still has plenty.
    """
    cfg = model.cfg
    offset = torch.full((cfg.head_in_dim,), FEATURE_OFFSET, dtype=torch.float64)
    first = model.head.dense if cfg.head == "mlp" else model.head
    with torch.no_grad():
        model.visual.attnpool.c_proj.bias.add_(FEATURE_OFFSET)
        model.txt_attnpool.cross_attn.out_proj.bias.add_(FEATURE_OFFSET)
        first.bias.sub_((first.weight.double() @ offset).float())
    return model


@pytest.fixture(scope="module")
def steep_model() -> IPIQA:
    return _steep(demo_model(IPIQAConfig(**TINY)))


@pytest.fixture(scope="module")
def steep_export(steep_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("steep")
    src = save_model(root / "steep.safetensors", steep_model.state_dict(), steep_model.cfg)
    return export_bundle(steep_model, [src], root / "bundle", ONNX_ONLY, progress=lambda m: None)


def _record(report, name: str) -> ParityResult:
    (found,) = [r for r in report.parity if r.name == name]
    return found


# ---------------------------------------------------------------- the rule


def test_rule_is_the_fixed_tolerance_while_the_floor_is_small():
    assert check_tolerance(scale=3.0, floor=1e-9) == (FP32_TOL * 3.0, FP32_TOL * 3.0)


def test_rule_rises_to_k_times_a_floor_above_the_fixed_part():
    tolerance, fixed = check_tolerance(scale=3.0, floor=1e-3)
    assert fixed == FP32_TOL * 3.0 and tolerance == FLOOR_MULTIPLE * 1e-3 > fixed


def test_non_finite_floor_never_loosens_the_rule():
    assert check_tolerance(scale=1.0, floor=float("inf")) == (FP32_TOL, FP32_TOL)


def test_override_replaces_the_rule_even_when_stricter():
    tolerance, fixed = check_tolerance(scale=2.0, floor=1e-3, override=ToleranceOverride(atol=0.0, rtol=1e-6))
    assert tolerance == 2e-6 < fixed


@pytest.mark.parametrize("bad", [dict(atol=-1.0), dict(rtol=float("nan"))])
def test_override_refuses_negative_or_non_finite_values(bad):
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        ToleranceOverride(**bad)


def test_record_from_an_older_manifest_reads_without_floor():
    old = {"name": "end_to_end/scores", "max_abs": 2e-6, "mean_abs": 1e-6, "max_rel": 1e-5, "tolerance": 1e-4,
           "spearman": None, "passed": False}  # ``passed`` is recomputed, never trusted
    result = ParityResult.from_dict(old)
    assert result.floor is None and result.override is None and result.passed


def test_raised_tolerance_still_refuses_an_output_just_past_k_times_the_floor(steep_model):
    """Floor from float64 on the steep model; outputs nudged just inside and just outside k x floor."""
    x = gate_inputs(steep_model.cfg, 4)
    model64 = copy.deepcopy(steep_model).double()
    with torch.no_grad(), straightforward_pooling(steep_model), straightforward_pooling(model64):
        ref = steep_model(x.model_images, x.model_tokens).numpy()
        ref64 = model64(x.model_images.double(), x.model_tokens).numpy()
    exact = compare("end_to_end/scores", ref, ref, scores=True, ref64=ref64)
    assert exact.floor > exact.fixed_tolerance and exact.tolerance == FLOOR_MULTIPLE * exact.floor
    nudge = np.zeros_like(ref)
    nudge[0, 0] = exact.tolerance
    assert compare("end_to_end/scores", ref, ref + 0.99 * nudge, scores=True, ref64=ref64)
    assert not compare("end_to_end/scores", ref, ref + 1.01 * nudge, scores=True, ref64=ref64)


# ---------------------------------------------------------------- the steep head exports, with its floor reported


def test_steep_head_model_exports_with_its_floor_above_the_fixed_tolerance(steep_export):
    """The fixed rule alone would refuse this model: shown on the floor and on a constructed deviation, never on
    the measured export's difference (ONNX Runtime and PyTorch may agree to 1e-8 on one CPU, to 1e-3 on another)."""
    e2e = _record(steep_export, "end_to_end/scores")
    assert all(steep_export.parity)
    # The FP32 reference itself, against float64, misses the fixed rule: the feature offset (FEATURE_OFFSET) puts
    # the head's inputs where one FP32 ulp is ~1e-3, on any CPU; so no FP32 export can be promised the fixed part.
    assert e2e.floor > e2e.fixed_tolerance
    assert e2e.tolerance == FLOOR_MULTIPLE * e2e.floor
    # A deviation between the fixed part and k x floor: the rule passes it, the fixed part alone refuses it.
    between = replace(e2e, max_abs=(e2e.fixed_tolerance + e2e.tolerance) / 2)
    assert between and not replace(between, tolerance=between.fixed_tolerance)


def test_each_check_prints_and_stores_its_floor_and_tolerance(steep_export):
    data = json.loads((steep_export.bundle / "manifest.json").read_text())
    stored = {r["name"]: r for r in data["parity"]["onnx"]}
    for result in steep_export.parity:
        assert f"floor {result.floor:.2e}" in result.line() and f"tol {result.tolerance:.1e}" in result.line()
        record = stored[result.name]
        assert (record["floor"], record["tolerance"], record["floor_multiple"]) == (
            result.floor, result.tolerance, FLOOR_MULTIPLE)
        assert record["fixed_tolerance"] <= record["tolerance"] and record["override"] is None
    assert data["parity"]["rule"]["floor_multiple"] == FLOOR_MULTIPLE and data["parity"]["rule"]["override"] is None


# ---------------------------------------------------------------- a wrong graph still fails


@contextmanager
def _text_activation(model: IPIQA, act: Callable[[], nn.Module] = nn.GELU) -> Iterator[None]:
    """The text tower with another activation inside the block (QuickGELU is the model's)."""
    blocks = model.text.transformer.resblocks
    saved = [b.mlp.gelu for b in blocks]
    for b in blocks:
        b.mlp.gelu = act()
    try:
        yield
    finally:
        for b, module in zip(blocks, saved):
            b.mlp.gelu = module


@contextmanager
def _rolled(table: torch.Tensor) -> Iterator[None]:
    """A position table one row off inside the block, restored after."""
    saved = table.detach().clone()
    with torch.no_grad():
        table.copy_(saved.roll(1, dims=0))
    try:
        yield
    finally:
        with torch.no_grad():
            table.copy_(saved)


def _text_positions_shifted(model: IPIQA):
    """The text position table one row off."""
    return _rolled(model.text.positional_embedding)


def _cross_positions_rolled(model: IPIQA):
    """The cross-modality pool's position table one row off: the scores of an untrained head barely move."""
    return _rolled(model.txt_attnpool.positional_embedding)


def _export_with(mutation: Callable[[IPIQA], ContextManager], model: IPIQA, tmp_path, monkeypatch) -> None:
    """Export ``model`` with ``mutation`` active only while the graphs are traced: the gate checks the true model."""
    real = be.export_onnx

    def export_mutated(*args, **kwargs):
        with mutation(model):
            return real(*args, **kwargs)

    monkeypatch.setattr(be, "export_onnx", export_mutated)
    src = save_model(tmp_path / "m.safetensors", model.state_dict(), model.cfg)
    export_bundle(model, [src], tmp_path / "b", ONNX_ONLY, progress=lambda m: None)


@pytest.mark.parametrize("mutation", [_text_activation, _text_positions_shifted], ids=["gelu", "positions"])
def test_steep_head_graph_with_a_wrong_text_tower_fails_the_gate(steep_model, mutation, tmp_path, monkeypatch):
    with pytest.raises(ParityGateError) as failed:
        _export_with(mutation, steep_model, tmp_path, monkeypatch)
    (text,) = [r for r in failed.value.results if r.name == "text_encoder/text_embedding"]
    assert not text and text.tolerance == text.fixed_tolerance  # the steep head raised the score checks only
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_graph_with_another_activation_fails_the_gate_on_a_plain_model(tmp_path, monkeypatch):
    with pytest.raises(ParityGateError, match="FAIL  text_encoder/text_embedding"):
        _export_with(_text_activation, demo_model(IPIQAConfig(**TINY)), tmp_path, monkeypatch)


def test_rolled_cross_pool_positions_fail_the_gate_on_the_pooled_output(tmp_path, monkeypatch):
    with pytest.raises(ParityGateError) as failed:
        _export_with(_cross_positions_rolled, demo_model(IPIQAConfig(**TINY)), tmp_path, monkeypatch)
    results = {r.name.split(" ")[0]: r for r in failed.value.results}
    assert not results["fusion/pooled"]  # the pool itself, which the scores hide
    assert results["image_encoder/image_embedding"] and results["text_encoder/text_embedding"]
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_the_runtime_reads_scores_only_while_the_gate_checks_the_pool(tiny_bundle):
    from ipiqa.bundle import read_bundle
    from ipiqa.runtime.backends.ort import OrtBackend

    backend = OrtBackend(read_bundle(tiny_bundle), "cpu")
    backend.fix_engine_batch(None)  # score at the gate's batch (2), not the CPU's engine batch: equal bits
    x = gate_inputs(read_bundle(tiny_bundle).config, 2)
    side = backend.image_outputs(x.image)
    text = backend.encode_text(x.tokens)
    fused = backend.fusion_outputs(side, text)
    assert set(fused) == {"scores", "pooled"} and fused["pooled"].shape == (2, read_bundle(tiny_bundle).config.embed_dim)
    np.testing.assert_array_equal(backend.score(x.image, text), fused["scores"])


# ---------------------------------------------------------------- the override


def test_cli_override_is_warned_printed_per_check_and_recorded(tiny_model_file, tmp_path, caplog):
    out = tmp_path / "b"
    with caplog.at_level(logging.WARNING, logger="ipiqa.export.bundle_export"):
        res = CliRunner().invoke(export_cli, [str(tiny_model_file), "-o", str(out), "--onnx-only", "--atol", "0.5"])
    assert res.exit_code == 0, res.output
    assert any(r.levelno == logging.WARNING and "--atol 0.5 --rtol 0" in r.getMessage() for r in caplog.records)
    assert "OVERRIDE --atol 0.5 --rtol 0" in res.output
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["rule"]["override"] == {"atol": 0.5, "rtol": 0.0}
    assert all(r["override"] == {"atol": 0.5, "rtol": 0.0} and r["tolerance"] == 0.5 for r in parity["onnx"])


def test_changing_the_override_reruns_the_gate(tiny_model_file, tmp_path):
    from ipiqa.checkpoint import load_model

    model, out = load_model(tiny_model_file), tmp_path / "b"
    export_bundle(model, [tiny_model_file], out, ONNX_ONLY, progress=lambda m: None)
    loose = ExportOptions(onnx_only=True, tolerance_override=ToleranceOverride(atol=0.5))
    again = export_bundle(model, [tiny_model_file], out, loose, progress=lambda m: None)
    assert not again.reused_onnx and all(r.override == ToleranceOverride(atol=0.5) for r in again.parity)
    assert np.isfinite([r.floor for r in again.parity]).all()  # measured and stored even when overridden


# ---------------------------------------------------------------- engines: the backend contract, checked on CPU


class _HandleBackend(Backend):
    """ONNX Runtime behind TrtBackend's contract (``_encode_image`` returns a handle only ``_fuse`` reads, and the
    engine calls refuse batches outside the profile), so the engine gate's own logic runs where no GPU is;
    ``shift`` makes its scores wrong on purpose."""

    def __init__(self, manifest, shift: float = 0.0):
        from ipiqa.runtime.backends.ort import OrtBackend

        self.inner, self.shift, self.image_side = OrtBackend(manifest, "cpu"), shift, {}
        self.cfg, self.name = manifest.config, "handle"
        self.min_batch, _, self.max_batch = manifest.engines.batch
        self.batches: list[int] = []

    def _in_profile(self, n: int) -> None:
        assert self.min_batch <= n <= self.max_batch, f"batch {n} outside the profile"
        self.batches.append(n)

    def _encode_text(self, tokens: np.ndarray) -> np.ndarray:
        self._in_profile(len(tokens))
        return self.inner._encode_text(tokens)

    def _encode_image(self, images: np.ndarray) -> int:
        self._in_profile(len(images))
        self.image_side = self.inner._encode_image(images)
        return len(images)

    def _fuse(self, handle: int, text_embedding) -> np.ndarray:
        assert handle == len(self.image_side["image_embedding"])
        return self.inner._fuse(self.image_side, text_embedding) + self.shift

    def _image_embedding(self, handle: int) -> np.ndarray:
        return self.inner._image_embedding(self.image_side)

    def close(self) -> None:
        self.inner.close()


def _as_engine_bundle(root, precision: str = "fp32"):
    from ipiqa.bundle import read_bundle
    from ipiqa.manifest import Engines

    engines = Engines("10", "gpu", "9.0", precision, (1, 4, 8), 1.0, "key", {})
    return read_bundle(root).replace(precision=precision, engines=engines)


@pytest.mark.parametrize("shift,passes", [(0.0, True), (0.01, False)], ids=["same", "scores-off-by-0.01"])
def test_engine_gate_checks_text_embedding_and_scores_through_the_backend(tiny_model_file, tiny_bundle, shift, passes):
    from ipiqa.checkpoint import load_model
    from ipiqa.export.gate import engine_parity

    manifest = _as_engine_bundle(tiny_bundle)
    results = engine_parity(load_model(tiny_model_file), manifest, n=10, backend=_HandleBackend(manifest, shift),
                            device="cpu")
    assert [r.name for r in results] == ["engines[fp32]/text_embedding", "engines[fp32]/scores"]
    assert all(r.floor is not None for r in results) and results[0].passed
    assert results[1].passed is passes


# ---------------------------------------------------------------- the gates' backend: built like the served one


def test_the_gates_backend_is_built_through_init_like_the_served_one(tiny_bundle, monkeypatch):
    """``from_graphs`` calls ``__init__`` (no object assembled around it), so whatever ``__init__`` sets up, the
    gates' backend has too; a manifest and a graph set together, or neither, is refused in one line."""
    from ipiqa.bundle import read_bundle
    from ipiqa.errors import IPIQAError
    from ipiqa.runtime.backends.ort import OrtBackend

    m = read_bundle(tiny_bundle)
    graphs = {name: m.graph_path(name) for name in m.onnx.graphs}
    built = []
    init = OrtBackend.__init__
    monkeypatch.setattr(OrtBackend, "__init__", lambda self, *a, **k: (built.append(k.get("graphs")), init(self, *a, **k))[1])
    with OrtBackend.from_graphs(graphs, "int8") as gate, OrtBackend(m) as served:
        assert built == [graphs, None] and gate.name == "onnxruntime-cpu-int8" and gate.cfg == served.cfg
    for args, kwargs in (((), {}), ((m,), {"graphs": graphs})):
        with pytest.raises(IPIQAError, match="takes a bundle's manifest or a graph set"):
            OrtBackend(*args, **kwargs)
