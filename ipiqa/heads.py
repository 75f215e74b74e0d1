"""Score heads. Names match the authors' (``head.dense``/``head.out_proj``, or ``head.weight`` when linear)."""
from __future__ import annotations

import torch
from torch import nn

from .config import IPIQAConfig

__all__ = ["MLPHead", "build_head"]


class MLPHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj; no output activation (scores are on MOS scale)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(in_dim, in_dim)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(x)))))


def build_head(cfg: IPIQAConfig) -> nn.Module:
    if cfg.head == "mlp":
        return MLPHead(cfg.head_in_dim, cfg.num_outputs, cfg.dropout)
    return nn.Linear(cfg.head_in_dim, cfg.num_outputs)
