"""Each branch of the model equals the spec forward (tests/authors_layout.py) on its own, in float64.

A random-weight model's final scores hide a wrong text tower (QuickGELU replaced by GELU passed the whole
suite), so the three branches the head reads are compared one by one: the text [QA] embedding, the visual
pool output and the cross pool output. In float64 the same arithmetic in another order agrees to about
1e-15 relative; a wrong activation, position table or end-of-text position misses by far more than
REL_TOL, which is why the tolerance can be this tight.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F

import authors_layout
from ipiqa.model import IPIQA, straightforward_pooling, tokenize
from ipiqa.official import convert_official

REL_TOL = 1e-10  # relative to the branch's max |spec|; float64 rounding is ~1e-15
PROMPTS = ["a photo of a cat wearing a hat", "", "statue of a man, oil painting " * 20]  # short, empty, truncated
CROSS = "txt_attnpool.cross_attn."


class _LinearTap:
    """``torch.nn.functional`` for the spec module, except that ``linear`` also records (input, weight, output).

    The spec forward returns only scores; its branch outputs are the inputs and outputs of known projections
    (found by weight identity), so they are read without changing the spec's code.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor = None) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        self.calls.append((x, weight, y))
        return y

    def one(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (found,) = [(x, y) for x, w, y in self.calls if w is weight]
        return found


def _float64(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def branches(authors_224_linear) -> dict[str, Any]:
    """The spec's branch outputs and the imported model, both float64, on the same images and prompts."""
    _, _, ft, clip = authors_224_linear
    ft64, clip64 = _float64(ft), _float64(clip)
    tokens = tokenize(PROMPTS)
    images = torch.randn(len(PROMPTS), 3, 224, 224, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    tap = _LinearTap()
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(authors_layout, "F", tap)
        authors_layout.reference_forward(ft64, clip64, images, tokens)
    text, _ = tap.one(ft64[CROSS + "q_proj.weight"])  # the cross pool's query is the [QA] embedding
    cfg, sd = convert_official(ft, clip)
    model = IPIQA(cfg)
    model.load_state_dict(sd)
    return {"model": model.double().eval(), "images": images, "tokens": tokens, "text": text[:, 0],
            "visual": tap.one(ft64["attnpool.c_proj.weight"])[1][:, 0],
            "cross": tap.one(ft64[CROSS + "out_proj.weight"])[1][:, 0]}


@contextmanager
def _output_of(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs ``module`` produces inside the block (a forward hook, removed after)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def _assert_same(ours: torch.Tensor, spec: torch.Tensor) -> None:
    assert ours.dtype == spec.dtype == torch.float64 and ours.shape == spec.shape
    err, scale = (ours - spec).abs().max().item(), spec.abs().max().item()
    assert err <= REL_TOL * scale, f"max |ours - spec| {err:.3e} > {REL_TOL:.0e} x max |spec| {scale:.3e}"


def test_text_qa_embedding_equals_spec(branches):
    with torch.no_grad():
        ours = branches["model"].encode_text(branches["tokens"])
    _assert_same(ours, branches["text"])


def test_visual_pool_output_equals_spec(branches):
    model = branches["model"]
    with torch.no_grad(), straightforward_pooling(model):
        _, ours = model.encode_image(branches["images"])
    _assert_same(ours, branches["visual"])


def test_cross_pool_output_equals_spec_given_the_spec_text_embedding(branches):
    """Fed the spec's [QA] embedding, so a text-tower fault shows in the text test, not here."""
    model = branches["model"]
    with torch.no_grad(), straightforward_pooling(model), _output_of(model.txt_attnpool) as seen:
        fmap, emb = model.encode_image(branches["images"])
        model.fuse(fmap, emb, branches["text"])
    (ours,) = seen
    _assert_same(ours, branches["cross"])
