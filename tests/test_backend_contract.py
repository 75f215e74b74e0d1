"""The backend contract (runtime/backends/base.py): every backend pads below MIN, splits above MAX, trims the
padding and checks its inputs, so an engine profile such as [8, 32] serves any batch. Checked on CPU through a
stand-in runner that enforces the profile around the real ONNX Runtime engine calls."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY, make_image
from ipiqa.bundle import read_bundle
from ipiqa.errors import IPIQAError
from ipiqa.export.checks import BOUNDS
from ipiqa.runtime.backends import Backend, batch_spans
from ipiqa.runtime.backends.base import CPU_ENGINE_BATCH, GPU_ENGINE_BATCH, engine_batch_for
from ipiqa.runtime.backends.ort import OrtBackend
from ipiqa.runtime.scorer import Scorer, scorer_precision


class ProfileRunner(Backend):
    """ONNX Runtime's engine calls behind an engine profile [lo, hi] that refuses any other batch, as TensorRT
    does; every engine call's batch is recorded."""

    def __init__(self, manifest, lo: int = 8, hi: int = 32):
        self.inner = OrtBackend(manifest, "cpu")
        self.cfg, self.min_batch, self.max_batch, self.name = manifest.config, lo, hi, f"profile[{lo},{hi}]"
        self.calls: list[tuple[str, int]] = []

    def _enforce(self, call: str, n: int) -> None:
        if not self.min_batch <= n <= self.max_batch:
            raise IPIQAError(f"batch {n} is outside the engines' profile [{self.min_batch}, {self.max_batch}]")
        self.calls.append((call, n))

    def _encode_image(self, images):
        self._enforce("image", len(images))
        return self.inner._encode_image(images)

    def _encode_text(self, tokens):
        self._enforce("text", len(tokens))
        return self.inner._encode_text(tokens)

    def _fuse(self, image_side, text):
        self._enforce("fusion", len(image_side["image_embedding"]))
        return self.inner._fuse(image_side, text)

    def _image_embedding(self, image_side):
        return self.inner._image_embedding(image_side)


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return read_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def plain(manifest):
    with OrtBackend(manifest, "cpu") as b:
        yield b


