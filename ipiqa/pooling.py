"""Cross-modality attention pooling: the [QA] text embedding attends over the image's feature tokens.

The visual pool is open_clip's ``AttentionPool2d`` unchanged; this module is the authors' own
``TextAttentionPool2d`` (state-dict names kept: ``positional_embedding``, ``cross_attn.{q,k,v,out}_proj``)
so their checkpoints load without renaming inside it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["feature_tokens", "CrossAttention", "CrossModalAttentionPool"]


def feature_tokens(feature_map: torch.Tensor, positional_embedding: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1 + HW, C): [mean token; spatial tokens] + positions, as AttentionPool2d builds them."""
    x = feature_map.flatten(2).transpose(1, 2)  # B, HW, C
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
    return x + positional_embedding.to(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention whose query comes from another modality (its own input width)."""

    def __init__(self, embed_dim: int, query_dim: int, kv_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(query_dim, embed_dim)
        self.k_proj = nn.Linear(kv_dim, embed_dim)
        self.v_proj = nn.Linear(kv_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """query (B, Lq, Dq), tokens (B, N, Dkv) -> (B, Lq, output_dim)."""
        b = query.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, x.shape[1], self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(tokens)), heads(self.v_proj(tokens))
        ctx = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.out_proj(ctx.transpose(1, 2).reshape(b, query.shape[1], -1))


class CrossModalAttentionPool(nn.Module):
    """One query (the text embedding) over the 1 + grid^2 image tokens -> (B, output_dim)."""

    def __init__(self, grid: int, feature_dim: int, text_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid**2 + 1, feature_dim) / feature_dim**0.5)
        self.cross_attn = CrossAttention(feature_dim, text_dim, feature_dim, num_heads, output_dim)

    def forward(self, feature_map: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        tokens = feature_tokens(feature_map, self.positional_embedding)
        return self.cross_attn(text_embedding.unsqueeze(1).to(tokens.dtype), tokens).squeeze(1)
