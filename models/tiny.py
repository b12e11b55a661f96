"""Tiny deterministic models for fast unit tests: an MLP (-> Gemm) and a single-head self-attention block (-> MatMul)."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

__all__ = ["TinyMLP", "TinySelfAttention", "factory_attention", "factory_mlp"]

logger = logging.getLogger(__name__)


class TinyMLP(nn.Module):
    """Linear-ReLU-Linear on [B, in_features]; each Linear exports as a Gemm."""

    def __init__(self, in_features: int = 16, hidden: int = 32, out_features: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, out_features]."""
        return self.fc2(self.relu(self.fc1(x)))


class TinySelfAttention(nn.Module):
    """Single-head self-attention on [B,T,D]: q/k/v projections, softmax(QK^T/sqrt(D))V, output projection,
    residual Add and LayerNorm. 3-D Linear inputs export as MatMul(+Add), the score products as MatMul."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output [B,T,D], same shape as the input."""
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        y = self.out(torch.matmul(attn, v))
        return self.norm(x + y)


def factory_mlp(seed: int = 0) -> tuple[TinyMLP, tuple[torch.Tensor]]:
    """Seeded TinyMLP (eval) and a [2,16] example input."""
    gen = torch.manual_seed(seed)
    model = TinyMLP().eval()
    return model, (torch.randn(2, 16, generator=gen),)


def factory_attention(seed: int = 0) -> tuple[TinySelfAttention, tuple[torch.Tensor]]:
    """Seeded TinySelfAttention (eval) and a [2,8,16] example input (batch, tokens, dim)."""
    gen = torch.manual_seed(seed)
    model = TinySelfAttention().eval()
    return model, (torch.randn(2, 8, 16, generator=gen),)
