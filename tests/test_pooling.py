"""The exact single-query rewrite of both pools equals the straightforward attention it replaces."""
from __future__ import annotations

import copy

import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d

from authors_layout import reference_forward
from ipiqa.export.checks import bounds_for
from ipiqa.export.parity import FLOOR_MULTIPLE, compare
from ipiqa.model import IPIQA, straightforward_pooling, tokenize
from ipiqa.official import convert_official
from ipiqa.pooling import CrossModalAttentionPool, single_query_attention, visual_pool


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.03)
    return module.eval()


@pytest.fixture(scope="module")
def feature_map():
    return torch.randn(4, 2048, 16, 16, generator=torch.Generator().manual_seed(0))


def _assert_same_function(a: torch.Tensor, b: torch.Tensor, a64: torch.Tensor, b64: torch.Tensor) -> None:
    """Two FP32 computations of one function (equal in exact arithmetic), each also run in float64.

    Each FP32 result is off the exact one by its own error, measured here as its floor ``max |x - x64|`` on this
    machine's kernels; so a correct rewrite differs from the original by at most the sum of the two floors plus
    its float64 difference (~1e-15). k x the larger floor (the gate's FLOOR_MULTIPLE) holds on any CPU, while a
    rewrite that is not exact misses by its float64 difference, far above FP32's error."""
    floor = max((a.double() - a64).abs().max().item(), (b.double() - b64).abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= FLOOR_MULTIPLE * floor, f"max |d| {err:.3e} > {FLOOR_MULTIPLE:g} x floor {floor:.3e}"


def test_visual_pool_rewrite_equals_open_clip_attention_pool(feature_map):
    pool = _randomize(AttentionPool2d(16, 2048, 32, 1024), 1)
    pool64, feature_map64 = copy.deepcopy(pool).double(), feature_map.double()
    with torch.no_grad():
        _assert_same_function(pool(feature_map), visual_pool(pool, feature_map),
                              pool64(feature_map64), visual_pool(pool64, feature_map64))


def test_cross_pool_rewrite_equals_straightforward_attention(feature_map):
    pool = _randomize(CrossModalAttentionPool(16, 2048, 1024, 32, 1024), 2)
    text = torch.randn(4, 1024)
    pool64, feature_map64, text64 = copy.deepcopy(pool).double(), feature_map.double(), text.double()
    with torch.no_grad():
        _assert_same_function(pool(feature_map, text, single_query=False), pool(feature_map, text),
                              pool64(feature_map64, text64, single_query=False), pool64(feature_map64, text64))


def test_key_bias_cancels_exactly(feature_map):
    """The rewrite never reads b_k: changing it must not change the straightforward result either."""
    pool = _randomize(CrossModalAttentionPool(16, 2048, 1024, 32, 1024), 3)
    text = torch.randn(4, 1024)
    pool64, feature_map64, text64 = copy.deepcopy(pool).double(), feature_map.double(), text.double()
    with torch.no_grad():
        before = pool(feature_map, text, single_query=False)
        before64 = pool64(feature_map64, text64, single_query=False)
        pool.cross_attn.k_proj.bias.add_(5.0)
        pool64.cross_attn.k_proj.bias.add_(5.0)
        _assert_same_function(pool(feature_map, text, single_query=False), before,
                              pool64(feature_map64, text64, single_query=False), before64)


def test_half_precision_inputs_keep_fp32_scores(feature_map):
    tokens = torch.randn(2, 257, 256)
    q, wk, wv, bv = torch.randn(2, 256), torch.randn(256, 256) * 0.05, torch.randn(256, 256) * 0.05, torch.randn(256)
    full = single_query_attention(q, tokens, wk, wv, bv, heads=4)
    half = single_query_attention(q.half(), tokens.half(), wk.half(), wv.half(), bv.half(), heads=4)
    assert half.dtype == torch.float16 and (half.float() - full).abs().max().item() <= bounds_for("fp16").atol


def _float64(state: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def test_whole_model_on_imported_authors_checkpoint_is_unchanged(authors_512):
    _, _, ft, clip = authors_512
    cfg, sd = convert_official(ft, clip)
    model = IPIQA(cfg)
    model.load_state_dict(sd)
    model.eval()
    images = torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(4))
    tokens = tokenize(["a red fox", "an oil painting of a ship in a storm"])
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        fast = model(images, tokens)
        fast64 = model64(images.double(), tokens)
        with straightforward_pooling(model), straightforward_pooling(model64):
            exact = model(images, tokens)
            exact64 = model64(images.double(), tokens)
        spec = reference_forward(ft, clip, images, tokens)
        spec64 = reference_forward(_float64(ft), _float64(clip), images.double(), tokens)
    assert model.single_query_pooling  # restored after the block
    _assert_same_function(fast, exact, fast64, exact64)
    for ours in (fast, exact):  # against the authors' forward: the gate's FP32 rule, the spec's own floor measured
        result = compare("scores", spec.numpy(), ours.numpy(), scores=True, ref64=spec64.numpy())
        assert result, result.line()
