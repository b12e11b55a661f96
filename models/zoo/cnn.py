"""Convolutional zoo models: static-batch CNN, residual CNN, MobileNetV3 block, grouped convs, UNet, float16, opset 11.

Inputs are image-like [N, 3, 32, 32] (``common.image_data``); BatchNorm statistics are measured on
that data before export (see ``models.zoo.common``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.zoo.common import calibrate_batchnorm, export_default, image_data, seeded, to_torch
from models.zoo.registry import ZooModel, register

__all__ = ["Float16CNN", "GroupedCNN", "MobileNetV3Block", "Opset11CNN", "ResidualCNN", "StaticCNN", "TinyUNet"]

logger = logging.getLogger(__name__)

IMAGE = (3, 32, 32)


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU
         ) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act())


def _images(n: int, seed: int, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {"image": image_data(n, seed, IMAGE, dtype)}


def _build(cls: type[nn.Module], seed: int) -> nn.Module:
    """Seeded ``cls()`` with BatchNorm statistics from 4 batches of its own data distribution."""
    module = seeded(cls, seed)
    data = _images(64, 10_000 + seed)
    return calibrate_batchnorm(module, [to_torch(data, ["image"], i, i + 16) for i in range(0, 64, 16)], seed)


class StaticCNN(nn.Module):
    """Conv-BN-ReLU, MaxPool, Conv-BN-ReLU, global pool, Linear: exported with a fixed batch of 1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 16), nn.MaxPool2d(2), _cbr(16, 32), nn.MaxPool2d(2), _cbr(32, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.head(self.features(x).mean((2, 3)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _cbr(cin, cout, stride=stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return self.relu(self.conv2(self.conv1(x)) + skip)


class ResidualCNN(nn.Module):
    """ResNet-style: stem, identity block, strided block with a 1x1 projection skip, GAP, Linear (static batch 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16)
        self.blocks = nn.Sequential(_BasicBlock(16, 16, 1), _BasicBlock(16, 32, 2), _BasicBlock(32, 32, 1))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class _SqueezeExcite(nn.Module):
    def __init__(self, ch: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(ch, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(s))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, expand: int, cout: int, stride: int) -> None:
        super().__init__()
        self.expand = _cbr(cin, expand, 1, act=nn.Hardswish)
        self.dw = _cbr(expand, expand, 3, stride, groups=expand, act=nn.Hardswish)
        self.se = _SqueezeExcite(expand, max(8, expand // 4))
        self.project = nn.Sequential(nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Block(nn.Module):
    """MobileNetV3-style: HardSwish stem, inverted residuals (depthwise, squeeze-excite with HardSigmoid), HardSwish head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16, stride=2, act=nn.Hardswish)
        self.blocks = nn.Sequential(_InvertedResidual(16, 48, 16, 1), _InvertedResidual(16, 64, 24, 2),
                                    _InvertedResidual(24, 72, 24, 1))
        self.head = nn.Sequential(nn.Linear(24, 64), nn.Hardswish(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class GroupedCNN(nn.Module):
    """Grouped convs (groups 4 and 8, not depthwise) with a ShuffleNet channel shuffle (Reshape/Transpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 32)
        self.g1 = _cbr(32, 64, groups=4, stride=2)
        self.g2 = _cbr(64, 64, groups=8)
        self.g3 = _cbr(64, 64, 1, groups=4)
        self.head = nn.Linear(64, 10)

    @staticmethod
    def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        y = self.g1(self.stem(x))
        y = self.g3(self._shuffle(self.g2(y), 8)) + y
        return self.head(y.mean((2, 3)))


class TinyUNet(nn.Module):
    """UNet: two MaxPool downsamplings, ConvTranspose upsamplings, Concat skips, 1x1 Conv to 2 class maps."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2, self.mid = _cbr(3, 16), _cbr(16, 32), _cbr(32, 64)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, 2)
        self.dec2 = _cbr(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, 2)
        self.dec1 = _cbr(32, 16)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class maps [N, 2, 32, 32]."""
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        m = self.mid(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.out(d1)


class Float16CNN(ResidualCNN):
    """The residual CNN in float16 (inputs, weights and outputs of the exported graph are float16)."""


class Opset11CNN(nn.Module):
    """Conv-BN-ReLU6 (Clip), MaxPool, Conv-BN-ReLU, Flatten, Linear: written by the TorchScript exporter at opset 11."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 16, act=nn.ReLU6), nn.MaxPool2d(2), _cbr(16, 32, stride=2),
                                      nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.head(torch.flatten(self.features(x), 1))


def _example(batch: int = 2, dtype: type = np.float32) -> tuple[torch.Tensor]:
    return (torch.from_numpy(_images(batch, 1, dtype)["image"]),)


def _export_static(cls: type[nn.Module], seed: int) -> Callable[[Path], Path]:
    def export(path: Path) -> Path:
        return export_default(_build(cls, seed), _example(1), path, dynamic_batch=False, input_names=["image"],
                              output_names=["logits"])
    return export


def _export_dynamic(cls: type[nn.Module], seed: int, output: str) -> Callable[[Path], Path]:
    def export(path: Path) -> Path:
        return export_default(_build(cls, seed), _example(), path, input_names=["image"], output_names=[output])
    return export


def _export_fp16(path: Path) -> Path:
    module = _build(Float16CNN, 6).half()
    return export_default(module, _example(dtype=np.float16), path, input_names=["image"], output_names=["logits"])


def _export_opset11(path: Path) -> Path:
    module = _build(Opset11CNN, 7)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, _example(), str(tmp), dynamo=False, opset_version=11, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    tmp.replace(path)
    return path


def _fp16_data(n: int, seed: int) -> dict[str, np.ndarray]:
    return _images(n, seed, np.float16)


register(ZooModel("static_cnn", "static batch 1 (torch.onnx default, no dynamic shapes); MaxPool pass-through",
                  lambda: _build(StaticCNN, 1), _export_static(StaticCNN, 1), _images))
register(ZooModel("resnet", "residual Add of two quantized branches, 1x1 projection skip; static batch 1",
                  lambda: _build(ResidualCNN, 2), _export_static(ResidualCNN, 2), _images))
register(ZooModel("mobilenetv3", "HardSwish after Conv, depthwise conv, squeeze-excite (HardSigmoid, Mul)",
                  lambda: _build(MobileNetV3Block, 3), _export_dynamic(MobileNetV3Block, 3, "logits"), _images))
register(ZooModel("grouped", "grouped convs (groups 4/8, not depthwise), channel shuffle Reshape/Transpose",
                  lambda: _build(GroupedCNN, 4), _export_dynamic(GroupedCNN, 4, "logits"), _images))
register(ZooModel("unet", "ConvTranspose, Concat of skip and upsampled tensors, dense output",
                  lambda: _build(TinyUNet, 5), _export_dynamic(TinyUNet, 5, "mask"), _images))
register(ZooModel("fp16", "float16 inputs, weights and outputs",
                  lambda: _build(Float16CNN, 6).half(), _export_fp16, _fp16_data))
register(ZooModel("opset11", "opset 11 file from the TorchScript exporter (Clip with inputs, Flatten, Gemm)",
                  lambda: _build(Opset11CNN, 7), _export_opset11, _images))
