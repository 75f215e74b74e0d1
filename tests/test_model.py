"""The model's behaviour: three parts compose to forward, the prompt matters, tokens truncate like CLIP."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY
from ipiqa.config import IPIQAConfig
from ipiqa.demo import demo_model
from ipiqa.export.parity import FLOOR_MULTIPLE
from ipiqa.model import tokenize


@pytest.fixture(scope="module")
def tiny():
    return demo_model(IPIQAConfig(**TINY), seed=5)


def test_parts_compose_to_forward(tiny):
    x, t = torch.randn(3, 3, 64, 64), tokenize(["a", "b c", "d e f"])
    with torch.no_grad():
        fmap, emb = tiny.encode_image(x)
        assert fmap.shape == (3, 256, 2, 2) and emb.shape == (3, 32)
        assert torch.equal(tiny.fuse(fmap, emb, tiny.encode_text(t)), tiny(x, t))


def test_feature_map_is_resolution_over_32_on_real_rn50():
    model = demo_model(IPIQAConfig(resolution=224, outputs=("quality",)))
    with torch.no_grad():
        fmap, emb = model.encode_image(torch.randn(1, 3, 224, 224))
    assert fmap.shape == (1, 2048, 7, 7) and emb.shape == (1, 1024)
    assert model.visual.attnpool.positional_embedding.shape == (50, 2048)
    assert model.txt_attnpool.positional_embedding.shape == (50, 2048)


def test_same_image_different_prompts_give_different_scores(tiny):
    """The prompts move the scores by more than two FP32 evaluations of one input can differ (2k x the floor,
    float32 against float64 on this machine): a difference the prompt makes, not rounding."""
    x = torch.randn(1, 3, 64, 64).repeat(2, 1, 1, 1)
    tokens = tokenize(["a sharp photo of a dog", "blurry abstract noise"])
    with torch.no_grad():
        s = tiny(x, tokens)
        floor = (s.double() - copy.deepcopy(tiny).double()(x.double(), tokens)).abs().max().item()
    assert (s[0] - s[1]).abs().max().item() > 2 * FLOOR_MULTIPLE * floor


def test_image_only_model_ignores_text_and_has_no_text_tower():
    model = demo_model(IPIQAConfig(**TINY, text=False))
    assert not hasattr(model, "text") and model.head.dense.in_features == 32
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)


def test_tokenizer_truncates_at_77_keeping_end_of_text_last():
    tokens = tokenize(["word " * 200, ""])
    assert tokens.shape == (2, 77)
    assert tokens[0, -1].item() == 49407 and tokens[0, 0].item() == 49406
    assert tokens[1, :3].tolist() == [49406, 49407, 0]


def test_end_of_text_position_is_read_for_long_and_short_prompts(tiny):
    """Truncated prompts differing only after token 76 embed identically; the [QA] row is the last one."""
    long_a, long_b = "x " * 100 + "cat", "x " * 100 + "dog"
    assert torch.equal(tokenize([long_a]), tokenize([long_b]))
    with torch.no_grad():  # one prompt per call: the same input, bit for bit (rows of one batch need not be)
        a, b = tiny.encode_text(tokenize([long_a])), tiny.encode_text(tokenize([long_b]))
        e = tiny.encode_text(tokenize(["cat", "dog"]))
    assert torch.equal(a, b) and not torch.allclose(e[0], e[1])  # cat and dog differ by O(1), not rounding


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    cfg = IPIQAConfig(resolution=224, outputs=("mos",), head="linear")
    assert IPIQAConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown IPIQAConfig keys.*'bogus'"):
        IPIQAConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("bad", [dict(resolution=500), dict(outputs=()), dict(outputs=("a", "b", "c")),
                                 dict(head="conv"), dict(outputs=("a", "a"))])
def test_config_refuses_invalid_shapes(bad):
    with pytest.raises(ValueError, match="invalid IPIQAConfig"):
        IPIQAConfig(**bad)
