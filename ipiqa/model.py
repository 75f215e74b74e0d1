"""The IP-IQA model, assembled from open_clip modules.

    image ─ ModifiedResNet trunk ─▶ feature map (B, C, R/32, R/32) ─┬─ AttentionPool2d ───────────▶ v (B, E)
    prompt ─ CLIP tokenizer ─ TextTransformer ─▶ [QA] embedding t ──┴─ CrossModalAttentionPool(t) ▶ p (B, E)
                                                                       head([v; p]) ─▶ scores (B, N)

``encode_image``, ``encode_text`` and ``fuse`` are the three exported graphs; prompt caching reuses
``encode_text`` results across the ~10 images a prompt usually has.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn

from .config import CLIP_MEAN, CLIP_STD, IPIQAConfig
from .heads import build_head
from .pooling import CrossModalAttentionPool, visual_pool

__all__ = ["IPIQA", "tokenize", "straightforward_pooling", "pooling_mode", "normalize_pixels"]

_TOKENIZER: Optional[SimpleTokenizer] = None


def tokenize(prompts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's CLIP BPE tokenizer: (B, context_length) int64, truncated with end-of-text kept last."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer(context_length=context_length)
    return _TOKENIZER(list(prompts), context_length=context_length)


@contextmanager
def pooling_mode(model: "IPIQA", single_query: bool) -> Iterator["IPIQA"]:
    """Run ``model`` with the single-query rewrite on or off inside the block; restore it after."""
    before, model.single_query_pooling = model.single_query_pooling, single_query
    try:
        yield model
    finally:
        model.single_query_pooling = before


def straightforward_pooling(model: "IPIQA"):
    """The straightforward pooling (the authors' computation) inside the block."""
    return pooling_mode(model, single_query=False)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, R, R, 3), as decoded and resized, -> CLIP-normalized float32 (B, 3, R, R).

    The reference's float32 order (torchvision ToTensor's x / 255, then Normalize's (x - mean) / std), so the
    result equals the host preprocessing bit for bit. The exported image graph starts with this, so only uint8
    crosses to the device (4x fewer bytes than float32), and the NCHW view it returns is channels-last in memory.
    """
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return (x - mean) / std


class IPIQA(nn.Module):
    def __init__(self, cfg: IPIQAConfig):
        super().__init__()
        self.cfg = cfg
        # image_size sets the attnpool table to (R/32)^2 + 1 rows: the interpolated table of the paper.
        self.visual = ModifiedResNet(
            layers=list(cfg.vision_layers),
            output_dim=cfg.embed_dim,
            heads=cfg.vision_heads,
            image_size=cfg.resolution,
            width=cfg.vision_width,
        )
        if cfg.text:
            # OpenAI RN50's text tower uses QuickGELU; argmax pooling reads the end-of-text position.
            self.text = TextTransformer(
                context_length=cfg.context_length,
                vocab_size=cfg.vocab_size,
                width=cfg.text_width,
                heads=cfg.text_heads,
                layers=cfg.text_layers,
                output_dim=cfg.embed_dim,
                act_layer=QuickGELU,
                pool_type="argmax",
            )
            self.txt_attnpool = CrossModalAttentionPool(
                cfg.grid, cfg.feature_dim, cfg.embed_dim, cfg.vision_heads, cfg.embed_dim
            )
        self.head = build_head(cfg)
        # Both pools have one query; True uses the exact single-query rewrite (pooling.single_query_attention),
        # False the straightforward attention over all tokens, which parity is checked against.
        self.single_query_pooling = True

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, R, R, 3), as decoded and resized -> ``encode_image`` of the normalized images."""
        return self.encode_image(normalize_pixels(pixels).to(self.visual.conv1.weight.dtype))

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized images (B, 3, R, R) -> (feature map (B, C, g, g), visual embedding (B, E))."""
        feature_map = self.trunk(images)
        if self.single_query_pooling:
            return feature_map, visual_pool(self.visual.attnpool, feature_map)
        return feature_map, self.visual.attnpool(feature_map)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> projected end-of-text ([QA]) embedding (B, E)."""
        if not self.cfg.text:
            raise ValueError("this model has no text branch (config text=False)")
        return self.text(tokens)

    def fuse(
        self,
        feature_map: torch.Tensor,
        image_embedding: torch.Tensor,
        text_embedding: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Image-side tensors (+ text embedding) -> scores (B, N), columns named by ``cfg.outputs``."""
        if self.cfg.text:
            if text_embedding is None:
                raise ValueError("this model needs a text embedding (config text=True)")
            pooled = self.txt_attnpool(feature_map, text_embedding, self.single_query_pooling)
            image_embedding = torch.cat([image_embedding, pooled.to(image_embedding.dtype)], dim=-1)
        return self.head(image_embedding)

    def forward(self, images: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        feature_map, image_embedding = self.encode_image(images)
        text_embedding = self.encode_text(tokens) if self.cfg.text else None
        return self.fuse(feature_map, image_embedding, text_embedding)