def _inputs(cfg, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    text = rng.standard_normal((n, cfg.embed_dim)).astype(np.float32)
    return images, text


def _fp32_bound(ref: np.ndarray) -> float:
    """The spec's FP32 rule for scores (batch size may change a GEMM's blocking, never more than this)."""
    return BOUNDS["fp32"].rtol * max(1.0, float(np.ptp(ref)))


# ---------------------------------------------------------------- the split/pad rule, pure


@pytest.mark.parametrize("n,lo,hi,spans", [
    (1, 8, 32, [(0, 1, 8)]),
    (8, 8, 32, [(0, 8, 8)]),
    (70, 8, 32, [(0, 32, 32), (32, 64, 32), (64, 70, 8)]),
    (33, 1, 32, [(0, 32, 32), (32, 33, 1)]),
    (5, 1, None, [(0, 5, 5)]),
    (0, 8, 32, []),
])
def test_rows_become_engine_calls_within_the_profile(n, lo, hi, spans):
    assert batch_spans(n, lo, hi) == spans


@pytest.mark.parametrize("lo,hi", [(0, 8), (9, 8)])
def test_an_invalid_batch_range_is_refused(lo, hi):
    with pytest.raises(IPIQAError, match="invalid batch range"):
        batch_spans(4, lo, hi)


# ---------------------------------------------------------------- padding and splitting through a profile


@pytest.mark.parametrize("n", [1, 7, 8, 33, 70])
def test_any_batch_is_scored_through_a_profile_of_8_to_32(manifest, plain, n):
    runner = ProfileRunner(manifest)
    images, text = _inputs(manifest.config, n, seed=n)
    ref = plain.score(images, text)
    out = runner.score(images, text)
    assert out.shape == (n, manifest.config.num_outputs)
    assert np.abs(out - ref).max() <= _fp32_bound(ref)
    assert all(8 <= size <= 32 for _, size in runner.calls)


def test_padding_repeats_a_real_row_and_is_trimmed(manifest, plain):
    runner = ProfileRunner(manifest)
    images, text = _inputs(manifest.config, 3)
    out = runner.score(images, text)
    assert runner.calls == [("image", 8), ("fusion", 8)] and len(out) == 3
    ref = plain.score(images, text)
    assert np.abs(out - ref).max() <= _fp32_bound(ref)


def test_one_uncached_prompt_is_encoded_through_the_profile(manifest, plain):
    runner = ProfileRunner(manifest)
    from ipiqa.model import tokenize

    tokens = tokenize(["a red fox"], manifest.config.context_length).numpy()
    emb = runner.encode_text(tokens)
    assert emb.shape == (1, manifest.config.embed_dim) and runner.calls == [("text", 8)]
    ref = plain.encode_text(tokens)
    assert np.abs(emb - ref).max() <= BOUNDS["fp32"].rtol * max(1.0, float(np.abs(ref).max()))


def test_the_stand_in_refuses_what_the_contract_never_sends(manifest):
    """The runner enforces its profile: without the base class's padding a single image is refused."""
    runner = ProfileRunner(manifest)
    images, _ = _inputs(manifest.config, 1)
    with pytest.raises(IPIQAError, match="outside the engines' profile"):
        runner._encode_image(images)


def test_a_scorer_on_a_profile_of_8_to_32_scores_a_short_last_batch(tiny_bundle, manifest, tmp_path):
    files = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    with Scorer(tiny_bundle, backend="onnxruntime", device="cpu") as scorer:
        ref = scorer.score(files, ["a cat", "a dog", "a cat"])
        scorer.backend = ProfileRunner(manifest)
        scorer.cache = type(scorer.cache)(16)  # every prompt uncached again: encoded through the profile
        records = scorer.score(files, ["a cat", "a dog", "a cat"], batch_size=2)
    assert [r["error"] for r in records] == [None] * 3
    bound = _fp32_bound(np.array([r["quality"] for r in ref]))
    assert max(abs(a["quality"] - b["quality"]) for a, b in zip(records, ref)) <= bound


# ---------------------------------------------------------------- input checks


def test_float_pixels_are_refused_naming_the_dtype(plain, manifest):
    images, text = _inputs(manifest.config, 2)
    with pytest.raises(IPIQAError, match="image must be uint8 .* got float32"):
        plain.score(images.astype(np.float32), text)


def test_pixels_of_another_resolution_are_refused(plain, manifest):
    _, text = _inputs(manifest.config, 2)
    with pytest.raises(IPIQAError, match=f"image must be uint8 \\(B, {TINY['resolution']}, "):
        plain.score(np.zeros((2, 32, 32, 3), np.uint8), text)


def test_text_embeddings_for_another_number_of_images_are_refused(plain, manifest):
    images, text = _inputs(manifest.config, 3)
    with pytest.raises(IPIQAError, match="text_embedding has 2 rows for 3 images"):
        plain.score(images, text[:2])


def test_a_text_model_without_text_embeddings_is_refused(plain, manifest):
    images, _ = _inputs(manifest.config, 1)
    with pytest.raises(IPIQAError, match="pass its text embeddings"):
        plain.score(images)


def test_an_engine_returning_the_wrong_shape_is_an_error(manifest):
    class Short(ProfileRunner):
        def _fuse(self, image_side, text):
            return super()._fuse(image_side, text)[:-1]

    images, text = _inputs(manifest.config, 8)
    with pytest.raises(IPIQAError, match="returned scores of shape"):
        Short(manifest).score(images, text)


def test_image_embeddings_come_through_the_same_calls(manifest, plain):
    runner = ProfileRunner(manifest)
    images, _ = _inputs(manifest.config, 3)
    emb = runner.embed_images(images)
    ref = plain.image_outputs(images)["image_embedding"]
    assert emb.shape == ref.shape and runner.calls == [("image", 8)]
    assert np.abs(emb - ref).max() <= BOUNDS["fp32"].rtol * max(1.0, float(np.abs(ref).max()))


# ---------------------------------------------------------------- one precision option for model files


def test_fp16_flag_is_precision_fp16():
    assert scorer_precision("auto", True) == "fp16" and scorer_precision("fp16", True) == "fp16"
    assert scorer_precision("fp32", False) == "fp32"


def test_fp16_flag_with_another_precision_is_refused(tiny_model_file):
    with pytest.raises(IPIQAError, match="--fp16 means --precision fp16; it contradicts --precision fp32"):
        Scorer(tiny_model_file, fp16=True, precision="fp32")


# ---------------------------------------------------------------- Triton honours the engines' MIN


def _with_engines(manifest, batch=(8, 16, 32), precision="fp32"):
    from ipiqa.manifest import Engines

    return manifest.replace(precision=precision, engines=Engines("10", "gpu", "9.0", precision, batch, 1.0, "key", {}))


def test_a_triton_tensorrt_repository_refuses_engines_that_cannot_take_a_batch_of_1(manifest, tmp_path):
    from ipiqa.export.triton import write_triton_repository

    with pytest.raises(IPIQAError, match="starts at 8.*rebuild the engines with --batch 1,16,32"):
        write_triton_repository(_with_engines(manifest), tmp_path / "repo", "tensorrt")
    assert not (tmp_path / "repo").exists()


# ---------------------------------------------------------------- the engine gate pads like the runtime


def test_the_engine_gate_runs_a_batch_below_the_profile_through_the_padding(tiny_model_file, manifest):
    from ipiqa.checkpoint import load_model
    from ipiqa.export.gate import engine_parity

    engines = _with_engines(manifest, batch=(4, 8, 8))
    runner = ProfileRunner(engines, lo=4, hi=8)
    results = engine_parity(load_model(tiny_model_file), engines, n=10, batch=8, backend=runner, device="cpu")
    assert all(results), [r.line() for r in results]
    assert ("image", 4) in runner.calls  # the gate's single-row chunk, padded to the profile's MIN


# ---------------------------------------------------------------- INT8 engines: held-out images, INT8 bounds


def _held_out(cfg, n: int = 6):
    from ipiqa.model import tokenize

    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (n, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    return images, tokenize([f"held-out prompt {i}" for i in range(n)], cfg.context_length).numpy()


class Flipped(ProfileRunner):
    """An image engine whose embedding points the other way: what a broken INT8 engine may do."""

    def _encode_image(self, images):
        side = dict(super()._encode_image(images))
        side["image_embedding"] = -side["image_embedding"]
        return side


@pytest.mark.parametrize("runner,passes", [(ProfileRunner, True), (Flipped, False)], ids=["same", "flipped"])
def test_int8_engines_are_judged_by_the_int8_bounds_on_held_out_images(tiny_model_file, manifest, runner, passes):
    from ipiqa.checkpoint import load_model
    from ipiqa.export.gate import engine_parity

    engines = _with_engines(manifest, batch=(4, 8, 8), precision="int8")
    results = engine_parity(load_model(tiny_model_file), engines, backend=runner(engines, lo=4, hi=8), device="cpu",
                            held_out=_held_out(manifest.config), columns=manifest.config.outputs)
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["engines[int8]/text_embedding", "engines[int8]/image_embedding",
                             *(f"engines[int8]/scores/{c}" for c in manifest.config.outputs)]
    embedding = by_name["engines[int8]/image_embedding"]
    assert embedding.bound == BOUNDS["int8"].cosine_min and embedding.passed is passes
    assert by_name["engines[int8]/text_embedding"].passed  # the text engine is untouched (FP16 bounds)


def test_the_int8_engine_gate_needs_held_out_images(tiny_model_file, manifest):
    from ipiqa.checkpoint import load_model
    from ipiqa.export.gate import engine_parity

    engines = _with_engines(manifest, batch=(1, 8, 8), precision="int8")
    with pytest.raises(IPIQAError, match="held-out calibration images"):
        engine_parity(load_model(tiny_model_file), engines, backend=ProfileRunner(engines, 1, 8), device="cpu")


def test_stored_gate_records_read_back_as_the_checks_that_wrote_them(tiny_model_file, manifest):
    from ipiqa.checkpoint import load_model
    from ipiqa.export.checks import check_from_dict
    from ipiqa.export.gate import engine_parity

    engines = _with_engines(manifest, batch=(4, 8, 8), precision="int8")
    results = engine_parity(load_model(tiny_model_file), engines, backend=ProfileRunner(engines, 4, 8), device="cpu",
                            held_out=_held_out(manifest.config), columns=manifest.config.outputs)
    again = [check_from_dict(r.to_dict()) for r in results]
    assert again == results and [r.passed for r in again] == [r.passed for r in results]


def test_a_graph_set_without_a_manifest_takes_the_config_its_graphs_embed(manifest):
    graphs = {name: manifest.graph_path(name) for name in manifest.onnx.graphs}
    with OrtBackend.from_graphs(graphs) as backend:
        assert backend.cfg == manifest.config and backend.name == "onnxruntime-cpu"


def test_graphs_exported_for_different_configs_are_refused_as_one_set(manifest):
    from dataclasses import replace

    from ipiqa.bundle import METADATA_CONFIG_KEY, embedded_config

    cfg = manifest.config
    one, other = cfg.to_json(), replace(cfg, resolution=2 * cfg.resolution).to_json()
    with pytest.raises(IPIQAError, match="different configs"):
        embedded_config({"image_encoder": {METADATA_CONFIG_KEY: one}, "fusion": {METADATA_CONFIG_KEY: other}})
    with pytest.raises(IPIQAError, match=r"\['fusion'\] carry no ipiqa config"):
        embedded_config({"image_encoder": {METADATA_CONFIG_KEY: one}, "fusion": {}})


# ---------------------------------------------------------------- one engine batch (issue 28: reproducible scores)


@pytest.mark.parametrize("n,size,spans", [
    (3, 1, [(0, 1, 1), (1, 2, 1), (2, 3, 1)]),
    (5, 4, [(0, 4, 4), (4, 5, 4)]),  # the last, short chunk padded up to the engine batch too
    (0, 4, []),
])
def test_with_an_engine_batch_every_call_has_that_size(n, size, spans):
    assert batch_spans(n, 1, None, size) == spans


def test_an_engine_batch_outside_the_batch_range_is_refused():
    with pytest.raises(IPIQAError, match=r"engine batch 4 is outside the batch range \[8, 32\]"):
        batch_spans(4, 8, 32, 4)


@pytest.mark.parametrize("gpu,reproducible,lo,hi,size", [
    (False, False, 1, None, CPU_ENGINE_BATCH),  # CPU: fixed by default
    (False, False, 8, 32, 8),  # moved into the engines' range
    (True, False, 1, 128, None),  # GPU: free unless asked
    (True, True, 1, 128, GPU_ENGINE_BATCH),
    (True, True, 1, 8, 8),  # a TensorRT profile's MAX
    (True, True, 32, 64, 32),  # and its MIN
])
def test_the_engine_batch_is_fixed_on_the_cpu_and_opt_in_on_a_gpu(gpu, reproducible, lo, hi, size):
    assert engine_batch_for(gpu, reproducible, lo, hi) == size


def test_a_cpu_backend_runs_every_image_text_and_fusion_call_at_its_engine_batch(manifest):
    runner = ProfileRunner(manifest, lo=1, hi=32)
    images, text = _inputs(manifest.config, 5)
    runner.score(images, text)
    from ipiqa.model import tokenize

    runner.encode_text(tokenize(["a", "b", "c"], manifest.config.context_length).numpy())
    assert runner.engine_batch == CPU_ENGINE_BATCH
    assert {size for _, size in runner.calls} == {CPU_ENGINE_BATCH} and len(runner.calls) == 2 * 5 + 3


def test_a_gpu_backend_made_reproducible_runs_every_call_at_one_size(manifest):
    runner = ProfileRunner(manifest, lo=1, hi=32)
    runner.gpu = True
    images, text = _inputs(manifest.config, 20)
    runner.score(images[:5], text[:5])
    assert runner.engine_batch is None and runner.calls == [("image", 5), ("fusion", 5)]
    runner.calls.clear()
    runner.make_reproducible()
    out = runner.score(images, text)
    assert runner.engine_batch == GPU_ENGINE_BATCH and len(out) == 20
    assert runner.calls == [("image", 16), ("fusion", 16)] * 2  # 16 and 4 padded up to 16


def test_a_fixed_engine_batch_outside_the_profile_is_refused(manifest):
    with pytest.raises(IPIQAError, match=r"profile\[8,32\]: engine batch 4 is outside the engines' batch range "
                                         r"\[8, 32\]"):
        ProfileRunner(manifest).fix_engine_batch(4)


def test_scorer_reproducible_keeps_the_cpu_engine_batch(tiny_bundle):
    with Scorer(tiny_bundle, backend="onnxruntime", device="cpu", reproducible=True) as scorer:
        assert scorer.backend.engine_batch == CPU_ENGINE_BATCH == scorer.provenance.engine_batch


# ---------------------------------------------------------------- a closed backend


@pytest.mark.parametrize("call", ["score", "embed_images", "encode_text", "image_outputs", "fusion_outputs"])
def test_a_closed_backend_refuses_its_next_call_with_one_line(manifest, call):
    from ipiqa.model import tokenize

    backend = OrtBackend(manifest, "cpu")
    backend.close()
    backend.close()  # twice is safe
    images, text = _inputs(manifest.config, 2)
    args = {"score": (images, text), "embed_images": (images,), "image_outputs": (images,),
            "encode_text": (tokenize(["a"], manifest.config.context_length).numpy(),), "fusion_outputs": ({}, text)}
    with pytest.raises(IPIQAError, match=r"^onnxruntime-cpu: closed; open a new backend"):
        getattr(backend, call)(*args[call])
