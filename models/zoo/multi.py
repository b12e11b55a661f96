"""A two-input, two-output zoo model: image and feature-vector branches fused by Concat, two heads."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.zoo.common import calibrate_batchnorm, export_default, image_data, seeded, to_torch
from models.zoo.registry import ZooModel, register

__all__ = ["TwoInTwoOut"]

logger = logging.getLogger(__name__)


class TwoInTwoOut(nn.Module):
    """(image [N,3,16,16], features [N,8]) -> (class logits [N,5], bounded regression [N,3] via Tanh)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.cls = nn.Linear(64, 5)
        self.reg = nn.Linear(64, 3)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and regression outputs."""
        z = self.trunk(torch.cat([self.conv(image).mean((2, 3)), self.mlp(features)], 1))
        return self.cls(z), torch.tanh(self.reg(z))


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    features = (rng.standard_normal((n, 8)) * np.linspace(0.5, 3.0, 8) + np.linspace(-1, 1, 8)).astype(np.float32)
    return {"image": image_data(n, seed, (3, 16, 16)), "features": features}


def _build() -> nn.Module:
    module = seeded(TwoInTwoOut, 11)
    data = _data(64, 10_011)
    return calibrate_batchnorm(module, [to_torch(data, ["image", "features"], i, i + 16) for i in range(0, 64, 16)])


def _export(path: Path) -> Path:
    example = tuple(torch.from_numpy(a) for a in _data(2, 1).values())
    return export_default(_build(), example, path, input_names=["image", "features"],
                          output_names=["logits", "regression"])


register(ZooModel("two_io", "two inputs, two outputs (one through Tanh), Concat of branches", _build, _export, _data))
