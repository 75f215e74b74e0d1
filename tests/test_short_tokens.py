"""Short text calls: the text graph's sequence axis is dynamic, and a call runs only up to its rows' last
end-of-text token (issue 30: the text graph at 1 image per prompt). The embedding must not change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ipiqa.bundle import read_bundle
from ipiqa.checkpoint import load_model
from ipiqa.model import tokenize
from ipiqa.runtime.backends.base import short_tokens
from ipiqa.runtime.backends.ort import OrtBackend

PROMPTS = ["a cat", "", "word " * 100, "a photo of a dog on the beach at dawn", "🎉🔥 emoji 😀", "中文提示词，高清"]


def _tokens(prompts=PROMPTS) -> np.ndarray:
    return tokenize(prompts, 77).numpy()


def _recording(backend):
    """The shapes of every text call the backend's engine sees."""
    seen, call = [], backend._encode_text
    backend._encode_text = lambda t: (seen.append(tuple(t.shape)), call(t))[1]
    return seen


def test_short_tokens_cuts_after_the_last_end_of_text_of_its_rows():
    tokens = _tokens(["a cat", "a photo of a dog"])
    cut = short_tokens(tokens)
    assert cut.shape == (2, int(tokens.argmax(1).max()) + 1)
    assert (cut.argmax(1) == tokens.argmax(1)).all()  # every row still ends at its end-of-text
    assert not tokens[:, cut.shape[1]:].any()  # only padding was cut


def test_short_tokens_keeps_two_columns_at_least():
    assert short_tokens(np.zeros((3, 77), np.int64)).shape == (3, 2)


def test_the_exported_text_graph_takes_any_length_up_to_the_context(tiny_bundle):
    onnx = pytest.importorskip("onnx")
    manifest = read_bundle(tiny_bundle)
    graph = onnx.load(str(manifest.graph_path("text_encoder")), load_external_data=False)
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]


def test_cpu_text_calls_run_at_each_prompts_own_length(tiny_bundle):
    tokens = _tokens()
    with OrtBackend(read_bundle(tiny_bundle)) as backend:
        assert backend.takes_short_tokens and backend.engine_batch == 1
        seen = _recording(backend)
        backend.encode_text(tokens)
    assert seen == [(1, int(t.argmax()) + 1) for t in tokens]


def test_a_cut_call_gives_the_full_context_embedding(tiny_bundle, tiny_model_file):
    """Against the PyTorch model at the full 77 tokens (the intermediate tensor, not only the scores), and
    against the same backend made to run the full context."""
    tokens = _tokens()
    with torch.no_grad():
        reference = load_model(tiny_model_file).encode_text(torch.from_numpy(tokens)).numpy()
    with OrtBackend(read_bundle(tiny_bundle)) as backend:
        cut = backend.encode_text(tokens)
        backend.takes_short_tokens = False
        full = backend.encode_text(tokens)
    np.testing.assert_allclose(cut, reference, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cut, full, atol=1e-6, rtol=0)


def test_a_fixed_engine_batch_above_one_runs_the_full_context(tiny_bundle):
    """A neighbour's length must never reach a row: at a fixed batch of 4 the call's length would follow it."""
    with OrtBackend(read_bundle(tiny_bundle)) as backend:
        backend.fix_engine_batch(4)
        seen = _recording(backend)
        backend.encode_text(_tokens())
    assert seen == [(4, 77), (4, 77)]


def test_a_free_engine_batch_cuts_at_the_calls_longest_prompt(tiny_bundle):
    tokens = _tokens(["a cat", "a photo of a dog on the beach at dawn"])
    with OrtBackend(read_bundle(tiny_bundle)) as backend:
        backend.fix_engine_batch(None)
        seen = _recording(backend)
        backend.encode_text(tokens)
    assert seen == [(2, int(tokens.argmax(1).max()) + 1)]


def test_a_graph_with_a_fixed_context_runs_it_whole(tiny_bundle, tmp_path):
    """A bundle exported before the dynamic sequence axis (graph format 1) keeps working, uncut."""
    onnx = pytest.importorskip("onnx")
    source = read_bundle(tiny_bundle).onnx.graphs
    graphs = {name: tiny_bundle / entry.file for name, entry in source.items()}
    model = onnx.load(str(graphs["text_encoder"]))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 77
    fixed = tmp_path / "text_encoder.onnx"
    onnx.save_model(model, str(fixed))
    with OrtBackend.from_graphs({**graphs, "text_encoder": fixed}) as backend:
        assert not backend.takes_short_tokens
        seen = _recording(backend)
        backend.encode_text(_tokens(["a cat"]))
    assert seen == [(1, 77)]
