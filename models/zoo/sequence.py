"""Sequence zoo models: ViT (patch Conv, LayerNorm, multi-head attention, GELU MLP), BERT-style encoder, GRU.

Transformers keep torch's default init (LayerNorm keeps every block's activations at unit scale);
attention is written out (MatMul Q·Kᵀ, Softmax, MatMul with V) on [N*heads, T, d] tensors, so the
observed attention tensors have a leading dim that is not the batch.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.zoo.common import export_default, export_dynamo, image_data, seeded
from models.zoo.registry import ZooModel, register

__all__ = ["GRUClassifier", "TinyBert", "TinyViT", "bert_data"]

logger = logging.getLogger(__name__)

VOCAB, SEQ = 512, 16


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = (a.reshape(n * self.heads, t, self.hd) for a in (q, k, v))
        scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(self.hd)
        if bias is not None:
            scores = (scores.reshape(n, self.heads, t, t) + bias).reshape(n * self.heads, t, t)
        out = torch.matmul(torch.softmax(scores, -1), v)
        return self.proj(out.reshape(n, self.heads, t, self.hd).transpose(1, 2).reshape(n, t, d))


class _Block(nn.Module):
    """Pre-norm (ViT) or post-norm (BERT) transformer block with a GELU MLP."""

    def __init__(self, dim: int, heads: int, pre_norm: bool) -> None:
        super().__init__()
        self.attn = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), bias)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, bias))
        return self.ln2(x + self.mlp(x))


class TinyViT(nn.Module):
    """ViT on 32x32 images: 4x4 patch Conv, class token Concat, position embedding, 2 pre-norm blocks, head."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 65, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, pre_norm=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class TinyBert(nn.Module):
    """BERT-style encoder: int64 input_ids + attention_mask [N, S] (S dynamic), word + position embeddings
    (Gather), mask bias ``(1 - mask) * finfo.min``, post-norm blocks, masked mean pooling -> [N, dim]."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, max_len: int = 64) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB, dim)
        self.position = nn.Embedding(max_len, dim)
        self.ln = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, pre_norm=False) for _ in range(depth))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled token states [N, dim]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.ln(self.word(input_ids) + self.position(positions))
        mask = attention_mask.to(x.dtype)
        bias = (1.0 - mask[:, None, None, :]) * torch.finfo(x.dtype).min
        for block in self.blocks:
            x = block(x, bias)
        return (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)


class GRUClassifier(nn.Module):
    """Linear input projection, one-layer GRU (ONNX GRU op), last step -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.gru = nn.GRU(32, 48, batch_first=True)
        self.head = nn.Linear(48, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 6] from a [N, T, 8] sequence."""
        y, _ = self.gru(torch.tanh(self.inp(x)))
        return self.head(y[:, -1])


def _vit_data(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"image": image_data(n, seed, (3, 32, 32))}


def bert_data(n: int, seed: int, seq: int = SEQ) -> dict[str, np.ndarray]:
    """Token ids with Zipf-like frequencies; each sample has 4..seq real tokens, the rest padding (id 0, mask 0)."""
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.3, size=(n, seq)), VOCAB - 1).astype(np.int64)
    lengths = rng.integers(4, seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def _gru_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Noisy sinusoids of random frequency and phase, [n, 12, 8]."""
    rng = np.random.default_rng(seed)
    t = np.arange(12, dtype=np.float32)[None, :, None]
    freq = rng.uniform(0.2, 1.0, size=(n, 1, 8)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 8)).astype(np.float32)
    x = np.sin(freq * t + phase) + 0.2 * rng.standard_normal((n, 12, 8)).astype(np.float32)
    return {"sequence": x.astype(np.float32)}


def _export_vit(path: Path) -> Path:
    example = (torch.from_numpy(_vit_data(2, 1)["image"]),)
    return export_default(seeded(TinyViT, 8).eval(), example, path, input_names=["image"], output_names=["logits"])


def _export_bert(path: Path) -> Path:
    data = bert_data(2, 1)
    example = (torch.from_numpy(data["input_ids"]), torch.from_numpy(data["attention_mask"]))
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2, max=64)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
    return export_dynamo(seeded(TinyBert, 9).eval(), example, path, dynamic_shapes=shapes,
                         input_names=["input_ids", "attention_mask"], output_names=["pooled"])


def _export_gru(path: Path) -> Path:
    example = (torch.from_numpy(_gru_data(2, 1)["sequence"]),)
    return export_default(seeded(GRUClassifier, 10).eval(), example, path, input_names=["sequence"],
                          output_names=["logits"])


register(ZooModel("vit", "patch Conv, LayerNorm, attention MatMuls on [N*heads, T, d], Softmax, GELU MLP",
                  lambda: seeded(TinyViT, 8).eval(), _export_vit, _vit_data))
register(ZooModel("bert", "int64 input_ids + attention_mask, dynamic sequence, Gather embeddings, "
                  "finfo.min mask arithmetic, LayerNorm, GELU", lambda: seeded(TinyBert, 9).eval(), _export_bert,
                  bert_data, integer_inputs=("input_ids", "attention_mask")))
register(ZooModel("gru", "ONNX GRU op (left float) between quantized Linear layers",
                  lambda: seeded(GRUClassifier, 10).eval(), _export_gru, _gru_data))
