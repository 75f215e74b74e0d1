"""Cross-modality attention pooling: the [QA] text embedding attends over the image's feature tokens.

The visual pool is open_clip's ``AttentionPool2d`` unchanged; this module is the authors' own
``TextAttentionPool2d`` (state-dict names kept: ``positional_embedding``, ``cross_attn.{q,k,v,out}_proj``)
so their checkpoints load without renaming inside it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["feature_tokens", "single_query_attention", "visual_pool", "CrossAttention", "CrossModalAttentionPool"]


def feature_tokens(feature_map: torch.Tensor, positional_embedding: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1 + HW, C): [mean token; spatial tokens] + positions, as AttentionPool2d builds them."""
    x = feature_map.flatten(2).transpose(1, 2)  # B, HW, C
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
    return x + positional_embedding.to(x.dtype)


def single_query_attention(query: torch.Tensor, tokens: torch.Tensor, k_weight: torch.Tensor,
                           v_weight: torch.Tensor, v_bias: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of ONE projected query over N tokens, without projecting the tokens.

    query (B, C) is already projected (bias included); tokens (B, N, C); returns (B, C) before the output
    projection. Exact rewrite of softmax(q (W_k x + b_k)^T / sqrt(d)) (W_v x + b_v), per head h:
      scores: q_h . (W_k,h x_i + b_k,h) = (W_k,h^T q_h) . x_i + const_h; the constant cancels in softmax,
      values: sum_i a_i (W_v,h x_i + b_v,h) = W_v,h (sum_i a_i x_i) + b_v,h, since the a_i sum to 1.
    Two C x C products per image instead of 2N (N = 257 at 512 px). Scores and softmax run in FP32 so
    FP16 inputs keep the ranking; the weights are only reshaped (views), so training sees live values.
    """
    b, n, c = tokens.shape
    d = c // heads
    # Head-major batched products: (H, B, d) x (H, d, C). A broadcasting matmul would copy W per image.
    u = torch.bmm(query.reshape(b, heads, d).transpose(0, 1), k_weight.reshape(heads, d, c))  # (H, B, C)
    scores = torch.bmm(u.transpose(0, 1).float(), tokens.float().transpose(1, 2)) * d**-0.5  # (B, H, N)
    attn = scores.softmax(dim=-1).to(tokens.dtype)
    pooled = torch.bmm(attn, tokens)  # (B, H, C): per-head attention-weighted token average
    out = torch.bmm(pooled.transpose(0, 1), v_weight.reshape(heads, d, c).transpose(1, 2))  # (H, B, d)
    return out.transpose(0, 1).reshape(b, c) + v_bias


def visual_pool(attnpool: nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
    """open_clip's AttentionPool2d output, computed for its one used query (the mean token) only.

    AttentionPool2d runs all 1 + HW tokens as queries and keeps row 0; this returns the same row.
    """
    x = feature_tokens(feature_map, attnpool.positional_embedding)
    q = F.linear(x[:, 0], attnpool.q_proj.weight, attnpool.q_proj.bias)
    out = single_query_attention(q, x, attnpool.k_proj.weight, attnpool.v_proj.weight, attnpool.v_proj.bias,
                                 attnpool.num_heads)
    return attnpool.c_proj(out)


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

    def forward(self, feature_map: torch.Tensor, text_embedding: torch.Tensor, single_query: bool = True) -> torch.Tensor:
        """``single_query=False`` runs the straightforward attention (the authors' computation)."""
        tokens = feature_tokens(feature_map, self.positional_embedding)
        query = text_embedding.to(tokens.dtype)
        if not single_query:
            return self.cross_attn(query.unsqueeze(1), tokens).squeeze(1)
        a = self.cross_attn
        out = single_query_attention(a.q_proj(query), tokens, a.k_proj.weight, a.v_proj.weight, a.v_proj.bias,
                                     a.num_heads)
        return a.out_proj(out)
