"""The exact single-query rewrite of both pools equals the straightforward attention it replaces."""
from __future__ import annotations

import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d

from authors_layout import reference_forward
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


def test_visual_pool_rewrite_equals_open_clip_attention_pool(feature_map):
    pool = _randomize(AttentionPool2d(16, 2048, 32, 1024), 1)
    with torch.no_grad():
        assert (pool(feature_map) - visual_pool(pool, feature_map)).abs().max().item() <= 1e-5


def test_cross_pool_rewrite_equals_straightforward_attention(feature_map):
    pool = _randomize(CrossModalAttentionPool(16, 2048, 1024, 32, 1024), 2)
    text = torch.randn(4, 1024)
    with torch.no_grad():
        assert (pool(feature_map, text, single_query=False) - pool(feature_map, text)).abs().max().item() <= 1e-5


def test_key_bias_cancels_exactly(feature_map):
    """The rewrite never reads b_k: changing it must not change the straightforward result either."""
    pool = _randomize(CrossModalAttentionPool(16, 2048, 1024, 32, 1024), 3)
    text = torch.randn(4, 1024)
    with torch.no_grad():
        before = pool(feature_map, text, single_query=False)
        pool.cross_attn.k_proj.bias.add_(5.0)
        assert (pool(feature_map, text, single_query=False) - before).abs().max().item() <= 1e-5


def test_half_precision_inputs_keep_fp32_scores(feature_map):
    tokens = torch.randn(2, 257, 256)
    q, wk, wv, bv = torch.randn(2, 256), torch.randn(256, 256) * 0.05, torch.randn(256, 256) * 0.05, torch.randn(256)
    full = single_query_attention(q, tokens, wk, wv, bv, heads=4)
    half = single_query_attention(q.half(), tokens.half(), wk.half(), wv.half(), bv.half(), heads=4)
    assert half.dtype == torch.float16 and (half.float() - full).abs().max().item() <= 2e-2


def test_whole_model_on_imported_authors_checkpoint_is_unchanged(authors_512):
    _, _, ft, clip = authors_512
    cfg, sd = convert_official(ft, clip)
    model = IPIQA(cfg)
    model.load_state_dict(sd)
    model.eval()
    images = torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(4))
    tokens = tokenize(["a red fox", "an oil painting of a ship in a storm"])
    with torch.no_grad():
        fast = model(images, tokens)
        with straightforward_pooling(model):
            exact = model(images, tokens)
        spec = reference_forward(ft, clip, images, tokens)
    assert model.single_query_pooling  # restored after the block
    assert (fast - exact).abs().max().item() <= 1e-5
    assert (fast - spec).abs().max().item() <= 1e-4 and (exact - spec).abs().max().item() <= 1e-4
